"""The end of the DAG: read the production pointer, apply the gates, promote or reject, report.

Thin glue between the DAG's tasks and :mod:`sku_retraining.gates` (the decision) and
:mod:`sku_retraining.tasks.promotion` (the versioned S3 promotion).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sku_retraining.config import PipelineConfig, load_config_from_airflow

log = logging.getLogger(__name__)


def read_production_pointer(cfg: PipelineConfig | None = None) -> dict:
    """The production pointer, or ``{}`` before the first promotion (an empty dict rather than
    ``None``: a task returning ``None`` pushes no XCom, and its consumers would log errors)."""
    from sku_retraining.tasks.promotion import read_production

    pointer = read_production(cfg) or {}
    if not pointer:
        log.info("No production model yet: this run trains from scratch and has no champion")
    else:
        log.info("Production model: v%04d (%s), promoted %s by %s", pointer["version"], pointer["model_uri"],
                 pointer.get("promoted_at"), pointer.get("dag_run_id"))
    return pointer


def decide_promotion(evaluation_result: Mapping[str, Any], *, params: Mapping[str, Any]) -> dict:
    """Apply the gates from the DAG params; log the table; return ``Decision.as_dict()``."""
    from sku_retraining.gates import Thresholds, decide

    thresholds = Thresholds(
        min_top1=float(params["min_top1"]),
        min_new_sku_top1=float(params["min_new_sku_top1"]),
        max_old_sku_regression=float(params["max_old_sku_regression"]),
    )
    decision = decide((evaluation_result or {}).get("evaluation"), thresholds,
                      force_promote=bool(params.get("force_promote")))
    log.info("Promotion gates (report: %s):\n%s", evaluation_result.get("report_s3_uri"), decision.table())
    return decision.as_dict()


def _notify(cfg: PipelineConfig, subject: str, message: str) -> None:
    """Publish to the configured SNS topic, if any (optional; failures are logged, not raised)."""
    topic = cfg.notifications.sns_topic_arn
    if not topic:
        return
    from airflow.providers.amazon.aws.hooks.sns import SnsHook

    try:
        SnsHook(aws_conn_id=cfg.aws_conn_id).publish_to_target(target_arn=topic, message=message, subject=subject)
    except Exception:  # noqa: BLE001 - a notification must never undo a promotion
        log.exception("Could not notify %s", topic)


def promote_challenger(
    *, run_id: str, snapshot: Mapping, training: Mapping, evaluation: Mapping, decision: Mapping | None,
    cfg: PipelineConfig | None = None,
) -> dict:
    from sku_retraining.tasks.promotion import job_outputs_from_results, lineage_from_results, promote

    cfg = cfg or load_config_from_airflow()
    result = promote(
        run_id=run_id,
        job_outputs=job_outputs_from_results(training=training, snapshot=snapshot, evaluation_result=evaluation),
        lineage=lineage_from_results(training=training, snapshot=snapshot, evaluation_result=evaluation,
                                     decision=decision),
        evaluation=evaluation.get("evaluation"),
        decision=decision,
        cfg=cfg,
    )
    log.info("%s", result["message"])
    _notify(cfg, f"{cfg.model_name} v{result['version']:04d} promoted", result["message"])
    return result


def reject_challenger(
    *, run_id: str, evaluation: Mapping, decision: Mapping, cfg: PipelineConfig | None = None
) -> dict:
    from sku_retraining.tasks.promotion import record_rejection

    cfg = cfg or load_config_from_airflow()
    row = record_rejection(run_id=run_id, reasons=list(decision["reasons"]), gates=list(decision["gates"]), cfg=cfg)
    message = (f"Challenger of run {run_id} rejected, production unchanged: {'; '.join(decision['reasons'])}. "
               f"Report: {evaluation.get('report_s3_uri')}")
    log.warning("%s", message)
    _notify(cfg, f"{cfg.model_name}: challenger rejected", message)
    return row


def summarise_run(*, run_id: str, evaluation: Mapping, cfg: PipelineConfig | None = None) -> dict:
    """One readable block at the end of the run's log."""
    from sku_retraining.tasks.promotion import read_production

    cfg = cfg or load_config_from_airflow()
    pointer = read_production(cfg)
    headline = evaluation.get("evaluation") or {}
    challenger = headline.get("challenger") or {}
    champion = headline.get("champion") or {}

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    summary = {
        "run_id": run_id,
        "production_version": None if pointer is None else pointer["version"],
        "production_from_this_run": pointer is not None and pointer.get("dag_run_id") == run_id,
        "challenger": {k: challenger.get(k) for k in ("top1", "top5", "new_sku_top1", "old_sku_top1")},
        "champion": {k: champion.get(k) for k in ("top1", "old_sku_top1")} if champion else None,
        "report_s3_uri": evaluation.get("report_s3_uri"),
        "report_local_path": evaluation.get("report_local_path"),
    }
    log.info(
        "Run %s: production is %s%s\n  challenger top-1 %s | new SKUs %s | old SKUs %s\n  champion old SKUs %s\n"
        "  report: %s%s",
        run_id,
        "none" if pointer is None else f"v{pointer['version']:04d}",
        " (promoted by this run)" if summary["production_from_this_run"] else "",
        fmt(challenger.get("top1")), fmt(challenger.get("new_sku_top1")), fmt(challenger.get("old_sku_top1")),
        fmt(champion.get("old_sku_top1")) if champion else "n/a (first model)",
        evaluation.get("report_s3_uri"),
        f"\n  local: {evaluation['report_local_path']}" if evaluation.get("report_local_path") else "",
    )
    return summary
