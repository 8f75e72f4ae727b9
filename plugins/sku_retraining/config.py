"""The pipeline's configuration: one typed place, read at task run time only.

Layers, later ones win:

1. ``resources/default_config.json`` (packaged with ``sku_retraining``, the local defaults;
   read with :mod:`importlib.resources`, so a plugins.zip deployment has it too);
2. the JSON file named by ``$SKU_RETRAINING_CONFIG`` (a deployment's file, e.g. on MWAA);
3. the Airflow Variable ``sku_retraining_config`` (JSON), only when asked for from a task;
4. the ``SKU_RETRAINING_*`` environment variables the local stack writes
   (bucket, S3 endpoint, FSx root, job backend).

Layers 1, 2 and 4 are the *deployment* settings: they are all the DAG file may read at parse
time (to name the production-model ``Asset``). The Variable may change what varies per run
(training defaults, notifications, ...) but not the keys parse time reads
(:data:`DEPLOYMENT_KEYS`): setting one there is an error naming it, so the Asset a DAG
declares and the bucket a task writes can never disagree.

Unknown keys are an error naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

#: The repository checkout, for the local backend only (its FSx folder and the image's code);
#: nothing a deployment runs reads files through it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
RESOURCES = files("sku_retraining") / "resources"
DEFAULT_CONFIG_RESOURCE = "default_config.json"

CONFIG_FILE_ENV = "SKU_RETRAINING_CONFIG"
CONFIG_VARIABLE = "sku_retraining_config"
#: Read at DAG parse time (the production-model Asset): deployment layers only, never the Variable.
DEPLOYMENT_KEYS = ("data_bucket", "model_name", "prefixes")

JobBackend = Literal["local", "sagemaker"]


class ConfigError(ValueError):
    """The configuration is malformed; the message names the bad key."""


@dataclass(frozen=True)
class Prefixes:
    incoming: str = "incoming/"
    datasets: str = "datasets/"
    models: str = "models/"
    jobs: str = "jobs/"


@dataclass(frozen=True)
class FsxConfig:
    """FSx for Lustre, linked to the data bucket (the S3 key is the path under the mount)."""

    file_system_id: str = "fs-00000000000000000"
    mount_name: str = "fsx"
    # Where the file system is mounted for the local backend (relative to the project root).
    local_root: str = ".stack/fsx"

    def local_path(self) -> Path:
        root = Path(self.local_root)
        return root if root.is_absolute() else PROJECT_ROOT / root


@dataclass(frozen=True)
class SplitConfig:
    # Fractions of new split groups (the rest is test). Val only monitors the training (per-epoch
    # val metrics); train.py outputs the last epoch by default, so val is small and every group it
    # does not take trains. Measured on the real photos (bench/README.md): the photos (and capture
    # runs) a split keeps out of train are what the model misses most.
    train_fraction: float = 0.85
    val_fraction: float = 0.05
    # A SKU with fewer split groups than this keeps them all in train until it has enough.
    min_originals_for_holdout: int = 3
    # Every SKU with enough groups gets a test group (its smallest new one) so each SKU is tested
    # (the gates' per-SKU numbers). On: a val group too (the previous default, for a job that
    # selects its epoch by val: --select-epoch best-val). Off: val groups are drawn by fraction.
    val_group_per_sku: bool = False
    # Originals of one SKU whose perceptual hashes differ in at most this many bits (of 64)
    # are near-duplicates and share a split group (catalogue/grouping.py); -1 = no clustering.
    near_duplicate_max_distance: int = 8


@dataclass(frozen=True)
class IntakeConfig:
    download_workers: int = 8
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG")
    allowed_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png")
    min_side: int = 32  # smallest accepted side in pixels, upright (image_check.py)


@dataclass(frozen=True)
class SageMakerConfig:
    """What the ``sagemaker`` job backend needs; the defaults only make local requests valid."""

    role_arn: str = "arn:aws:iam::000000000000:role/sku-retraining-sagemaker"
    image_uri: str = "000000000000.dkr.ecr.us-east-1.amazonaws.com/sku-retraining-training:latest"
    subnets: tuple[str, ...] = ("subnet-00000000000000000",)
    security_group_ids: tuple[str, ...] = ("sg-00000000000000000",)
    volume_size_gb: int = 200
    enable_network_isolation: bool = False
    # ImageNet weights baked into the training image at build time (see training_image/Dockerfile).
    pretrained_weights_path: str = "/opt/ml/code/weights/resnet152-imagenet.pth"
    evaluation_instance_type: str = "ml.g5.2xlarge"
    # Production training: resnet152 at 224 px (the local backend overrides, see LocalJobsConfig).
    train_arch: str = "resnet152"
    train_image_size: int = 224
    train_epochs: int = 10


@dataclass(frozen=True)
class LocalJobsConfig:
    """The ``local`` job backend: processes per job (training runs under torchrun)."""

    train_processes: int = 2
    augment_processes: int = 1
    evaluate_processes: int = 1
    # A small backbone and image size keep a CPU run in minutes (resnet152 @ 224 px: ~5 s/step).
    train_arch: str = "resnet18"
    train_image_size: int = 64
    train_epochs: int = 4
    train_batch_size: int = 32
    # Optional ImageNet weights file for the local arch; random init when empty.
    pretrained_weights_path: str = ""


@dataclass(frozen=True)
class WarmStartConfig:
    """The recipe of a warm-started month (train.py's levers), measured in bench/quality_bench.py
    (bench/README.md): what a month costs and keeps when it starts from the production model.

    Measured best on the real grocery photos (resnet18 @ 96 px): replay every old image (the DAG's
    ``replay_fraction`` 1.0), conv1..layer3 frozen (``freeze=auto``: the warm-start model was
    loaded), half the epochs: 24% of a full retrain's training FLOPs, 100.7% of its held-out
    top-1, old SKUs +1.7 points. Balanced replay of 30% (with or without distillation) and a
    lower backbone LR on an unfrozen backbone lost 10-30% at the same compute.
    """

    # Epochs of a warm-started month, as a share of the backend's train_epochs (a full retrain's).
    epochs_fraction: float = 0.5
    # Replay the old SKUs' images as an equal quota per SKU (else the same share of each SKU).
    replay_balanced: bool = False
    # Backbone learning rate relative to the head's.
    backbone_lr_mult: float = 1.0
    # Distillation from the warm-start model on the old SKUs' logits (0 = off).
    distill_weight: float = 0.0


NOTIFICATION_EVENTS = ("task_failed", "run_failed", "promoted", "rejected")


@dataclass(frozen=True)
class NotificationsConfig:
    """Who is told about failures, promotions and rejections (:mod:`sku_retraining.notifications`).

    Every channel is optional; none configured = nothing is sent (the task log still says it all).
    """

    # SNS topic (the amazon provider's SnsNotifier); empty = no SNS message.
    sns_topic_arn: str = ""
    # E-mail addresses (the smtp provider's SmtpNotifier, connection ``smtp_conn_id``); empty = no e-mail.
    email_to: tuple[str, ...] = ()
    smtp_conn_id: str = "smtp_default"
    # Which events are sent: task_failed, run_failed, promoted, rejected.
    events: tuple[str, ...] = ("task_failed", "run_failed", "promoted", "rejected")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.events) - set(NOTIFICATION_EVENTS))
        if unknown:
            raise ConfigError(f"notifications.events: unknown event(s) {', '.join(unknown)} "
                              f"(known: {', '.join(NOTIFICATION_EVENTS)})")


@dataclass(frozen=True)
class PipelineConfig:
    data_bucket: str = "sku-retraining-data"
    model_name: str = "sku-recognition"
    region_name: str = "us-east-1"
    job_backend: JobBackend = "local"
    catalogue_conn_id: str = "sku_catalogue"
    aws_conn_id: str = "aws_default"
    prefixes: Prefixes = field(default_factory=Prefixes)
    fsx: FsxConfig = field(default_factory=FsxConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    sagemaker: SageMakerConfig = field(default_factory=SageMakerConfig)
    local_jobs: LocalJobsConfig = field(default_factory=LocalJobsConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)

    def __post_init__(self) -> None:
        if self.job_backend not in ("local", "sagemaker"):
            raise ConfigError(f"job_backend must be 'local' or 'sagemaker', got {self.job_backend!r}")
        s = self.split
        if not (0 < s.train_fraction < 1 and 0 <= s.val_fraction < 1 and s.train_fraction + s.val_fraction < 1):
            raise ConfigError(
                "split.train_fraction and split.val_fraction must be in (0, 1) and sum to < 1 "
                f"(got {s.train_fraction}, {s.val_fraction})"
            )
        if not -1 <= s.near_duplicate_max_distance <= 24:
            raise ConfigError(
                f"split.near_duplicate_max_distance must be -1 (off) or 0..24 bits, got {s.near_duplicate_max_distance}"
            )


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with their path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        current = getattr(defaults, name)
        if is_dataclass(current):
            kwargs[name] = _build(type(current), value, f"{where}{name}.")
        elif isinstance(current, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resource_text(*parts: str) -> str:
    """A packaged resource of ``sku_retraining/resources`` (works from plugins.zip too)."""
    node = RESOURCES
    for part in parts:
        node = node / part
    return node.read_text(encoding="utf-8")


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc


def _environment_overrides(environ: dict[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if environ.get("SKU_RETRAINING_DATA_BUCKET"):
        overrides["data_bucket"] = environ["SKU_RETRAINING_DATA_BUCKET"]
    if environ.get("SKU_RETRAINING_JOB_BACKEND"):
        overrides["job_backend"] = environ["SKU_RETRAINING_JOB_BACKEND"]
    # (The S3 endpoint of the local stack reaches the hooks through AIRFLOW_CONN_AWS_DEFAULT's
    # endpoint_url; SKU_RETRAINING_S3_ENDPOINT_URL is for scripts that use boto3 directly.)
    if environ.get("SKU_RETRAINING_FSX_ROOT"):
        overrides["fsx"] = {"local_root": environ["SKU_RETRAINING_FSX_ROOT"]}
    return overrides


def load_config(
    *, variable_json: str | None = None, environ: dict[str, str] | None = None
) -> PipelineConfig:
    """Load the layered configuration (see the module docstring).

    :param variable_json: the Airflow Variable's value, when the caller read it (tasks do,
        via :func:`load_config_from_airflow`; the DAG file never does).
    :param environ: environment to read, ``os.environ`` by default.
    """
    env = os.environ if environ is None else environ
    data = json.loads(resource_text(DEFAULT_CONFIG_RESOURCE))
    if env.get(CONFIG_FILE_ENV):
        data = _deep_merge(data, _read_json_file(Path(env[CONFIG_FILE_ENV])))
    if variable_json:
        try:
            overrides = json.loads(variable_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Airflow Variable {CONFIG_VARIABLE} is not valid JSON: {exc}") from exc
        fixed = sorted(set(overrides) & set(DEPLOYMENT_KEYS)) if isinstance(overrides, dict) else []
        if fixed:
            raise ConfigError(
                f"Airflow Variable {CONFIG_VARIABLE} sets {', '.join(fixed)}: deployment settings the DAG reads "
                f"at parse time belong in the file named by ${CONFIG_FILE_ENV} (or SKU_RETRAINING_DATA_BUCKET), "
                "not in the Variable"
            )
        data = _deep_merge(data, overrides)
    data = _deep_merge(data, _environment_overrides(dict(env)))
    return _build(PipelineConfig, data, "")


def load_config_from_airflow() -> PipelineConfig:
    """Task-time loader: includes the Airflow Variable layer. Never call at DAG parse time."""
    from airflow.sdk import Variable

    return load_config(variable_json=Variable.get(CONFIG_VARIABLE, default=None))
