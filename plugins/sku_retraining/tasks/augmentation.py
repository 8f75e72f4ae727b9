"""Augmentation around the job: what to augment (before), what was produced (after)."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import tarfile
import tempfile
from pathlib import Path

from sku_contracts.files import (
    AUGMENT_INPUT_COLUMNS,
    AUGMENT_INPUTS_FILE,
    AUGMENTATION_MANIFEST_PREFIX,
    AUGMENTATION_SKIPPED_PREFIX,
)
from sku_retraining.config import PipelineConfig, load_config_from_airflow
from sku_retraining.layout import augmented_dir_for

log = logging.getLogger(__name__)


def export_augmentation_inputs(*, variants_per_image: int, cfg: PipelineConfig | None = None) -> dict:
    """Write ``augment_inputs.csv`` (train originals lacking variants) to S3; content-addressed.

    :return: ``{"s3_uri": <prefix>, "count": n, "variants_per_image": N}``.
    """
    from sku_retraining.catalogue.variants import originals_needing_variants
    from sku_retraining.tasks.hooks import pipeline_hooks

    cfg = cfg or load_config_from_airflow()
    catalogue, s3 = pipeline_hooks(cfg)
    with catalogue.open_connection() as conn:
        originals = originals_needing_variants(conn, variants_per_image)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(AUGMENT_INPUT_COLUMNS)
    for path, sha, sku in originals:
        writer.writerow((path, sha, sku, augmented_dir_for(path)))
    data = buffer.getvalue().encode()
    digest = hashlib.sha256(data + f"|{variants_per_image}".encode()).hexdigest()[:16]
    prefix = f"{cfg.prefixes.datasets}augment-inputs/{digest}/"
    s3.load_bytes(data, key=prefix + AUGMENT_INPUTS_FILE, bucket_name=cfg.data_bucket, replace=True)
    log.info("%d train original(s) need %d variant(s) each -> s3://%s/%s%s",
             len(originals), variants_per_image, cfg.data_bucket, prefix, AUGMENT_INPUTS_FILE)
    return {"s3_uri": f"s3://{cfg.data_bucket}/{prefix}", "count": len(originals),
            "variants_per_image": variants_per_image}


def register_augmentation_output(job_result: dict | None, *, cfg: PipelineConfig | None = None) -> dict:
    """Register the variants listed in the job's ``output.tar.gz``; log what it skipped."""
    from sku_retraining.catalogue.variants import VariantRow, parse_params, register_variants
    from sku_retraining.jobs.request import job_output_uri
    from sku_retraining.tasks.hooks import pipeline_hooks

    description = (job_result or {}).get("Training")
    if not description:
        log.info("No augmentation job ran (nothing to augment)")
        return {"reported": 0, "inserted": 0, "already_registered": 0, "skipped": 0}
    cfg = cfg or load_config_from_airflow()
    catalogue, s3 = pipeline_hooks(cfg)
    bucket, key = s3.parse_s3_url(job_output_uri(description))
    rows: list[VariantRow] = []
    skipped: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "output.tar.gz"
        s3.get_conn().download_file(bucket, key, str(archive))
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if not member.isfile() or not name.endswith(".csv"):
                    continue
                text = tar.extractfile(member).read().decode()
                reader = csv.DictReader(io.StringIO(text))
                if name.startswith(AUGMENTATION_MANIFEST_PREFIX):
                    rows.extend(
                        VariantRow(r["variant_path"], r["source_sha256"], int(r["variant_index"]), int(r["seed"]),
                                   r["sha256"], int(r["width"]), int(r["height"]), parse_params(r["params"]))
                        for r in reader
                    )
                elif name.startswith(AUGMENTATION_SKIPPED_PREFIX):
                    skipped.extend((r["source_path"], r["reason"]) for r in reader)
    for source, reason in skipped:
        log.warning("augmentation skipped %s: %s", source, reason)
    with catalogue.open_connection() as conn:
        result = register_variants(conn, rows)
    result["skipped"] = len(skipped)
    log.info("Variants: %(reported)d reported, %(inserted)d registered now, %(already_registered)d already "
             "registered, %(skipped)d source(s) skipped by the job", result)
    return result
