"""The hooks every task uses, built from the configuration's connection ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sku_retraining.config import PipelineConfig

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from sku_retraining.hooks.catalogue import CatalogueHook


def pipeline_hooks(
    cfg: PipelineConfig, catalogue_conn_id: str | None = None, aws_conn_id: str | None = None
) -> tuple[CatalogueHook, S3Hook]:
    """``(CatalogueHook, S3Hook)`` for ``cfg`` (imported here, not at DAG parse time)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from sku_retraining.hooks.catalogue import CatalogueHook

    return (
        CatalogueHook(postgres_conn_id=catalogue_conn_id or cfg.catalogue_conn_id),
        S3Hook(aws_conn_id=aws_conn_id or cfg.aws_conn_id),
    )
