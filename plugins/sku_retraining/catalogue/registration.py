"""Register a batch's SKUs and images and assign their split, set-based, in one transaction.

The caller inspects the files (see :mod:`sku_retraining.image_check`) and streams one
:class:`StagedImage` per object. Here they are COPY'd into a temporary staging table and
the rest is SQL: classify (quarantine with a reason, or accept), add new SKUs with the next
stable class indices, insert accepted images with their split. A failure anywhere rolls the
whole batch back: the catalogue never holds half a batch.

Split rules (deterministic, stable, stratified per SKU, by group):

* every original belongs to a *group* of its SKU (:mod:`.grouping`): the manifest's
  ``group`` for it, else its near-duplicate cluster by perceptual hash, else itself. The
  groups are worked out in memory (numpy, per SKU) against the SKU's registered originals,
  before the COPY; the rest is SQL;
* the split is decided per group, once, when the group first appears, and never updated: a
  later image that joins a registered group gets that group's split, so a group never
  straddles train/val/test and no registered image ever changes split;
* ``u = md5(sku_id || '/' || group_key)`` mapped to [0, 1) picks train / val / test by the
  configured fractions, so the same group lands in the same split on any machine;
* a SKU with at least ``min_originals_for_holdout`` groups gets at least one test and (with
  ``val_group_per_sku``; off by default) one val group: while it has none, its smallest new
  groups (then hash order) fill them; smaller SKUs keep everything in train until they grow;
* augmented variants inherit their source's split and group (see :mod:`.variants`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sku_retraining.catalogue.grouping import IMAGE_PREFIX, PHASH_PREFIX, group_keys
from sku_retraining.config import SplitConfig
from sku_retraining.manifest import BatchManifest


@dataclass(frozen=True, slots=True)
class StagedImage:
    """One object found under the batch's ``images/`` prefix, after inspection."""

    object_key: str
    sku_folder: str | None
    sha256: str | None
    n_bytes: int
    width: int | None = None
    height: int | None = None
    problem_code: str | None = None
    problem_detail: str | None = None
    phash: str | None = None  # 16 hex digits (image_check.perceptual_hash)


@dataclass
class RegistrationResult:
    batch_id: str
    status: str  # "registered", "already_registered", "rejected"
    n_images: int = 0
    n_quarantined: int = 0
    new_skus: list[str] = field(default_factory=list)
    quarantine_by_reason: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    rejection_reason: str | None = None
    n_groups: int = 0  # groups this batch started (images that joined a registered group: not counted)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


_STAGE_DDL = """
CREATE TEMP TABLE stage_images (
    object_key text COLLATE "C" PRIMARY KEY,
    sku_folder text COLLATE "C",
    sha256 text COLLATE "C",
    n_bytes bigint,
    width integer,
    height integer,
    problem_code text,
    problem_detail text,
    phash text,            -- 16 hex digits; bigint in images
    group_key text COLLATE "C",  -- NULL: the default, alone ('phash:' / 'image:' || sha256)
    group_split text       -- the split of the registered group it joins; NULL: a new group
) ON COMMIT DROP;
CREATE TEMP TABLE stage_skus (
    sku_id text COLLATE "C" PRIMARY KEY, name text, brand text, category text
) ON COMMIT DROP;
"""

