"""The SageMaker training-container contract, read from the environment.

The DLC's launcher (the ``sagemaker-training`` toolkit, which the project's local job backend
runs too) describes a job through ``SM_*`` variables — ``SM_HPS`` (hyperparameters, already
JSON-decoded, ``sagemaker_*`` ones left out), ``SM_CHANNELS`` / ``SM_CHANNEL_<NAME>``,
``SM_HOSTS``, ``SM_CURRENT_HOST``, ``SM_NUM_GPUS``, ``SM_NUM_CPUS``, ``SM_MODEL_DIR``,
``SM_OUTPUT_DIR``, ``SM_OUTPUT_DATA_DIR``, ``SM_INPUT_DIR``, ``SM_INPUT_CONFIG_DIR`` — and the
JSON files under ``<base>/input/config``. ``<base>`` is ``/opt/ml``, or ``SAGEMAKER_BASE_DIR``
where that is set (the toolkit's own variable; the local backend points it at the job's
folder). Checkpoints are ``<base>/checkpoints``: the ``CheckpointConfig.LocalPath`` of our
requests, which SageMaker syncs with the checkpoint S3 URI.

This module is the one place that reads them, so the entry points (``augment.py``,
``train.py``, ``evaluate.py``) only see a typed :class:`JobEnv`. Nothing here is specific to
the local backend: the same code runs unchanged on SageMaker.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ML_ROOT = Path("/opt/ml")
BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"  # sagemaker_training.environment.BASE_PATH_ENV


def _load_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _decode_hyperparameter(value: object) -> object:
    """SageMaker passes every hyperparameter as a string; decode JSON-looking ones (as the
    toolkit's ``environment.read_hyperparameters`` does)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


@dataclass(frozen=True)
class JobEnv:
    """What a job needs to know about where it runs and what it was given."""

    hyperparameters: dict[str, object]
    channels: dict[str, Path]
    model_dir: Path
    output_data_dir: Path
    output_dir: Path
    checkpoint_dir: Path
    hosts: list[str]
    current_host: str
    num_gpus: int
    num_cpus: int
    resource_config: dict = field(default_factory=dict)

    @property
    def host_rank(self) -> int:
        return self.hosts.index(self.current_host) if self.current_host in self.hosts else 0

    @property
    def num_hosts(self) -> int:
        return max(1, len(self.hosts))

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    def channel(self, name: str) -> Path | None:
        return self.channels.get(name)

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> JobEnv:
        env = os.environ if environ is None else environ
        root = Path(env.get(BASE_DIR_ENV, str(DEFAULT_ML_ROOT)))
        input_dir = Path(env.get("SM_INPUT_DIR", str(root / "input")))
        config_dir = Path(env.get("SM_INPUT_CONFIG_DIR", str(input_dir / "config")))

        if "SM_HPS" in env:
            hyperparameters = dict(json.loads(env["SM_HPS"]))  # decoded by the toolkit already
        else:
            raw_hps = _load_json(config_dir / "hyperparameters.json") or {}
            hyperparameters = {k: _decode_hyperparameter(v) for k, v in raw_hps.items()}

        resource = _load_json(config_dir / "resourceconfig.json") or {}
        hosts = json.loads(env["SM_HOSTS"]) if "SM_HOSTS" in env else resource.get("hosts", ["algo-1"])
        current_host = env.get("SM_CURRENT_HOST", resource.get("current_host", hosts[0]))

        channels: dict[str, Path] = {}
        data_dir = input_dir / "data"
        names = json.loads(env["SM_CHANNELS"]) if "SM_CHANNELS" in env else []
        if not names:
            names = list((_load_json(config_dir / "inputdataconfig.json") or {}).keys())
        for name in names:
            channels[name] = Path(env.get(f"SM_CHANNEL_{name.upper()}", str(data_dir / name)))

        output_dir = Path(env.get("SM_OUTPUT_DIR", str(root / "output")))
        return cls(
            hyperparameters=hyperparameters,
            channels=channels,
            model_dir=Path(env.get("SM_MODEL_DIR", str(root / "model"))),
            output_data_dir=Path(env.get("SM_OUTPUT_DATA_DIR", str(output_dir / "data"))),
            output_dir=output_dir,
            checkpoint_dir=root / "checkpoints",
            hosts=list(hosts),
            current_host=current_host,
            num_gpus=int(env.get("SM_NUM_GPUS", "0")),
            num_cpus=int(env.get("SM_NUM_CPUS", str(os.cpu_count() or 1))),
            resource_config=resource,
        )


def write_failure(env: JobEnv, message: str) -> None:
    """Write the failure reason where SageMaker (and the local backend) read it."""
    try:
        env.output_dir.mkdir(parents=True, exist_ok=True)
        env.failure_file.write_text(message[:1024 * 1024])
    except OSError:
        pass


def run_job(main, argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; on an exception write ``failure`` and exit non-zero.

    Only rank 0 of a distributed job writes the failure file, so one reason is reported.
    """
    try:
        main(argv)
        return 0
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the job's last line of defence
        text = f"{type(exc).__name__}: {exc}"
        if os.environ.get("RANK", "0") == "0":
            write_failure(JobEnv.from_environment(), text + "\n\n" + traceback.format_exc())
        print(f"JOB FAILED: {text}", file=sys.stderr, flush=True)
        return 1
