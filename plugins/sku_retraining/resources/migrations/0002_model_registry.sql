-- Model registry: versions in S3 (models/<model_name>/v<NNNN>/), every challenger's decision,
-- and the history of the production pointer (models/<model_name>/production.json).
-- Written by sku_retraining/catalogue/models.py; see sku_retraining/promotion.py for the S3 side.

CREATE TABLE model_versions (
    model_name   text COLLATE "C" NOT NULL,
    -- Allocated once per DAG run as max + 1 under a per-model lock; rows are never deleted,
    -- so an abandoned (staged) number is never handed out again.
    version      integer NOT NULL CHECK (version >= 1),
    dag_run_id   text NOT NULL,
    status       text NOT NULL CHECK (status IN ('staged', 'promoted')),
    s3_prefix    text NOT NULL,                -- s3://<bucket>/models/<model_name>/v<NNNN>/
    -- The version's objects as verified at promotion: {name: {"size": n, "sha256": hex}};
    -- a rollback checks S3 against this before pointing production back at the version.
    objects      jsonb,
    lineage      jsonb,
    evaluation   jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    promoted_at  timestamptz,
    PRIMARY KEY (model_name, version),
    -- Re-running the promote task of a run reuses the run's version.
    UNIQUE (model_name, dag_run_id),
    CHECK ((status = 'promoted') = (promoted_at IS NOT NULL)),
    CHECK (status = 'staged' OR objects IS NOT NULL)
);

CREATE TABLE model_decisions (
    model_name   text COLLATE "C" NOT NULL,
    dag_run_id   text NOT NULL,
    decision     text NOT NULL CHECK (decision IN ('promote', 'reject', 'force_promote')),
    reasons      jsonb NOT NULL DEFAULT '[]'::jsonb,   -- the failed gates, in words
    gates        jsonb NOT NULL DEFAULT '[]'::jsonb,   -- every gate: value, threshold, passed
    version      integer,                               -- NULL for rejections
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, dag_run_id),
    FOREIGN KEY (model_name, version) REFERENCES model_versions (model_name, version),
    -- A promote decision gets its version when the promote task allocates it.
    CHECK (decision <> 'reject' OR version IS NULL)
);

CREATE TABLE production_history (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_name       text COLLATE "C" NOT NULL,
    version          integer NOT NULL,
    previous_version integer,
    action           text NOT NULL CHECK (action IN ('promote', 'rollback')),
    dag_run_id       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- previous_version is what the pointer said before: a log entry, deliberately not a key.
    FOREIGN KEY (model_name, version) REFERENCES model_versions (model_name, version)
);
-- A run promotes at most once: a retried promote task can never add a second row.
CREATE UNIQUE INDEX production_history_one_promotion_per_run
    ON production_history (model_name, dag_run_id) WHERE action = 'promote';
CREATE INDEX production_history_model_idx ON production_history (model_name, id);