# One pass decides which staged objects are held back, and why. Precedence: inspection
# problem, unknown SKU folder, same content under two SKUs (in this batch or vs the
# catalogue), duplicate content. Only those rows are written (the common case is a handful
# out of ~200k); content seen twice in one batch is found with a hash aggregate first.
_CLASSIFY = """
CREATE TEMP TABLE problems ON COMMIT DROP AS
WITH valid AS (
    SELECT s.sha256, s.object_key, s.sku_folder
    FROM stage_images s JOIN stage_skus m ON m.sku_id = s.sku_folder
    WHERE s.problem_code IS NULL
),
repeated AS (
    SELECT v.sha256,
           min(v.object_key) AS first_key,
           count(DISTINCT v.sku_folder) > 1 AS label_conflict,
           string_agg(DISTINCT v.sku_folder, ', ' ORDER BY v.sku_folder) AS labels
    FROM valid v
    WHERE v.sha256 IN (SELECT sha256 FROM valid GROUP BY sha256 HAVING count(*) > 1)
    GROUP BY v.sha256
),
candidates AS (
    SELECT s.object_key, s.sku_folder, s.sha256,
           CASE
             WHEN s.problem_code IS NOT NULL THEN s.problem_code
             WHEN m.sku_id IS NULL THEN 'unknown_sku'
             WHEN d.label_conflict THEN 'conflicting_labels'
             WHEN i.sku_id IS NOT NULL AND i.sku_id <> s.sku_folder THEN 'conflicting_labels'
             WHEN i.sku_id IS NOT NULL THEN 'duplicate'
             WHEN d.first_key <> s.object_key THEN 'duplicate'
           END AS problem_code,
           CASE
             WHEN s.problem_code IS NOT NULL THEN s.problem_detail
             WHEN m.sku_id IS NULL THEN format('folder %%s is not a SKU listed in manifest.json', s.sku_folder)
             WHEN d.label_conflict THEN
                  format('the same image content is labelled as several SKUs in this batch (%%s)', d.labels)
             WHEN i.sku_id IS NOT NULL AND i.sku_id <> s.sku_folder THEN
                  format('the same image content is already registered as SKU %%s (%%s)', i.sku_id, i.fsx_path)
             WHEN i.sku_id IS NOT NULL THEN format('same content already registered at %%s', i.fsx_path)
             WHEN d.first_key <> s.object_key THEN format('same content as %%s in this batch', d.first_key)
           END AS problem_detail
    FROM stage_images s
    LEFT JOIN stage_skus m ON m.sku_id = s.sku_folder
    LEFT JOIN repeated d ON d.sha256 = s.sha256
    LEFT JOIN images i ON i.sha256 = s.sha256
    WHERE s.problem_code IS NOT NULL OR m.sku_id IS NULL OR d.sha256 IS NOT NULL OR i.sha256 IS NOT NULL
)
SELECT * FROM candidates WHERE problem_code IS NOT NULL;
"""

# The staged objects that go in: everything not held back.
_ACCEPTED = """
    FROM stage_images s
    WHERE s.problem_code IS NULL
      AND NOT EXISTS (SELECT 1 FROM problems p WHERE p.object_key = s.object_key)
"""

_QUARANTINE = """
INSERT INTO quarantine (batch_id, object_key, sha256, sku_id, reason_code, reason)
SELECT %(batch_id)s, object_key, sha256, sku_folder, problem_code, problem_detail
FROM problems
"""

# New SKUs (with at least one accepted image) get the next class indices, in sku_id order.
# The table lock makes concurrent registrations take turns, so indices stay dense and unique.
_LOCK_SKUS = "LOCK TABLE skus IN SHARE ROW EXCLUSIVE MODE"
_NEW_SKUS = """
INSERT INTO skus (sku_id, class_index, name, brand, category, first_batch_id)
SELECT m.sku_id,
       (SELECT coalesce(max(class_index), -1) FROM skus) + row_number() OVER (ORDER BY m.sku_id),
       m.name, m.brand, m.category, %(batch_id)s
FROM stage_skus m
WHERE NOT EXISTS (SELECT 1 FROM skus k WHERE k.sku_id = m.sku_id)
  AND m.sku_id IN (SELECT DISTINCT s.sku_folder """ + _ACCEPTED + """)
ORDER BY m.sku_id
RETURNING sku_id
"""

