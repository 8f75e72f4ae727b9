"""Operator extra links: the buttons on a job task in the Airflow UI.

- :class:`SageMakerTrainingJobLink` / :class:`SageMakerTrainingLogsLink` — the job's page in the
  SageMaker console and its CloudWatch log streams (``/aws/sagemaker/TrainingJobs``, streams
  ``<job name>/algo-N-…``), built on the amazon provider's :class:`BaseAwsLink` (the provider has
  links for transform jobs, not for training jobs);
- :class:`EvaluationReportLink` — the evaluation's HTML report, as a pre-signed S3 URL (it opens
  in the browser; on the local stack the URL points at the local S3 endpoint).

How a link gets its value. Airflow 3 stores each link as the XCom ``_link_<class name>`` when
the task ends, from :meth:`get_link` run in the worker; the UI only reads that XCom. So:

1. at the end of the task, :meth:`get_link` builds the URL from what the task persisted, or
   else from the task's return value (``{"Training": {"TrainingJobName": …}}``): the links
   work for every finished try with no change to ``execute``;
2. :func:`persist_job_links`, called as soon as the job's name is known (started or
   re-attached), stores the parameters *and* the final URL under ``_link_<class name>``, so the
   buttons work while a multi-day job runs or the task is deferred.

Everything here runs at task run time; nothing is read at DAG parse time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

from airflow.providers.amazon.aws.links.base_aws import BASE_AWS_CONSOLE_LINK, BaseAwsLink
from airflow.providers.common.compat.sdk import BaseOperatorLink, XCom

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import TaskInstanceKey
    from airflow.sdk import BaseOperator, Context

    from sku_retraining.config import PipelineConfig

log = logging.getLogger(__name__)

#: A pre-signed URL lives at most 7 days (SigV4); with role credentials, until they expire.
REPORT_URL_EXPIRES_SECONDS = 7 * 24 * 3600
RETURN_VALUE_KEY = "return_value"


def _job_description(ti_key: TaskInstanceKey) -> Mapping[str, Any] | None:
    value = XCom.get_value(key=RETURN_VALUE_KEY, ti_key=ti_key)
    if isinstance(value, Mapping) and isinstance(value.get("Training"), Mapping):
        return value["Training"]
    return None


def _partition(description: Mapping[str, Any] | None) -> str:
    arn = str((description or {}).get("TrainingJobArn") or "")
    parts = arn.split(":")
    return parts[1] if len(parts) > 2 and parts[0] == "arn" else "aws"


class _SageMakerJobLink(BaseAwsLink):
    """A console link for a SageMaker training job; empty on the local backend."""

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        conf = XCom.get_value(key=self.key, ti_key=ti_key)
        if conf:
            return self.format_link(**conf)
        description = _job_description(ti_key)
        if not description:
            return ""
        from sku_retraining.config import load_config_from_airflow

        cfg = load_config_from_airflow()
        if (getattr(operator, "job_backend", None) or cfg.job_backend) != "sagemaker":
            return ""
        return self.format_link(region_name=cfg.region_name, aws_domain=self.get_aws_domain(_partition(description)),
                                job_name=description["TrainingJobName"])


class SageMakerTrainingJobLink(_SageMakerJobLink):
    """The training job's page in the SageMaker console."""

    name = "SageMaker job"
    key = "sku_sagemaker_training_job"
    format_str = BASE_AWS_CONSOLE_LINK + "/sagemaker/home?region={region_name}#/jobs/{job_name}"


class SageMakerTrainingLogsLink(_SageMakerJobLink):
    """The job's log streams in CloudWatch (one per instance; the console's own link)."""

    name = "CloudWatch logs"
    key = "sku_sagemaker_training_logs"
    format_str = (
        BASE_AWS_CONSOLE_LINK
        + "/cloudwatch/home?region={region_name}#logsV2:log-groups/log-group/$252Faws$252Fsagemaker$252FTrainingJobs"
        + "$3FlogStreamNameFilter$3D{job_name}"
    )

    def format_link(self, **kwargs: Any) -> str:
        if "job_name" in kwargs:
            # The console's fragment is itself URL-encoded twice ($25 = %).
            kwargs["job_name"] = quote(quote(str(kwargs["job_name"]), safe=""), safe="").replace("%", "$25")
        return super().format_link(**kwargs)


class EvaluationReportLink(BaseOperatorLink):
    """The evaluation's HTML report (pre-signed S3 URL), published by ``collect_evaluation``."""

    name: ClassVar[str] = "Evaluation report"
    key: ClassVar[str] = "sku_evaluation_report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        conf = XCom.get_value(key=self.key, ti_key=ti_key)
        if conf and conf.get("url"):
            return str(conf["url"])
        description = _job_description(ti_key)
        if not description:
            return ""
        from sku_retraining.config import load_config_from_airflow

        return report_url(load_config_from_airflow(), str(description["TrainingJobName"]))


def report_url(cfg: PipelineConfig, job_name: str, *, expires_in: int = REPORT_URL_EXPIRES_SECONDS) -> str:
    """A pre-signed GET URL of the evaluation job ``job_name``'s HTML report (served as HTML)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from sku_retraining.tasks.evaluation import STANDALONE_REPORT_FILE, report_prefix
    from sku_retraining.tasks.hooks import aws_hook

    key = report_prefix(cfg, job_name) + STANDALONE_REPORT_FILE
    return aws_hook(cfg, S3Hook).generate_presigned_url(
        client_method="get_object",
        params={"Bucket": cfg.data_bucket, "Key": key, "ResponseContentType": "text/html; charset=utf-8"},
        expires_in=expires_in,
    ) or ""


def _push_link(context: Context, link: BaseOperatorLink, operator: BaseOperator) -> None:
    """Store the final URL where the UI reads it (``_link_<class name>``), now, not at task end."""
    ti = context["ti"]
    try:
        url = link.get_link(operator, ti_key=ti)  # type: ignore[arg-type]  # RuntimeTI has the key's fields
    except Exception:  # noqa: BLE001 - a link must never fail the job task
        log.warning("Could not build the %s link", link.name, exc_info=True)
        return
    if url:
        ti.xcom_push(key=link.xcom_key, value=url)


def persist_job_links(context: Context, operator: BaseOperator, *, cfg: PipelineConfig, job_name: str) -> None:
    """Persist the SageMaker console and CloudWatch links of ``job_name`` (sagemaker backend).

    Call it as soon as the job's name is known — started, or re-attached to — and before
    deferring. No-op on the local backend.
    """
    backend = getattr(operator, "job_backend", None) or cfg.job_backend
    if backend != "sagemaker":
        return
    for link_class in (SageMakerTrainingJobLink, SageMakerTrainingLogsLink):
        link_class.persist(context=context, operator=operator, region_name=cfg.region_name, aws_partition="aws",
                           job_name=job_name)
        _push_link(context, link_class(), operator)
