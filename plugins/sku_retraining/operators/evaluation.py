"""``SkuEvaluationOperator``: score challenger and champion on the same test split (``evaluate.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sku_retraining.config import PipelineConfig
from sku_retraining.operators.links import (
    EvaluationReportLink,
    SageMakerTrainingJobLink,
    SageMakerTrainingLogsLink,
)
from sku_retraining.operators.sagemaker_job import SkuSageMakerJobOperator

if TYPE_CHECKING:
    from airflow.sdk import Context


class SkuEvaluationOperator(SkuSageMakerJobOperator):
    """Evaluate the challenger (the training job's model) against the production champion.

    The job writes ``evaluation.json`` and an HTML report to its output (``output.tar.gz``).

    :param training: the training task's XCom (``{"Training": DescribeTrainingJob}``) (templated).
    :param snapshot: the dict from ``export_manifests`` (templated).
    :param production: the production pointer or ``None`` on the first run (templated).
    :param instance_type: default: the configuration's ``sagemaker.evaluation_instance_type``.
    """

    # Buttons in the UI: the job in the SageMaker console and CloudWatch (sagemaker backend), the HTML report.
    operator_extra_links = (SageMakerTrainingJobLink(), SageMakerTrainingLogsLink(), EvaluationReportLink())
    template_fields: Sequence[str] = (
        *SkuSageMakerJobOperator.template_fields, "training", "snapshot", "production", "instance_type",
    )

    def __init__(
        self,
        *,
        training: dict | str,
        snapshot: dict | str,
        production: dict | str | None = None,
        instance_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("job_kind", "evaluate")
        super().__init__(**kwargs)
        self.training = training
        self.snapshot = snapshot
        self.production = production
        self.instance_type = instance_type

    def local_processes_for(self, cfg: PipelineConfig) -> int:
        return cfg.local_jobs.evaluate_processes

    def build_request(self, context: Context, cfg: PipelineConfig, job_name: str) -> dict[str, Any]:
        from sku_retraining.jobs.metric_definitions import evaluation_metric_definitions
        from sku_retraining.jobs.request import Channel, build_request
        from sku_retraining.jobs.specs import base_job_spec

        challenger_uri = self.training["Training"]["ModelArtifacts"]["S3ModelArtifacts"]
        channels = [
            Channel("challenger", "s3", challenger_uri),
            Channel("manifests", "s3", self.snapshot["s3_uri"]),
            Channel("images", "fsx", "", access_mode="ro"),
        ]
        if self.production:
            channels.append(Channel("champion", "s3", self.production["model_uri"]))
            self.log.info("Champion: production v%04d", self.production["version"])
        else:
            self.log.info("No production model yet: the challenger is evaluated alone")
        spec = base_job_spec(
            cfg, context, job_name=job_name, program="evaluate.py",
            instance_type=str(self.instance_type or cfg.sagemaker.evaluation_instance_type),
            channels=tuple(channels),
            # The context file is part of the snapshot's content address, so it cannot name it.
            hyperparameters={"snapshot_id": self.snapshot["snapshot_id"]},
            max_runtime_seconds=6 * 3600,
            metric_definitions=evaluation_metric_definitions(),
        )
        return build_request(spec)