# The split is decided per new group, once. Most images are alone in their group: those rows
# are decided one per row, as before groups existed (``u`` from the last 8 hex digits of the
# content hash, hold-out fill in hash order), without any aggregate or join; the few rows with
# an explicit group key (a cluster, a manifest group, a registered group) are grouped and joined
# back. Per SKU, the new groups are ranked singletons first (by content hash), then larger
# groups (smallest first, then by md5(sku/group)); the first one or two fill test and val while
# the SKU has none. An image joining a registered group takes its split (``group_split``, found
# before the COPY). ``skus`` holds each SKU's counts *before* this batch; the same statement adds
# this batch's to them, from the inserted rows themselves (no second scan of images).
_SPLIT_CASE = """
           CASE
             WHEN k.n_groups + {n_new} < %(min_holdout)s THEN 'train'
             WHEN k.n_test = 0 AND {r} = 1 THEN 'test'
             WHEN %(val_per_sku)s AND k.n_val = 0 AND {r} = CASE WHEN k.n_test = 0 THEN 2 ELSE 1 END THEN 'val'
             WHEN {u} < %(train)s THEN 'train'
             WHEN {u} < %(train)s + %(val)s THEN 'val'
             ELSE 'test'
           END"""
_INSERT_ORIGINALS = """
WITH grouped AS (   -- new groups of more than an image alone (few)
    SELECT s.sku_folder, s.group_key, count(*) AS n, md5(s.sku_folder || '/' || s.group_key) AS h
    """ + _ACCEPTED + """ AND s.group_key IS NOT NULL AND s.group_split IS NULL
    GROUP BY s.sku_folder, s.group_key
),
n_alone AS (
    SELECT s.sku_folder, count(*) AS n """ + _ACCEPTED + """ AND s.group_key IS NULL GROUP BY s.sku_folder
),
n_grouped AS (
    SELECT sku_folder, count(*) AS n FROM grouped GROUP BY sku_folder
),
grouped_decided AS (
    SELECT g.sku_folder, g.group_key,""" + _SPLIT_CASE.format(
        n_new="coalesce(a.n, 0) + c.n", r="coalesce(a.n, 0) + g.r",
        u="('x' || substr(g.h, 1, 8))::bit(32)::bigint / 4294967296.0") + """ AS split
    FROM (SELECT *, row_number() OVER (PARTITION BY sku_folder ORDER BY n, h) AS r FROM grouped) g
    JOIN n_grouped c ON c.sku_folder = g.sku_folder
    LEFT JOIN n_alone a ON a.sku_folder = g.sku_folder
    JOIN skus k ON k.sku_id = g.sku_folder
),
alone AS (
    SELECT s.sha256, s.sku_folder, s.object_key, s.width, s.height, s.n_bytes, s.phash,
           CASE WHEN s.phash IS NOT NULL AND %(clustered)s THEN %(phash_prefix)s ELSE %(image_prefix)s END
             || s.sha256 AS group_key,
           ('x' || substr(s.sha256, 57, 8))::bit(32)::bigint / 4294967296.0 AS u,
           row_number() OVER (PARTITION BY s.sku_folder ORDER BY s.sha256) AS r,
           count(*) OVER (PARTITION BY s.sku_folder) AS n_alone
    """ + _ACCEPTED + """ AND s.group_key IS NULL
),
new_rows AS (
    SELECT a.sha256, a.sku_folder, a.object_key,""" + _SPLIT_CASE.format(
        n_new="a.n_alone + coalesce(c.n, 0)", r="a.r", u="a.u") + """ AS split,
           a.width, a.height, a.n_bytes, a.phash, a.group_key
    FROM alone a JOIN skus k ON k.sku_id = a.sku_folder
    LEFT JOIN n_grouped c ON c.sku_folder = a.sku_folder
    UNION ALL
    SELECT s.sha256, s.sku_folder, s.object_key, coalesce(s.group_split, d.split),
           s.width, s.height, s.n_bytes, s.phash, s.group_key
    """ + _ACCEPTED.replace("FROM stage_images s", "FROM stage_images s LEFT JOIN grouped_decided d\n"
                            "      ON s.group_split IS NULL AND d.sku_folder = s.sku_folder AND d.group_key = s.group_key"
                            ) + """ AND s.group_key IS NOT NULL
),
inserted AS (
    INSERT INTO images (sha256, sku_id, batch_id, fsx_path, split, width, height, n_bytes, phash, group_key)
    SELECT sha256, sku_folder, %(batch_id)s, object_key, split, width, height, n_bytes,
           ('x' || phash)::bit(64)::bigint, group_key
    FROM new_rows
    ORDER BY sha256  -- fills the primary-key index in order
    RETURNING sku_id, split
),
per_sku AS (
    SELECT sku_id, count(*) AS n,
           count(*) FILTER (WHERE split = 'val') AS n_val,
           count(*) FILTER (WHERE split = 'test') AS n_test
    FROM inserted GROUP BY sku_id
),
new_groups AS (
    SELECT sku_folder AS sku_id, sum(n) AS n
    FROM (SELECT sku_folder, n FROM n_alone UNION ALL SELECT sku_folder, n FROM n_grouped) x GROUP BY sku_folder
),
counted AS (
    UPDATE skus k
    SET n_originals = k.n_originals + c.n, n_val = k.n_val + c.n_val, n_test = k.n_test + c.n_test,
        n_groups = k.n_groups + coalesce(g.n, 0)
    FROM per_sku c LEFT JOIN new_groups g ON g.sku_id = c.sku_id
    WHERE k.sku_id = c.sku_id
    RETURNING c.n, c.n_val, c.n_test, coalesce(g.n, 0) AS n_groups
)
SELECT coalesce(sum(n), 0), coalesce(sum(n_val), 0), coalesce(sum(n_test), 0), coalesce(sum(n_groups), 0)
FROM counted
"""

