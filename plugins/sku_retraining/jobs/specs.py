"""The parts of a job request that come from configuration and the DAG run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sku_retraining.config import PipelineConfig
from sku_retraining.jobs.request import FsxTarget, JobSpec

if TYPE_CHECKING:
    from airflow.sdk import Context


def run_tags(context: Context) -> dict[str, str]:
    """Tags that let a job be traced back to its DAG run (SageMaker tag values: <= 256 chars)."""
    ti = context["ti"]
    params = context.get("params") or {}
    tags = {"dag_id": ti.dag_id, "run_id": context["run_id"], "task_id": ti.task_id, "project": "sku-retraining"}
    batch_ids = params.get("batch_ids")
    if batch_ids:
        tags["batch_ids"] = ",".join(batch_ids)
    return tags


def base_job_spec(
    cfg: PipelineConfig, context: Context, *, job_name: str, program: str, instance_type: str, **overrides: Any
) -> JobSpec:
    """A :class:`JobSpec` with image, role, VPC, FSx, output path and tags from configuration."""
    sm = cfg.sagemaker
    kind = job_name.split("-")[1] if "-" in job_name else "job"
    values: dict[str, Any] = {
        "job_name": job_name,
        "program": program,
        "image_uri": sm.image_uri,
        "role_arn": sm.role_arn,
        "output_s3_uri": f"s3://{cfg.data_bucket}/{cfg.prefixes.jobs}{kind}/",
        "instance_type": instance_type,
        "volume_size_gb": sm.volume_size_gb,
        "subnets": tuple(sm.subnets),
        "security_group_ids": tuple(sm.security_group_ids),
        "fsx": FsxTarget(cfg.fsx.file_system_id, cfg.fsx.mount_name),
        "network_isolation": sm.enable_network_isolation,
        "tags": run_tags(context),
    }
    values.update(overrides)
    return JobSpec(**values)
