"""The hooks every task uses, built from the configuration's connection ids and region.

Every AWS client of the pipeline comes from :func:`aws_hook`, so ``aws_conn_id`` and
``region_name`` from configuration reach S3, FSx, SNS and SageMaker alike (a deployment in
``eu-west-1`` whose connection carries no region must not talk to ``us-east-1``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from sku_retraining.config import PipelineConfig

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from sku_retraining.hooks.catalogue import CatalogueHook

    H = TypeVar("H", bound=AwsBaseHook)


def aws_hook(cfg: PipelineConfig, hook_class: type[H] | None = None, *, aws_conn_id: str | None = None,
             **kwargs: Any) -> H:
    """``hook_class(aws_conn_id=…, region_name=…, **kwargs)`` from configuration.

    ``hook_class`` defaults to the provider's generic ``AwsBaseHook`` (pass ``client_type``).
    """
    if hook_class is None:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        hook_class = AwsBaseHook
    return hook_class(aws_conn_id=aws_conn_id or cfg.aws_conn_id, region_name=cfg.region_name, **kwargs)


def pipeline_hooks(
    cfg: PipelineConfig, catalogue_conn_id: str | None = None, aws_conn_id: str | None = None
) -> tuple[CatalogueHook, S3Hook]:
    """``(CatalogueHook, S3Hook)`` for ``cfg`` (imported here, not at DAG parse time)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from sku_retraining.hooks.catalogue import CatalogueHook

    return (
        CatalogueHook(postgres_conn_id=catalogue_conn_id or cfg.catalogue_conn_id),
        aws_hook(cfg, S3Hook, aws_conn_id=aws_conn_id),
    )
