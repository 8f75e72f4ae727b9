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


def _notify(
    cfg: PipelineConfig, event: str, *, run_id: str, subject: str, message: str,
    context: Mapping[str, Any] | None, task_id: str,
) -> list[str]:
    """The promote/reject notification, through :mod:`sku_retraining.notifications` (the
    provider notifiers the configuration names; failures are logged there, never raised)."""
    from sku_retraining.notifications import dag_id_from_context, decision_notice, send

    notice = decision_notice(event, dag_id=dag_id_from_context(context or {}), run_id=run_id, subject=subject,
                             message=message, task_id=task_id)
    return send(notice, context, cfg=cfg)


def promote_challenger(
    *, run_id: str, snapshot: Mapping, training: Mapping, evaluation: Mapping, decision: Mapping | None,
    cfg: PipelineConfig | None = None, context: Mapping[str, Any] | None = None,
) -> dict:
    """Promote the challenger (:func:`~sku_retraining.tasks.promotion.promote`) and say so on the
    configured notification channels (``context``: the task's, for the run's link)."""
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
    _notify(cfg, "promoted", run_id=run_id, subject=f"{cfg.model_name} v{result['version']:04d} promoted",
            message=f"{result['message']}\nEvaluation report: {evaluation.get('report_s3_uri')}",
            context=context, task_id="promote_model")
    return result


def reject_challenger(
    *, run_id: str, evaluation: Mapping, decision: Mapping, cfg: PipelineConfig | None = None,
    context: Mapping[str, Any] | None = None,
) -> dict:
    """Record the rejection with its reasons and say so on the configured notification channels."""
    from sku_retraining.tasks.promotion import record_rejection

    cfg = cfg or load_config_from_airflow()
    row = record_rejection(run_id=run_id, reasons=list(decision["reasons"]), gates=list(decision["gates"]), cfg=cfg)
    message = (f"Challenger of run {run_id} rejected, production unchanged.\n"
               f"Reasons: {'; '.join(decision['reasons'])}\n"
               f"Evaluation report: {evaluation.get('report_s3_uri')}")
    log.warning("%s", message)
    _notify(cfg, "rejected", run_id=run_id, subject=f"{cfg.model_name}: challenger rejected", message=message,
            context=context, task_id="reject_model")
    return row


def summary_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns in a box, for the task log (monospace in the Airflow UI)."""
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    rule = f"+-{'-' * width}-+-{'-' * value_width}-+"
    lines = [rule, *(f"| {k:<{width}} | {v:<{value_width}} |" for k, v in rows), rule]
    return "\n".join(lines)


def summarise_run(
    *, run_id: str, evaluation: Mapping, decision: Mapping | None = None, cfg: PipelineConfig | None = None,
) -> dict:
    """The run's summary table at the end of the log (``finish``): outcome and why, production,
    the challenger's and the champion's numbers, where the report is. Returns the same as a dict.

    :param decision: ``decide``'s ``Decision.as_dict()`` (``None`` when the run stopped before it).
    """
    from sku_retraining.tasks.promotion import read_production

    cfg = cfg or load_config_from_airflow()
    pointer = read_production(cfg)
    headline = evaluation.get("evaluation") or {}
    challenger = headline.get("challenger") or {}
    champion = headline.get("champion") or {}

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    from_this_run = pointer is not None and pointer.get("dag_run_id") == run_id
    if decision is None:
        outcome = "no decision (the run stopped before the gates)"
    elif from_this_run:
        outcome = "PROMOTED" + (" (force_promote)" if decision.get("forced") else "")
    elif decision.get("promote"):
        outcome = "promotion decided, not (yet) in production: see promote_model"
    else:
        outcome = "REJECTED: " + "; ".join(decision.get("reasons") or ["see decide"])
    summary = {
        "run_id": run_id,
        "outcome": outcome,
        "production_version": None if pointer is None else pointer["version"],
        "production_from_this_run": from_this_run,
        "challenger": {k: challenger.get(k) for k in ("top1", "top5", "new_sku_top1", "old_sku_top1")},
        "champion": {k: champion.get(k) for k in ("top1", "old_sku_top1")} if champion else None,
        "report_s3_uri": evaluation.get("report_s3_uri"),
        "report_local_path": evaluation.get("report_local_path"),
    }
    rows = [
        ("run", run_id),
        ("outcome", outcome),
        ("production", "none" if pointer is None else
         f"v{pointer['version']:04d}" + (" (promoted by this run)" if from_this_run else " (unchanged)")),
        ("challenger top-1 / top-5", f"{fmt(challenger.get('top1'))} / {fmt(challenger.get('top5'))}"),
        ("challenger new-SKU top-1", fmt(challenger.get("new_sku_top1"))),
        ("challenger old-SKU top-1", fmt(challenger.get("old_sku_top1"))),
        ("champion top-1 / old-SKU", f"{fmt(champion.get('top1'))} / {fmt(champion.get('old_sku_top1'))}"
         if champion else "n/a (first model)"),
        ("evaluation report", str(evaluation.get("report_s3_uri"))),
    ]
    if evaluation.get("report_local_path"):
        rows.append(("report (local copy)", str(evaluation["report_local_path"])))
    log.info("Run summary:\n%s", summary_table(rows))
    return summary
