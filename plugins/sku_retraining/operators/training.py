"""``SkuTrainingOperator``: the SMDDP ResNet training job (``train.py`` of the training image)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sku_retraining.config import PipelineConfig
from sku_retraining.operators.links import SageMakerTrainingJobLink, SageMakerTrainingLogsLink
from sku_retraining.operators.sagemaker_job import SkuSageMakerJobOperator
from sku_retraining.templated import as_bool

if TYPE_CHECKING:
    from airflow.sdk import Context


MAX_RUNTIME_SECONDS = 5 * 24 * 3600  # SageMaker's own limit is 28 days; a month's retrain takes ~1-2


class SkuTrainingOperator(SkuSageMakerJobOperator):
    """Train the challenger on the run's dataset snapshot.

    Channels: ``images`` (FSx, read-only), ``manifests`` (the snapshot's CSVs and
    ``classes.json`` in S3) and, for a warm start, ``model`` (the production model.tar.gz).
    With several instances of an SMDDP type the job runs data parallel with SMDDP; global batch
    = instances x GPUs x ``batch_size``, and ``train.py`` scales the learning rate with it.

    :param snapshot: the dict from ``export_manifests`` (templated).
    :param production: the production pointer (``production.json``) or ``None`` (templated).
    :param instance_type: e.g. ``ml.p4d.24xlarge`` (SMDDP-capable types only).
    :param instance_count: instances (2 x p4d = 16 A100s).
    :param epochs: epochs; ``None`` = the backend's default from configuration.
    :param batch_size: images per GPU (per process locally) and step.
    :param learning_rate: base LR for a global batch of 256.
    :param warm_start: start from the production model, head widened for new SKUs.
    :param replay_fraction: with warm start, fraction of old SKUs' train images to use.
    :param use_spot: managed spot training (checkpoints make it resumable).
    :param max_wait_hours: spot: how long to wait for capacity + run, in total.
    :param network_isolation: ``EnableNetworkIsolation`` for the job.
    """

    # Buttons in the UI: the job in the SageMaker console and CloudWatch (sagemaker backend).
    operator_extra_links = (SageMakerTrainingJobLink(), SageMakerTrainingLogsLink())
    template_fields: Sequence[str] = (
        *SkuSageMakerJobOperator.template_fields, "snapshot", "production", "instance_type", "instance_count",
        "epochs", "batch_size", "learning_rate", "warm_start", "replay_fraction", "use_spot", "max_wait_hours",
        "network_isolation",
    )

    def __init__(
        self,
        *,
        snapshot: dict | str,
        production: dict | str | None = None,
        instance_type: str = "ml.p4d.24xlarge",
        instance_count: int | str = 2,
        epochs: int | str | None = None,
        batch_size: int | str = 64,
        learning_rate: float | str = 0.1,
        warm_start: bool | str = True,
        replay_fraction: float | str = 1.0,
        use_spot: bool | str = False,
        max_wait_hours: float | str = 48,
        network_isolation: bool | str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("job_kind", "train")
        super().__init__(**kwargs)
        self.snapshot = snapshot
        self.production = production
        self.instance_type = instance_type
        self.instance_count = instance_count
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.warm_start = warm_start
        self.replay_fraction = replay_fraction
        self.use_spot = use_spot
        self.max_wait_hours = max_wait_hours
        self.network_isolation = network_isolation

    def local_processes_for(self, cfg: PipelineConfig) -> int:
        return cfg.local_jobs.train_processes

    def build_request(self, context: Context, cfg: PipelineConfig, job_name: str) -> dict[str, Any]:
        from sku_retraining.jobs.metric_definitions import training_metric_definitions
        from sku_retraining.jobs.naming import job_name as base_name
        from sku_retraining.jobs.request import SMDDP_INSTANCE_TYPES, Channel, build_request
        from sku_retraining.jobs.specs import base_job_spec

        local = (self.job_backend or cfg.job_backend) == "local"
        defaults = cfg.local_jobs if local else cfg.sagemaker
        # A warm-started month follows the measured recipe (cfg.warm_start, bench/README.md):
        # fewer epochs, balanced replay, its backbone LR and distillation settings.
        warm = as_bool(self.warm_start) and bool(self.production)
        recipe = cfg.warm_start
        hyperparameters: dict[str, Any] = {
            "arch": defaults.train_arch,
            "image_size": defaults.train_image_size,
            "epochs": int(self.epochs) if self.epochs not in (None, "", "None") else (
                max(1, round(defaults.train_epochs * recipe.epochs_fraction)) if warm else defaults.train_epochs),
            "batch_size": cfg.local_jobs.train_batch_size if local else int(self.batch_size),
            "lr": float(self.learning_rate),
            "warm_start": as_bool(self.warm_start),
            "replay_fraction": float(self.replay_fraction),
            # auto: freeze conv1..layer3 only when ImageNet weights or the warm-start model are loaded.
            "freeze": str(context["params"].get("freeze") or "auto") if "params" in context else "auto",
            **({"replay_balanced": recipe.replay_balanced, "backbone_lr_mult": recipe.backbone_lr_mult,
                "distill_weight": recipe.distill_weight} if warm else {}),
        }
        weights = cfg.local_jobs.pretrained_weights_path if local else cfg.sagemaker.pretrained_weights_path
        if weights:
            hyperparameters["pretrained_weights"] = weights
        channels = [
            Channel("images", "fsx", "", access_mode="ro"),
            Channel("manifests", "s3", self.snapshot["s3_uri"]),
        ]
        production = self.production or None
        if as_bool(self.warm_start) and production:
            channels.append(Channel("model", "s3", production["model_uri"]))
            self.log.info("Warm start from production v%04d (%s)", production["version"], production["model_uri"])
        ti = context["ti"]
        run_base = base_name("train", ti.dag_id, context["run_id"])
        instance_type = str(self.instance_type)
        instance_count = int(self.instance_count)
        network_isolation = (
            cfg.sagemaker.enable_network_isolation if self.network_isolation in (None, "", "None")
            else as_bool(self.network_isolation)
        )
        use_spot = as_bool(self.use_spot)
        max_wait = int(float(self.max_wait_hours) * 3600)
        spec = base_job_spec(
            cfg, context, job_name=job_name, program="train.py",
            instance_type=instance_type, instance_count=instance_count,
            channels=tuple(channels), hyperparameters=hyperparameters,
            # One checkpoint folder per DAG run: every attempt of this run resumes from it.
            checkpoint_s3_uri=f"s3://{cfg.data_bucket}/{cfg.prefixes.jobs}checkpoints/{run_base}/",
            smddp=instance_type in SMDDP_INSTANCE_TYPES and not local,
            use_spot=use_spot,
            # Spot: the wait bounds the whole job (SageMaker requires wait >= runtime).
            max_runtime_seconds=min(MAX_RUNTIME_SECONDS, max_wait) if use_spot else MAX_RUNTIME_SECONDS,
            max_wait_seconds=max_wait if use_spot else None,
            network_isolation=network_isolation,
            metric_definitions=training_metric_definitions(),
        )
        return build_request(spec)
