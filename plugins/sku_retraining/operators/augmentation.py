"""``FsxAugmentationOperator``: the augmentation job on FSx for Lustre (thin; the work is in
the job code and :mod:`sku_retraining.jobs`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sku_retraining.config import PipelineConfig
from sku_retraining.operators.links import SageMakerTrainingJobLink, SageMakerTrainingLogsLink
from sku_retraining.operators.sagemaker_job import SkuSageMakerJobOperator

if TYPE_CHECKING:
    from airflow.sdk import Context


class FsxAugmentationOperator(SkuSageMakerJobOperator):
    """Write N augmented variants of each train original next to its batch on FSx.

    Runs ``augment.py`` of the training image as a job with the FSx file system mounted
    read-write as channel ``images`` and the input list as channel ``manifests``. Skips the
    job (and returns ``{"Training": None}``) when there is nothing to augment.

    :param augment_inputs: the dict from ``export_augmentation_inputs`` (``s3_uri``, ``count``,
        ``variants_per_image``) (templated).
    :param instance_type: SageMaker instance type (CPU work: a compute-optimised type).
    :param instance_count: instances; the job shards its inputs across them.
    :param seed: augmentation seed (variants are deterministic per image and seed).
    :param max_side: longer side of the variants in pixels; ``None`` = derived from the training
        image size of the backend (``sku_contracts.files.variant_max_side``: ~1.5x, 224 -> 342 px),
        the resolution training reads them at, not the source's full size.
    """

    # Buttons in the UI: the job in the SageMaker console and CloudWatch (sagemaker backend).
    operator_extra_links = (SageMakerTrainingJobLink(), SageMakerTrainingLogsLink())
    template_fields: Sequence[str] = (
        *SkuSageMakerJobOperator.template_fields, "augment_inputs", "instance_type", "instance_count",
        "max_side",
    )

    def __init__(
        self,
        *,
        augment_inputs: dict | str,
        instance_type: str = "ml.c5.18xlarge",
        instance_count: int | str = 1,
        seed: int = 0,
        max_side: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("job_kind", "augment")
        super().__init__(**kwargs)
        self.augment_inputs = augment_inputs
        self.instance_type = instance_type
        self.instance_count = instance_count
        self.seed = seed
        self.max_side = max_side

    def execute(self, context: Context) -> dict:
        if not int(self.augment_inputs["count"]):
            self.log.info("Nothing to augment: every train original already has its variants")
            return {"Training": None}
        return super().execute(context)

    def local_processes_for(self, cfg: PipelineConfig) -> int:
        return cfg.local_jobs.augment_processes

    def build_request(self, context: Context, cfg: PipelineConfig, job_name: str) -> dict[str, Any]:
        from sku_contracts.files import variant_max_side
        from sku_retraining.jobs.request import Channel, build_request
        from sku_retraining.jobs.specs import base_job_spec

        if self.max_side in (None, "", "None"):
            local = (self.job_backend or cfg.job_backend) == "local"
            max_side = variant_max_side((cfg.local_jobs if local else cfg.sagemaker).train_image_size)
        else:
            max_side = int(self.max_side)

        spec = base_job_spec(
            cfg, context, job_name=job_name, program="augment.py",
            instance_type=str(self.instance_type), instance_count=int(self.instance_count),
            channels=(
                Channel("images", "fsx", "", access_mode="rw"),
                Channel("manifests", "s3", self.augment_inputs["s3_uri"]),
            ),
            hyperparameters={
                "variants_per_image": int(self.augment_inputs["variants_per_image"]),
                "seed": self.seed,
                "max_side": max_side,
            },
            max_runtime_seconds=12 * 3600,
        )
        return build_request(spec)
