"""The intake half of the pipeline as plain functions: the DAG's tasks call these.

Each function is idempotent: called twice with the same inputs it leaves the same state.
Hooks are imported here, not at module level of the DAG, to keep DAG parsing light.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sku_contracts.ids import InvalidIdError, check_id
from sku_retraining.config import PipelineConfig, load_config_from_airflow
from sku_retraining.layout import BatchLayout
from sku_retraining.tasks.hooks import pipeline_hooks
from sku_retraining.templated import as_list

log = logging.getLogger(__name__)

from sku_contracts.files import EVALUATION_CONTEXT_FILE  # noqa: E402


@dataclass
class NewBatches:
    batch_ids: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def _normalise_ids(value: list[str] | str | None) -> list[str]:
    """Sorted, de-duplicated, validated batch ids from a list or its rendered template."""
    return sorted({check_id("batch_id", v) for v in as_list(value)})


def find_new_batches(
    *,
    explicit_batch_ids: list[str] | str | None = None,
    catalogue_conn_id: str | None = None,
    aws_conn_id: str | None = None,
    run_id: str | None = None,
    cfg: PipelineConfig | None = None,
) -> NewBatches:
    """Complete, valid batches the catalogue has not registered (see ``NewSkuBatchSensor``)."""
    from sku_retraining.catalogue.registration import record_rejection
    from sku_retraining.intake import discover_complete_batches, read_manifest
    from sku_retraining.manifest import ManifestError

    cfg = cfg or load_config_from_airflow()
    catalogue, s3 = pipeline_hooks(cfg, catalogue_conn_id, aws_conn_id)
    bucket, incoming = cfg.data_bucket, cfg.prefixes.incoming
    result = NewBatches()

    try:
        explicit = _normalise_ids(explicit_batch_ids)
    except InvalidIdError as exc:
        raise ValueError(f"param batch_ids: {exc}") from None
    if explicit:
        problems = []
        for batch_id in explicit:
            layout = BatchLayout(incoming, batch_id)
            if s3.head_object(key=layout.success_key, bucket_name=bucket) is None:
                problems.append(f"batch {batch_id!r} is not complete: s3://{bucket}/{layout.success_key} is missing")
                continue
            try:
                read_manifest(s3, bucket, layout)
            except ManifestError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("param batch_ids names unusable batches: " + "; ".join(problems))
        result.batch_ids = explicit
        return result

    complete, invalid = discover_complete_batches(s3, bucket, incoming)
    result.messages.extend(f"ignoring folder under s3://{bucket}/{incoming}: {m}" for m in invalid)
    known = catalogue.known_batches()
    for batch in complete:
        status, seen_marker = known.get(batch.batch_id, (None, None))
        if status == "registered":
            continue
        if status == "rejected" and seen_marker is not None and batch.marker_last_modified <= seen_marker:
            continue
        try:
            read_manifest(s3, bucket, BatchLayout(incoming, batch.batch_id))
        except ManifestError as exc:
            result.messages.append(f"{exc} — marked rejected in the catalogue")
            with catalogue.open_connection() as conn:
                record_rejection(
                    conn, batch.batch_id, exc.reason,
                    marker_last_modified=batch.marker_last_modified, run_id=run_id,
                )
            continue
        result.batch_ids.append(batch.batch_id)
    return result


def migrate_catalogue(cfg: PipelineConfig | None = None) -> list[str]:
    cfg = cfg or load_config_from_airflow()
    catalogue, _ = pipeline_hooks(cfg)
    applied = catalogue.migrate()
    log.info("Catalogue migrations applied: %s", ", ".join(applied) if applied else "none (up to date)")
    return applied


def register_batches(
    batch_ids: list[str], *, run_id: str, dry_run: bool = False, cfg: PipelineConfig | None = None
) -> list[dict]:
    """Inspect and register each batch; one failing manifest never blocks the others.

    Each batch is its own transaction. Returns one result dict per batch (status
    ``registered``, ``already_registered`` or ``rejected``) and logs a readable table.
    """
    from sku_retraining.catalogue.registration import RegistrationResult, record_rejection, register_batch
    from sku_retraining.intake import inspect_batch_images, read_manifest
    from sku_retraining.manifest import ManifestError

    cfg = cfg or load_config_from_airflow()
    catalogue, s3 = pipeline_hooks(cfg)
    results: list[dict] = []
    for batch_id in _normalise_ids(batch_ids):
        layout = BatchLayout(cfg.prefixes.incoming, batch_id)
        head = s3.head_object(key=layout.success_key, bucket_name=cfg.data_bucket)
        marker_time = head["LastModified"] if head else None
        try:
            manifest = read_manifest(s3, cfg.data_bucket, layout)
        except ManifestError as exc:
            log.error("%s", exc)
            if not dry_run:
                with catalogue.open_connection() as conn:
                    record_rejection(conn, batch_id, exc.reason, marker_last_modified=marker_time, run_id=run_id)
            results.append(RegistrationResult(batch_id, "rejected", rejection_reason=exc.reason).as_dict())
            continue
        staged = inspect_batch_images(s3, cfg.data_bucket, layout, cfg.intake)
        with catalogue.open_connection() as conn:
            result = register_batch(
                conn, manifest, staged, split=cfg.split, run_id=run_id,
                marker_last_modified=marker_time, commit=not dry_run,
            )
            if result.n_quarantined:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT object_key, reason_code, reason FROM quarantine WHERE batch_id = %s "
                        "ORDER BY object_key LIMIT 50",
                        (batch_id,),
                    )
                    for key, code, reason in cur.fetchall():
                        log.warning("quarantined %s [%s]: %s", key, code, reason)
        results.append(result.as_dict())
    if not dry_run:
        _record_late_objects(catalogue, s3, cfg)
    _log_registration_table(results, dry_run)
    return results


def _record_late_objects(catalogue, s3, cfg: PipelineConfig) -> dict[str, list[str]]:
    """Every registered batch's ``images/`` listed again: an object the catalogue holds neither
    as an image nor in quarantine arrived after registration (``_SUCCESS`` written before the
    upload finished, or a re-upload adding keys) and is quarantined ``late_object`` with its
    times, so nothing uploaded is silently lost. Listing only (no download): a few LIST calls
    per thousand objects, once per registering run.
    """
    from sku_retraining.catalogue.registration import record_late_objects

    with catalogue.open_connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT batch_id FROM batches WHERE status = 'registered' ORDER BY batch_id")
        registered = [b for (b,) in cur.fetchall()]
    late: dict[str, list[str]] = {}
    for batch_id in registered:
        layout = BatchLayout(cfg.prefixes.incoming, batch_id)
        objects = [
            (o["Key"], o.get("LastModified"))
            for o in s3.iter_file_metadata(prefix=layout.images_prefix, bucket_name=cfg.data_bucket)
            if not o["Key"].endswith("/")
        ]
        with catalogue.open_connection() as conn:
            keys = record_late_objects(conn, batch_id, objects, layout.images_prefix)
        if keys:
            late[batch_id] = keys
            log.warning("batch %s: %d object(s) uploaded after its registration, quarantined late_object: %s",
                        batch_id, len(keys), ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
    return late


def _log_registration_table(results: list[dict], dry_run: bool) -> None:
    header = f"{'batch':<24} {'status':<20} {'images':>7} {'quarant.':>8} {'new SKUs':>8}  splits / reason"
    lines = [("DRY RUN (nothing written) — " if dry_run else "") + "Batch registration:", header, "-" * len(header)]
    for r in results:
        detail = r.get("rejection_reason") or " ".join(f"{k}={v}" for k, v in r.get("splits", {}).items())
        lines.append(
            f"{r['batch_id']:<24} {r['status']:<20} {r['n_images']:>7} {r['n_quarantined']:>8} "
            f"{len(r['new_skus']):>8}  {detail}"
        )
    log.info("\n".join(lines))


def import_batches_to_fsx(batch_ids: list[str], cfg: PipelineConfig | None = None) -> int:
    """Make the registered images of ``batch_ids`` visible on FSx (see :mod:`sku_retraining.fsx`)."""
    from sku_retraining import fsx

    cfg = cfg or load_config_from_airflow()
    catalogue, s3 = pipeline_hooks(cfg)
    batch_ids = _normalise_ids(batch_ids)
    if not batch_ids:
        return 0
    if cfg.job_backend == "sagemaker":
        from sku_retraining.tasks.hooks import aws_hook

        client = aws_hook(cfg, client_type="fsx").get_conn()
        # Import tasks name S3 paths (s3://bucket/prefix), not file-system paths.
        paths = [fsx.s3_import_path(cfg.data_bucket, BatchLayout(cfg.prefixes.incoming, b).prefix) for b in batch_ids]
        task_ids = fsx.import_prefixes_to_aws_fsx(client, cfg.fsx.file_system_id, paths)
        log.info("FSx import task(s) %s done for %s", ", ".join(task_ids), ", ".join(paths))
        return len(paths)
    with catalogue.open_connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT fsx_path FROM images WHERE batch_id = ANY(%s) AND source_sha256 IS NULL", (batch_ids,))
        keys = [row[0] for row in cur.fetchall()]
    written = fsx.import_objects_to_local_fsx(
        s3, cfg.data_bucket, keys, cfg.fsx.local_path(), workers=cfg.intake.download_workers
    )
    log.info("Local FSx %s: %d of %d images copied (the rest were there)", cfg.fsx.local_path(), written, len(keys))
    return written


def export_manifests(*, run_id: str, batch_ids: list[str], cfg: PipelineConfig | None = None) -> dict:
    """Export train/val/test manifests + classes.json to S3 and FSx; record the snapshot.

    Content-addressed (``datasets/<snapshot_id>/``): re-running writes the same objects.
    """
    from sku_retraining import fsx
    from sku_retraining.catalogue.export import export_manifests as export

    cfg = cfg or load_config_from_airflow()
    catalogue, s3 = pipeline_hooks(cfg)
    batch_ids = _normalise_ids(batch_ids)
    with tempfile.TemporaryDirectory(prefix="manifests-") as tmp:
        with catalogue.open_connection() as conn:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT sku_id FROM skus WHERE first_batch_id = ANY(%s) ORDER BY sku_id", (batch_ids,)
                )
                new_sku_ids = [row[0] for row in cur.fetchall()]
            # What the evaluation job needs to know about this run (which SKUs are new).
            context = {"batch_ids": batch_ids, "new_sku_ids": new_sku_ids}
            exported = export(
                conn, Path(tmp), extra_files={EVALUATION_CONTEXT_FILE: (json.dumps(context, indent=1) + "\n").encode()}
            )
        if exported.counts["train"] == 0:
            raise ValueError("the catalogue has no train images: nothing to train on")
        relative = f"{cfg.prefixes.datasets}{exported.snapshot_id}/"
        for name in exported.files:
            s3.load_file(Path(tmp) / name, key=relative + name, bucket_name=cfg.data_bucket, replace=True)
        if cfg.job_backend == "local":
            target = fsx.safe_local_path(cfg.fsx.local_path(), relative)
            if not target.exists():
                # Content-addressed: a concurrent run exporting the same snapshot writes the same
                # bytes, so whichever rename lands first wins and the other's copy is dropped.
                staging = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.tmp")
                shutil.copytree(tmp, staging)
                try:
                    staging.replace(target)
                except OSError:
                    if not target.is_dir():
                        raise
                    shutil.rmtree(staging, ignore_errors=True)
    snapshot = {
        "snapshot_id": exported.snapshot_id,
        "s3_uri": f"s3://{cfg.data_bucket}/{relative}",
        "fsx_path": relative,
        "counts": exported.counts,
        "num_classes": exported.num_classes,
        "files": exported.files,
        "batch_ids": batch_ids,
        "new_sku_ids": new_sku_ids,
    }
    with catalogue.open_connection() as conn, conn.transaction(), conn.cursor() as cur:
        cur.execute(
            """INSERT INTO dataset_snapshots (dag_run_id, snapshot_id, batch_ids, num_classes, counts,
                                              manifest_sha256, s3_prefix, fsx_path)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (dag_run_id) DO UPDATE SET snapshot_id = EXCLUDED.snapshot_id,
                   batch_ids = EXCLUDED.batch_ids, num_classes = EXCLUDED.num_classes,
                   counts = EXCLUDED.counts, manifest_sha256 = EXCLUDED.manifest_sha256,
                   s3_prefix = EXCLUDED.s3_prefix, fsx_path = EXCLUDED.fsx_path""",
            (
                run_id, exported.snapshot_id, snapshot["batch_ids"], exported.num_classes,
                json.dumps(exported.counts), json.dumps(exported.files), snapshot["s3_uri"], relative,
            ),
        )
    log.info(
        "Dataset snapshot %s: %s, %d classes -> %s",
        exported.snapshot_id, exported.counts, exported.num_classes, snapshot["s3_uri"],
    )
    return snapshot
