"""The parts of a job request that come from configuration and the DAG run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import regex

from sku_retraining.config import PipelineConfig
from sku_retraining.jobs.request import FsxTarget, JobSpec

if TYPE_CHECKING:
    from airflow.sdk import Context


#: SageMaker tag values: at most 256 characters of ``[\p{L}\p{Z}\p{N}_.:/=+\-@]*`` (no commas).
TAG_VALUE_MAX = 256
BATCH_IDS_SEPARATOR = " "
_TAG_VALUE_FORBIDDEN = regex.compile(r"[^\p{L}\p{Z}\p{N}_.:/=+\-@]")


def safe_tag_value(value: object) -> str:
    """``value`` as a SageMaker tag value: each character the pattern forbids becomes ``_``,
    and it is cut at 256 characters (a manual run id may hold anything)."""
    return _TAG_VALUE_FORBIDDEN.sub("_", str(value))[:TAG_VALUE_MAX]


def batch_ids_tag(batch_ids: list[str]) -> str:
    """The run's batch ids, space-separated (a comma is not allowed in a tag value; batch ids
    are ``[A-Za-z0-9._-]``, so a space never occurs inside one). Past 256 characters, as many
    whole ids as fit and ``+<n> more``."""
    ids = [str(b) for b in batch_ids]
    value = BATCH_IDS_SEPARATOR.join(ids)
    if len(value) <= TAG_VALUE_MAX:
        return value
    for keep in range(len(ids) - 1, -1, -1):
        value = BATCH_IDS_SEPARATOR.join([*ids[:keep], f"+{len(ids) - keep} more"])
        if len(value) <= TAG_VALUE_MAX:
            return value
    return f"{len(ids)} batches"


def run_tags(context: Context) -> dict[str, str]:
    """Tags that let a job be traced back to its DAG run (SageMaker tag values: <= 256 chars)."""
    ti = context["ti"]
    params = context.get("params") or {}
    tags = {"dag_id": ti.dag_id, "run_id": context["run_id"], "task_id": ti.task_id, "project": "sku-retraining"}
    batch_ids = params.get("batch_ids")
    if batch_ids:
        tags["batch_ids"] = batch_ids_tag(list(batch_ids))
    return {key: safe_tag_value(value) for key, value in tags.items()}


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
