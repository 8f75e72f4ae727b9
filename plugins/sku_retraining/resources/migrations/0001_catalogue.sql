-- Catalogue of SKU image batches, SKUs, images, splits and quarantine.
-- Applied once by the migrate task (see sku_retraining/catalogue/migrations.py).

CREATE TABLE batches (
    batch_id          text COLLATE "C" PRIMARY KEY,
    status            text NOT NULL CHECK (status IN ('registered', 'rejected')),
    manifest_sha256   text,
    manifest_created_at timestamptz,
    -- The _SUCCESS marker's time when the batch was looked at: a rejected batch whose marker
    -- is rewritten later (a corrected re-upload) is looked at again.
    marker_last_modified timestamptz,
    rejection_reason  text,
    n_images          integer NOT NULL DEFAULT 0,
    n_quarantined     integer NOT NULL DEFAULT 0,
    registered_by_run text,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE skus (
    sku_id        text COLLATE "C" PRIMARY KEY,
    -- Stable class index: assigned once, never reused; new SKUs get the next indices.
    class_index   integer NOT NULL UNIQUE CHECK (class_index >= 0),
    name          text NOT NULL,
    brand         text NOT NULL,
    category      text NOT NULL,
    first_batch_id text NOT NULL REFERENCES batches (batch_id),
    -- Split state of the SKU's originals, kept by registration in the same transaction as
    -- the image rows: stratification reads 600 SKU rows instead of scanning 4M images.
    n_originals   integer NOT NULL DEFAULT 0,
    n_val         integer NOT NULL DEFAULT 0,
    n_test        integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- images is the bulk path (4M+ rows, ~200k a month). It is written only by the set-based
-- registration in sku_retraining/catalogue/ (registration.py, variants.py), whose statements
-- join every row to its SKU, batch and source image and check the counts, so no per-row
-- foreign-key trigger runs: those triggers cost more than the rest of the load together
-- (measured: bench/README.md).
CREATE TABLE images (
    -- Identifiers use the "C" collation: byte order, stable across servers, and much cheaper
    -- to sort and index than a linguistic locale.
    sha256          text COLLATE "C" PRIMARY KEY CHECK (length(sha256) = 64),  -- content hash: the identity
    sku_id          text COLLATE "C" NOT NULL,      -- skus.sku_id (checked set-based, see above)
    batch_id        text COLLATE "C" NOT NULL,      -- batches.batch_id (idem)
    fsx_path        text COLLATE "C" NOT NULL,      -- relative to the FSx mount (= S3 key)
    source_sha256   text COLLATE "C",               -- augmented variants: images.sha256 of the source
    split           text NOT NULL CHECK (split IN ('train', 'val', 'test')),
    width           integer,
    height          integer,
    n_bytes         bigint,
    augmentation    jsonb,                          -- transform parameters of a variant
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((source_sha256 IS NULL) = (augmentation IS NULL)),
    -- Variants exist for train originals only: val/test hold originals only (no leakage).
    CHECK (source_sha256 IS NULL OR split = 'train')
);
CREATE INDEX images_batch_idx ON images (batch_id);
CREATE INDEX images_source_idx ON images (source_sha256) WHERE source_sha256 IS NOT NULL;

CREATE TABLE quarantine (
    batch_id     text NOT NULL REFERENCES batches (batch_id),
    object_key   text NOT NULL,        -- where the file is (S3 key / FSx path)
    sha256       text,
    sku_id       text,                 -- the folder it was found in, as found
    reason_code  text NOT NULL,
    reason       text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, object_key)
);

CREATE TABLE dataset_snapshots (
    dag_run_id     text PRIMARY KEY,   -- one snapshot per DAG run
    snapshot_id    text NOT NULL,      -- content address of the manifests
    batch_ids      text[] NOT NULL,
    num_classes    integer NOT NULL,
    counts         jsonb NOT NULL,     -- {"train": n, "val": n, "test": n}
    manifest_sha256 jsonb NOT NULL,    -- {"train.csv": sha256, ...}
    s3_prefix      text NOT NULL,
    fsx_path       text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
