"""Step 6 of the DAG as plain functions: promote the challenger, or record why not; roll back.

Promotion is

* **versioned**: each DAG run that promotes gets the next ``v<NNNN>``, allocated once in the
  catalogue DB (a retry reuses it; numbers are never reused);
* **atomic**: the version's objects are copied and verified first, production.json is
  rewritten last in one PutObject; a failure before that leaves production as it was;
* **idempotent**: running the task again for the same run gives the same version, the same
  objects and bytes, one production_history row;
* **reversible**: :func:`rollback` points production back at a verified earlier version.

S3 and the DB cannot share a transaction, so the pointer is written *inside* the DB
transaction that records it, under the model's advisory lock: if the DB commit fails after
the pointer was written, the retry finds the pointer already naming this run's version and
only records it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sku_retraining.config import PipelineConfig, load_config_from_airflow

log = logging.getLogger(__name__)


class RollbackError(RuntimeError):
    """The rollback was refused; the message says why (production is unchanged)."""


def _clients(cfg: PipelineConfig):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.config import Config

    from sku_retraining.tasks.hooks import aws_hook, pipeline_hooks

    catalogue, _ = pipeline_hooks(cfg)
    # Every object is verified by its own SHA-256 here; the SDK's optional CRC check on reads
    # adds nothing and trips on S3 emulators that misreport the checksum of a server-side
    # copy of a multipart object.
    s3 = aws_hook(cfg, S3Hook, config=Config(response_checksum_validation="when_required"))
    return catalogue, s3.get_conn()


def _now_iso() -> str:
    from sku_retraining.catalogue.models import iso_utc

    return iso_utc(datetime.now(UTC))


def _decision_fields(decision: Mapping[str, Any] | str | None) -> tuple[str | None, list | None, list | None]:
    """A :class:`~sku_retraining.gates.Decision` dict (or just its name) -> name, reasons, gates."""
    if decision is None:
        return None, None, None
    if isinstance(decision, str):
        return decision, None, None
    return decision["decision"], decision.get("reasons"), decision.get("gates")


def promote(
    *,
    run_id: str,
    job_outputs: Mapping[str, Any],
    lineage: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None,
    decision: Mapping[str, Any] | str | None = None,
    cfg: PipelineConfig | None = None,
) -> dict[str, Any]:
    """Promote this run's model to production (see the module docstring for the guarantees).

    :param job_outputs: ``model_tar_uri`` (s3:// of the training job's model.tar.gz),
        ``classes_json`` and ``evaluation_json`` (bytes or s3:// URI), ``report_dir`` (a local
        folder, an s3:// prefix, or ``None``).
    :param lineage: facts for lineage.json (batches, dataset, jobs, image_uri, metrics...);
        see :func:`lineage_from_results`.
    :param evaluation: the evaluation headline, kept in the catalogue with the version.
    :param decision: the branch's decision (``Decision.as_dict()``, or ``"promote"`` /
        ``"force_promote"``), recorded in model_decisions with the version.
    :returns: ``{"status": "promoted" | "already_promoted", "model_name", "version",
        "previous_version", "production_version", "dag_run_id", "s3_prefix", "model_uri",
        "lineage_uri", "pointer_uri", "promoted_at", "objects", "message"}``.
    :raises PromotionError: nothing was pointed at (production.json is unchanged).
    """
    from sku_retraining import promotion as s3p
    from sku_retraining.catalogue import models

    cfg = cfg or load_config_from_airflow()
    catalogue, client = _clients(cfg)
    layout = s3p.ModelLayout.from_config(cfg)
    name = cfg.model_name
    decision_name, reasons, gates = _decision_fields(decision)
    if decision_name not in (None, "promote", "force_promote"):
        raise s3p.PromotionError(f"promote was called with decision {decision_name!r}")
    s3p.check_job_outputs(job_outputs)

    with catalogue.open_connection() as conn:
        recorded = models.get_decision(conn, name, run_id)
        if decision_name is None and recorded is not None and recorded["decision"] == "reject":
            raise s3p.PromotionError(
                f"run {run_id!r} was rejected ({'; '.join(recorded['reasons']) or 'no reasons recorded'}); "
                "pass a promote decision to override"
            )
        # (1) The run's version number, allocated once.
        staged = models.allocate_version(conn, model_name=name, run_id=run_id, s3_prefix_for=layout.version_uri)
        version = staged.version
        if staged.status == "promoted":
            # Already done by an earlier try of this task: touch nothing in S3.
            models.record_decision(conn, model_name=name, run_id=run_id, decision=decision_name or "promote",
                                   reasons=reasons, gates=gates, version=version)
            current = s3p.read_pointer(client, layout)
            result = _promote_result(layout, staged.as_dict(), run_id, current, "already_promoted")
            log.info("%s", result["message"])
            return result

        # (2) + (3) Copy every object into v<NNNN>/ and verify it.
        log.info("Staging %s v%04d for run %s under %s", name, version, run_id, layout.version_uri(version))
        objects, source_etag = s3p.stage_version(client, layout, version, job_outputs)
        s3p.verify_objects(client, layout, version, objects, content=True, model_source_etag=source_etag)

        # (4) lineage.json, with the table of the verified objects.
        lineage_doc = s3p.build_lineage(
            layout=layout, version=version, run_id=run_id, created_at=models.iso_utc(staged.created_at),
            source_model_uri=job_outputs["model_tar_uri"], objects=objects, lineage=lineage,
        )
        lineage_key = layout.key(version, s3p.LINEAGE_FILE)
        objects = dict(sorted({
            **objects,
            s3p.LINEAGE_FILE: s3p.put_bytes(client, layout.bucket, lineage_key, s3p.json_bytes(lineage_doc),
                                            content_type="application/json"),
        }.items()))
        s3p.verify_objects(client, layout, version, {s3p.LINEAGE_FILE: objects[s3p.LINEAGE_FILE]})

        # (5) + (6) The pointer, last, and its record, under the model's lock.
        with conn.transaction():
            models.lock_model(conn, name)
            current = s3p.read_pointer(client, layout)
            if current is not None and current["version"] == version:
                # Written by an earlier try that died before its DB commit: keep it as it is.
                pointer = current
            else:
                if current is not None and current["version"] > version and current["action"] == "promote":
                    raise s3p.PromotionError(
                        f"production already serves {name} v{current['version']:04d}, newer than this run's "
                        f"v{version:04d}; not replacing it (use rollback to choose a version explicitly)"
                    )
                pointer = s3p.build_pointer(
                    layout=layout, version=version,
                    previous_version=None if current is None else current["version"],
                    run_id=run_id, action="promote", promoted_at=_now_iso(), objects=objects,
                )
                s3p.write_pointer(client, layout, pointer)
            promoted_at = models.parse_iso_utc(pointer["promoted_at"])
            models.mark_promoted(conn, model_name=name, version=version, promoted_at=promoted_at,
                                 objects=objects, lineage=lineage_doc,
                                 evaluation=None if evaluation is None else dict(evaluation))
            models.record_pointer_change(conn, model_name=name, version=version,
                                         previous_version=pointer["previous_version"], action="promote",
                                         run_id=run_id, created_at=promoted_at)
            models.record_decision(conn, model_name=name, run_id=run_id, decision=decision_name or "promote",
                                   reasons=reasons, gates=gates, version=version)
        promoted = models.version_for_run(conn, name, run_id)
    result = _promote_result(layout, promoted.as_dict(), run_id, pointer, "promoted")
    log.info("%s", result["message"])
    return result


def _promote_result(layout, version_row: dict, run_id: str, pointer: dict | None, status: str) -> dict[str, Any]:
    from sku_retraining import promotion as s3p

    version = version_row["version"]
    ours = pointer is not None and pointer["version"] == version
    production = None if pointer is None else pointer["version"]
    if status == "promoted":
        message = f"{layout.model_name} v{version:04d} is in production ({layout.pointer_uri})"
    else:
        message = (
            f"run {run_id} already promoted {layout.model_name} v{version:04d} at {version_row['promoted_at']}; "
            + ("it is still in production" if ours else f"production now serves v{production:04d}" if production
               else "production.json is missing")
        )
    return {
        "status": status,
        "model_name": layout.model_name,
        "version": version,
        "previous_version": pointer["previous_version"] if ours else None,
        "production_version": production,
        "dag_run_id": run_id,
        "s3_prefix": version_row["s3_prefix"],
        "model_uri": layout.uri(layout.key(version, s3p.MODEL_FILE)),
        "lineage_uri": layout.uri(layout.key(version, s3p.LINEAGE_FILE)),
        "pointer_uri": layout.pointer_uri,
        "promoted_at": version_row["promoted_at"],
        "objects": version_row["objects"],
        "message": message,
    }


def record_decision(
    *,
    run_id: str,
    decision: str,
    reasons: list[str] | None = None,
    gates: list[dict[str, Any]] | None = None,
    cfg: PipelineConfig | None = None,
) -> dict[str, Any]:
    """Record the branch's decision for the run (idempotent upsert; the last call wins).

    :returns: the stored row: ``{"model_name", "dag_run_id", "decision", "reasons", "gates",
        "version", "created_at"}``.
    """
    from sku_retraining.catalogue import models

    cfg = cfg or load_config_from_airflow()
    catalogue, _ = _clients(cfg)
    with catalogue.open_connection() as conn:
        models.record_decision(conn, model_name=cfg.model_name, run_id=run_id, decision=decision,
                               reasons=reasons, gates=gates)
        return models.get_decision(conn, cfg.model_name, run_id)


def record_rejection(
    *, run_id: str, reasons: list[str], gates: list[dict[str, Any]], cfg: PipelineConfig | None = None
) -> dict[str, Any]:
    """Record that the run's challenger was rejected, and why. Nothing is written to S3."""
    row = record_decision(run_id=run_id, decision="reject", reasons=list(reasons), gates=list(gates), cfg=cfg)
    log.warning("Challenger of run %s rejected: %s", run_id, "; ".join(reasons) or "(no reasons given)")
    return row


def read_production(cfg: PipelineConfig | None = None) -> dict[str, Any] | None:
    """The production pointer (production.json), or ``None`` when nothing was promoted yet."""
    from sku_retraining import promotion as s3p

    cfg = cfg or load_config_from_airflow()
    _, client = _clients(cfg)
    return s3p.read_pointer(client, s3p.ModelLayout.from_config(cfg))


def rollback(
    *,
    target_version: int | None = None,
    run_id: str,
    verify_content: bool = True,
    cfg: PipelineConfig | None = None,
) -> dict[str, Any]:
    """Point production at an earlier promoted version (default: the pointer's previous one).

    The target's objects are checked against the object table recorded when it was promoted
    (size and sha256 metadata; with ``verify_content`` also the bytes) before the pointer is
    rewritten. Rolling back to the version in production is a no-op that says so; so is a
    retry of a rollback this run already made.

    :returns: ``{"status": "rolled_back" | "noop", "model_name", "version",
        "previous_version", "dag_run_id", "s3_prefix", "model_uri", "pointer_uri",
        "message"}``.
    :raises RollbackError: no pointer, no previous version, target never promoted, or its
        objects fail verification (the message names them). Production is unchanged.
    """
    from sku_retraining import promotion as s3p
    from sku_retraining.catalogue import models

    cfg = cfg or load_config_from_airflow()
    catalogue, client = _clients(cfg)
    layout = s3p.ModelLayout.from_config(cfg)
    name = cfg.model_name
    if target_version is not None and (isinstance(target_version, bool) or int(target_version) < 1):
        raise RollbackError(f"target_version must be an integer >= 1, got {target_version!r}")

    with catalogue.open_connection() as conn, conn.transaction():
        models.lock_model(conn, name)
        current = s3p.read_pointer(client, layout)
        if current is None:
            raise RollbackError(f"no production pointer at {layout.pointer_uri}: nothing to roll back")
        serving = current["version"]
        already_ours = current["action"] == "rollback" and current["dag_run_id"] == run_id
        if target_version is None:
            if already_ours:
                # A retry of this run's rollback: the default target has moved, do not flip back.
                target = serving
            elif current["previous_version"] is None:
                raise RollbackError(f"production {name} v{serving:04d} has no previous version to roll back to")
            else:
                target = current["previous_version"]
        else:
            target = int(target_version)

        if target == serving:
            if already_ours:
                # The pointer may have been written by a try that died before its DB commit.
                models.record_pointer_change(
                    conn, model_name=name, version=serving, previous_version=current["previous_version"],
                    action="rollback", run_id=run_id, created_at=models.parse_iso_utc(current["promoted_at"]),
                )
            message = f"{name} v{serving:04d} is already in production: nothing to roll back"
            log.info("%s", message)
            return _rollback_result(layout, current, run_id, "noop", message)

        row = models.get_version(conn, name, target)
        if row is None:
            raise RollbackError(f"{name} has no version {target} in the catalogue")
        if row.status != "promoted":
            raise RollbackError(
                f"{name} v{target:04d} was never promoted (status {row.status}): its objects were never verified"
            )
        try:
            s3p.verify_objects(client, layout, target, row.objects, content=verify_content)
        except s3p.VerificationError as exc:
            raise RollbackError(f"refusing to roll back to {name} v{target:04d}: {exc}") from exc

        pointer = s3p.build_pointer(
            layout=layout, version=target, previous_version=serving, run_id=run_id, action="rollback",
            promoted_at=_now_iso(), objects=row.objects,
        )
        s3p.write_pointer(client, layout, pointer)
        models.record_pointer_change(
            conn, model_name=name, version=target, previous_version=serving, action="rollback",
            run_id=run_id, created_at=models.parse_iso_utc(pointer["promoted_at"]),
        )
    message = f"rolled back {name} from v{serving:04d} to v{target:04d} ({layout.pointer_uri})"
    log.warning("%s", message)
    return _rollback_result(layout, pointer, run_id, "rolled_back", message)


def _rollback_result(layout, pointer: dict, run_id: str, status: str, message: str) -> dict[str, Any]:
    return {
        "status": status,
        "model_name": layout.model_name,
        "version": pointer["version"],
        "previous_version": pointer["previous_version"],
        "dag_run_id": run_id,
        "s3_prefix": pointer["s3_prefix"],
        "model_uri": pointer["model_uri"],
        "pointer_uri": layout.pointer_uri,
        "message": message,
    }


def job_outputs_from_results(
    *, training: Mapping[str, Any], snapshot: Mapping[str, Any], evaluation_result: Mapping[str, Any]
) -> dict[str, Any]:
    """``job_outputs`` for :func:`promote` from the XComs of the train task (``{"Training":
    description}``), export_manifests and collect_evaluation."""
    description = training.get("Training", training)
    model_uri = (description.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    if not model_uri:
        raise ValueError(f"training job {description.get('TrainingJobName')!r} reported no S3ModelArtifacts")
    return {
        "model_tar_uri": model_uri,
        "classes_json": snapshot["s3_uri"].rstrip("/") + "/classes.json",
        "evaluation_json": evaluation_result["evaluation_s3_uri"],
        "report_dir": evaluation_result.get("report_s3_prefix"),
    }


def lineage_from_results(
    *,
    training: Mapping[str, Any],
    snapshot: Mapping[str, Any],
    evaluation_result: Mapping[str, Any],
    decision: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The facts for lineage.json: batches, dataset snapshot and its manifest hashes, job
    names, training image, training and evaluation metrics, the gate decision."""
    description = training.get("Training", training)
    evaluation = evaluation_result.get("evaluation") or {}
    challenger = evaluation.get("challenger") or {}
    return {
        "batches": list(snapshot.get("batch_ids", [])),
        "dataset": {
            "snapshot_id": snapshot.get("snapshot_id"),
            "s3_uri": snapshot.get("s3_uri"),
            "counts": snapshot.get("counts"),
            "num_classes": snapshot.get("num_classes"),
            "manifest_sha256": snapshot.get("files"),
        },
        "jobs": {
            "training": description.get("TrainingJobName"),
            "evaluation": evaluation_result.get("evaluation_job"),
        },
        "image_uri": (description.get("AlgorithmSpecification") or {}).get("TrainingImage"),
        "hyperparameters": description.get("HyperParameters"),
        "metrics": {
            "training": {m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList") or []},
            "evaluation": {k: v for k, v in challenger.items() if isinstance(v, int | float | str | None)},
        },
        "decision": None if decision is None else {k: decision.get(k) for k in ("decision", "reasons", "forced")},
    }