# The batch's SKUs' registered originals that a new image can join: hashed ones (near-duplicate
# clusters) and manifest groups. One scan of images, filtered to the batch's SKUs.
_REGISTERED_GROUPS = """
SELECT sku_id, phash, group_key, split FROM images
WHERE source_sha256 IS NULL AND sku_id = ANY(%s) AND (phash IS NOT NULL OR group_key LIKE 'manifest:%%')
"""


def _with_groups(cur, manifest: BatchManifest, images: list[StagedImage], split: SplitConfig) -> list[tuple]:
    """The staging rows, each with its group key (NULL: the default, see ``_INSERT_ORIGINALS``)
    and the split of the registered group it joins (NULL: a new group)."""
    phashes = [i.phash or None for i in images]
    listed = manifest.sku_ids  # a property that builds the set: once, not per image
    candidates = [n for n, i in enumerate(images) if i.problem_code is None and i.sha256 and i.sku_folder in listed]
    skus = sorted({images[n].sku_folder for n in candidates})
    existing: list[tuple[str, int, str]] = []
    registered: dict[tuple[str, str], str] = {}
    if skus:
        cur.execute(_REGISTERED_GROUPS, (skus,))
        for sku, phash, key, grp_split in cur.fetchall():
            registered[(sku, key)] = grp_split
            if phash is not None:
                existing.append((sku, phash, key))
    labels = manifest.image_groups

    def label(i: StagedImage) -> str | None:
        return labels.get(f"{i.sku_folder}/{i.object_key.rsplit('/', 1)[-1]}") if labels else None

    found = group_keys(
        [images[n].sha256 for n in candidates], [images[n].sku_folder for n in candidates],
        [phashes[n] for n in candidates], [label(images[n]) for n in candidates],
        existing, split.near_duplicate_max_distance,
    )
    keys = {candidates[k]: key for k, key in found.items()}
    return [
        (i.object_key, i.sku_folder, i.sha256, i.n_bytes, i.width, i.height, i.problem_code, i.problem_detail,
         phashes[n], keys.get(n), registered.get((i.sku_folder, keys[n])) if n in keys else None)
        for n, i in enumerate(images)
    ]


def _copy_rows(cur, statement: str, rows: Iterable[tuple]) -> int:
    n = 0
    with cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
            n += 1
    return n


def batch_status(conn, batch_id: str) -> str | None:
    with conn.cursor() as cur:
        cur.execute("SELECT status FROM batches WHERE batch_id = %s", (batch_id,))
        row = cur.fetchone()
    return row[0] if row else None


