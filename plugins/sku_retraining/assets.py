"""The Airflow ``Asset`` of the production model pointer, for deployment DAGs to schedule on.

Built from the file/environment configuration layers only (no Variable, no network), so it
can be used at DAG parse time.
"""

from __future__ import annotations

from functools import cache

from airflow.sdk import Asset

from sku_retraining.config import load_config


@cache
def production_model_asset() -> Asset:
    cfg = load_config()
    uri = f"s3://{cfg.data_bucket}/{cfg.prefixes.models}{cfg.model_name}/production.json"
    return Asset(name=f"{cfg.model_name}-production", uri=uri, group="model")
