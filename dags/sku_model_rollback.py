"""
### SKU model rollback — point production back at an earlier verified model version

Manual only. Trigger it from the UI form with the version to restore (`target_version`);
leave it empty to go back to the version production replaced last (`previous_version` in
`models/<model_name>/production.json`).

Before the pointer moves, every object of the target version (`v<NNNN>/model.tar.gz`,
`classes.json`, `evaluation.json`, the report, `lineage.json`) is checked against the sizes
and sha256 recorded when it was promoted; a missing or altered object refuses the rollback
with the object's name, and production stays as it was. The change is recorded in the
catalogue (`production_history`) and updates the production-model Asset, so deployment DAGs
scheduled on it pick the restored version up.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from sku_retraining.assets import production_model_asset


@dag(
    dag_id="sku_model_rollback",
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["sku-retraining", "ml", "rollback"],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
    },
    params={
        "target_version": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Target version",
            description="The model version to restore (e.g. 3 for v0003). Empty: the previous version.",
        ),
    },
)
def sku_model_rollback():
    @task(outlets=[production_model_asset()])
    def rollback_production() -> dict:
        from sku_retraining.tasks.promotion import rollback

        context = get_current_context()
        result = rollback(target_version=context["params"]["target_version"], run_id=context["run_id"])
        print(result["message"])
        return result

    rollback_production()


sku_model_rollback()
