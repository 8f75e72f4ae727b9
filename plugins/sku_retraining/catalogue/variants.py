"""Augmented variants: which originals need them, and registering what the job produced.

Variants inherit their source's SKU, batch, split and split group. Only *train* originals are augmented,
and the schema refuses a variant in val/test, so evaluation never sees a transformed copy of
a training image (no leakage).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class VariantRow:
    variant_path: str
    source_sha256: str
    variant_index: int
    seed: int
    sha256: str
    width: int
    height: int
    params: str  # JSON text of the drawn transform parameters


def originals_needing_variants(conn, variants_per_image: int) -> list[tuple[str, str, str]]:
    """``(fsx_path, sha256, sku_id)`` of every train original with fewer variants than asked.

    Not only this run's batches: an original whose variants were lost or never made (a
    failed earlier run, a larger ``variants_per_image``) is picked up again.
    """
    with conn.cursor() as cur:
        cur.execute(
            """SELECT o.fsx_path, o.sha256, o.sku_id
               FROM images o
               LEFT JOIN (SELECT source_sha256, count(*) AS n FROM images
                          WHERE source_sha256 IS NOT NULL GROUP BY 1) v ON v.source_sha256 = o.sha256
               WHERE o.source_sha256 IS NULL AND o.split = 'train' AND coalesce(v.n, 0) < %s
               ORDER BY o.sha256""",
            (variants_per_image,),
        )
        return cur.fetchall()


def register_variants(conn, rows: Iterable[VariantRow]) -> dict[str, int]:
    """Insert variants (idempotent: one already registered is left alone), in one transaction.

    :raises ValueError: when a variant's source is unknown or is not a train original; nothing
        is written then.
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            """CREATE TEMP TABLE stage_variants (
                   variant_path text COLLATE "C", source_sha256 text COLLATE "C", variant_index integer,
                   seed bigint, sha256 text COLLATE "C", width integer, height integer, params jsonb
               ) ON COMMIT DROP"""
        )
        n = 0
        with cur.copy("COPY stage_variants FROM STDIN") as copy:
            for r in rows:
                copy.write_row((r.variant_path, r.source_sha256, r.variant_index, r.seed, r.sha256,
                                r.width, r.height, r.params))
                n += 1
        cur.execute(
            """SELECT s.variant_path, s.source_sha256,
                      CASE WHEN i.sha256 IS NULL THEN 'unknown source'
                           WHEN i.source_sha256 IS NOT NULL THEN 'source is itself a variant'
                           ELSE 'source is in ' || i.split END
               FROM stage_variants s LEFT JOIN images i ON i.sha256 = s.source_sha256
               WHERE i.sha256 IS NULL OR i.source_sha256 IS NOT NULL OR i.split <> 'train'
               ORDER BY 1 LIMIT 10"""
        )
        bad = cur.fetchall()
        if bad:
            details = "; ".join(f"{path} (source {src[:12]}…): {why}" for path, src, why in bad)
            raise ValueError(f"refusing to register variants: {details}")
        cur.execute(
            """INSERT INTO images (sha256, sku_id, batch_id, fsx_path, source_sha256, split, group_key,
                                   width, height, augmentation)
               SELECT s.sha256, i.sku_id, i.batch_id, s.variant_path, s.source_sha256, i.split, i.group_key,
                      s.width, s.height,
                      jsonb_build_object('variant_index', s.variant_index, 'seed', s.seed, 'params', s.params)
               FROM stage_variants s JOIN images i ON i.sha256 = s.source_sha256
               ORDER BY s.sha256
               ON CONFLICT (sha256) DO NOTHING"""
        )
        inserted = cur.rowcount
    return {"reported": n, "inserted": inserted, "already_registered": n - inserted}


def parse_params(text: str) -> str:
    """Normalise the job's params column to compact JSON (and fail early if it is not JSON)."""
    return json.dumps(json.loads(text), separators=(",", ":"), sort_keys=True)