def record_rejection(conn, batch_id: str, reason: str, *, marker_last_modified=None, run_id: str | None = None) -> None:
    """Mark ``batch_id`` rejected with ``reason`` (idempotent; never over a registered batch)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            """INSERT INTO batches (batch_id, status, rejection_reason, marker_last_modified, registered_by_run)
               VALUES (%s, 'rejected', %s, %s, %s)
               ON CONFLICT (batch_id) DO UPDATE
                 SET rejection_reason = EXCLUDED.rejection_reason,
                     marker_last_modified = EXCLUDED.marker_last_modified,
                     registered_by_run = EXCLUDED.registered_by_run,
                     updated_at = now()
                 WHERE batches.status = 'rejected'""",
            (batch_id, reason, marker_last_modified, run_id),
        )


def register_batch(
    conn,
    manifest: BatchManifest,
    images: Iterable[StagedImage],
    *,
    split: SplitConfig,
    run_id: str | None = None,
    marker_last_modified=None,
    commit: bool = True,
) -> RegistrationResult:
    """Register ``manifest``'s batch and its staged ``images`` (see the module docstring).

    Idempotent: a batch already registered is left as it is (``already_registered``).
    With ``commit=False`` everything is computed and reported, then rolled back (dry run).

    :param conn: a psycopg connection in autocommit mode (each call is its own transaction).
    """
    batch_id = manifest.batch_id
    result = RegistrationResult(batch_id=batch_id, status="registered")

    class _DryRun(Exception):
        pass

    try:
        with conn.transaction(), conn.cursor() as cur:
            # Serialise registrations of the same batch (two task tries at once).
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('batch:' || %s))", (batch_id,))
            cur.execute("SELECT status FROM batches WHERE batch_id = %s FOR UPDATE", (batch_id,))
            row = cur.fetchone()
            if row and row[0] == "registered":
                cur.execute(
                    "SELECT n_images, n_quarantined FROM batches WHERE batch_id = %s", (batch_id,)
                )
                result.n_images, result.n_quarantined = cur.fetchone()
                result.status = "already_registered"
                return result

            # Sorts and hashes of a whole batch fit in memory instead of spilling to disk.
            cur.execute("SET LOCAL work_mem = '512MB'")
            # Registrations take turns from here: the groups a batch joins are read below and the
            # SKUs' class indices and counters written at the end, all under this lock.
            cur.execute(_LOCK_SKUS)
            images = list(images)
            staged_rows = _with_groups(cur, manifest, images, split)
            cur.execute(_STAGE_DDL)
            _copy_rows(
                cur,
                "COPY stage_skus (sku_id, name, brand, category) FROM STDIN",
                ((s.sku_id, s.name, s.brand, s.category) for s in manifest.skus),
            )
            n_staged = _copy_rows(
                cur,
                "COPY stage_images (object_key, sku_folder, sha256, n_bytes, width, height, "
                "problem_code, problem_detail, phash, group_key, group_split) FROM STDIN",
                staged_rows,
            )
            if n_staged == 0:
                reason = "batch has no image files under images/ (empty batch)"
                result.status, result.rejection_reason = "rejected", reason
                cur.execute(
                    """INSERT INTO batches (batch_id, status, rejection_reason, manifest_sha256,
                                            manifest_created_at, marker_last_modified, registered_by_run)
                       VALUES (%s, 'rejected', %s, %s, %s, %s, %s)
                       ON CONFLICT (batch_id) DO UPDATE SET rejection_reason = EXCLUDED.rejection_reason,
                           marker_last_modified = EXCLUDED.marker_last_modified, updated_at = now()""",
                    (batch_id, reason, manifest.sha256, manifest.created_at, marker_last_modified, run_id),
                )
                if not commit:
                    raise _DryRun
                return result

            # A rejected batch re-uploaded with a fix is registered over its rejection.
            cur.execute(
                """INSERT INTO batches (batch_id, status, manifest_sha256, manifest_created_at,
                                        marker_last_modified, registered_by_run)
                   VALUES (%s, 'registered', %s, %s, %s, %s)
                   ON CONFLICT (batch_id) DO UPDATE SET status = 'registered', rejection_reason = NULL,
                       manifest_sha256 = EXCLUDED.manifest_sha256,
                       manifest_created_at = EXCLUDED.manifest_created_at,
                       marker_last_modified = EXCLUDED.marker_last_modified,
                       registered_by_run = EXCLUDED.registered_by_run, updated_at = now()""",
                (batch_id, manifest.sha256, manifest.created_at, marker_last_modified, run_id),
            )
            cur.execute("ANALYZE stage_images")
            cur.execute(_CLASSIFY, {})
            params = {"batch_id": batch_id}
            cur.execute(_QUARANTINE, params)
            cur.execute("SELECT problem_code, count(*) FROM problems GROUP BY 1 ORDER BY 1")
            result.quarantine_by_reason = dict(cur.fetchall())
            result.n_quarantined = sum(result.quarantine_by_reason.values())
            cur.execute(_NEW_SKUS, params)
            result.new_skus = sorted(r[0] for r in cur.fetchall())
            cur.execute(
                _INSERT_ORIGINALS,
                {
                    **params,
                    "clustered": split.near_duplicate_max_distance >= 0,
                    "phash_prefix": PHASH_PREFIX,
                    "image_prefix": IMAGE_PREFIX,
                    "min_holdout": split.min_originals_for_holdout,
                    "val_per_sku": split.val_group_per_sku,
                    "train": split.train_fraction,
                    "val": split.val_fraction,
                },
            )
            inserted, n_val, n_test, result.n_groups = (int(v) for v in cur.fetchone())
            accepted = n_staged - result.n_quarantined
            if inserted != accepted:  # every accepted image's SKU must exist: never drop one silently
                raise RuntimeError(f"batch {batch_id!r}: {accepted} images accepted but {inserted} inserted")
            result.splits = {
                name: n for name, n in (("test", n_test), ("train", inserted - n_val - n_test), ("val", n_val)) if n
            }
            result.n_images = inserted
            cur.execute(
                "UPDATE batches SET n_images = %s, n_quarantined = %s WHERE batch_id = %s",
                (result.n_images, result.n_quarantined, batch_id),
            )
            if not commit:
                raise _DryRun
    except _DryRun:
        pass
    return result


#: Quarantine code for an object that appeared under a batch's ``images/`` after the batch was
#: registered (``_SUCCESS`` written before the upload finished, or a re-upload that added keys).
LATE_OBJECT = "late_object"


def record_late_objects(conn, batch_id: str, objects: Iterable[tuple[str, Any]], images_prefix: str) -> list[str]:
    """Record, with a reason, every object under a *registered* batch's ``images/`` that the
    catalogue holds neither as an image nor in quarantine: registered batches are immutable, so
    such an object is never trained on, but it is never silently lost either.

    :param objects: ``(key, last_modified)`` of every object now under ``images_prefix``.
    :return: the keys recorded by this call (none on a repeat).
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT status, updated_at, marker_last_modified FROM batches WHERE batch_id = %s FOR UPDATE",
                    (batch_id,))
        row = cur.fetchone()
        if row is None or row[0] != "registered":
            return []
        _, registered_at, marker = row
        cur.execute(
            "SELECT fsx_path FROM images WHERE batch_id = %s AND source_sha256 IS NULL "
            "UNION SELECT object_key FROM quarantine WHERE batch_id = %s",
            (batch_id, batch_id),
        )
        known = {k for (k,) in cur.fetchall()}
        late = sorted((k, t) for k, t in objects if k not in known)
        if not late:
            return []
        marker_text = marker.isoformat() if marker else "unknown"
        cur.executemany(
            "INSERT INTO quarantine (batch_id, object_key, sha256, sku_id, reason_code, reason) "
            "VALUES (%s, %s, NULL, %s, %s, %s) ON CONFLICT (batch_id, object_key) DO NOTHING",
            [(batch_id, key, key[len(images_prefix):].split("/", 1)[0] or None, LATE_OBJECT,
              f"uploaded after the batch was registered (object {t.isoformat() if t else '?'}, _SUCCESS "
              f"{marker_text}, registered {registered_at.isoformat()}): a registered batch is immutable, "
              f"send the file in a new batch") for key, t in late],
        )
        cur.execute("UPDATE batches SET n_quarantined = (SELECT count(*) FROM quarantine WHERE batch_id = %s) "
                    "WHERE batch_id = %s", (batch_id, batch_id))
    return [k for k, _ in late]
