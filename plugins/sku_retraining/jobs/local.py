"""Run a SageMaker ``CreateTrainingJob`` request on this machine (the ``local`` backend).

The job gets what it would get in the SageMaker training container: a ``/opt/ml``-style tree
under a per-job work folder (``input/config/*.json``, ``input/data/<channel>``, ``model``,
``output/data``, ``output/failure``, checkpoints), the ``SM_*`` variables, its FSx channels
mapped to the local FSx folder and its S3 channels downloaded from the (local) S3 endpoint.
The entry point runs as a subprocess of its own process group — under ``torchrun`` when the
job asks for several processes — its output goes line by line to ``log`` as it happens, and
it is killed with its children on :meth:`LocalJobRunner.stop` or when it outlives
``StoppingCondition.MaxRuntimeInSeconds``. On success the model and output folders are packed
(``model.tar.gz``, ``output.tar.gz``) and uploaded where SageMaker would put them; the result
is a ``DescribeTrainingJob``-like dict.

A job that already completed (same name, artefacts present) is not run again: its recorded
description is returned, as the SageMaker backend re-attaches to the job of a retried task.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sku_retraining.jobs.request import PROGRAM_HP, job_output_uri

LOCAL_HOST = "algo-1"
STATUS_FILE = "job.json"


class LocalJobError(RuntimeError):
    """The local job failed; the message carries the job's failure reason."""


def _now() -> datetime:
    return datetime.now(UTC)


def _split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise LocalJobError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def _safe_join(root: Path, relative: str) -> Path:
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise LocalJobError(f"{relative!r} resolves outside {root}")
    return target


def _tar_directory(source: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source)), recursive=False)


@dataclass
class LocalJobRunner:
    """Executes requests locally. One runner runs one job at a time.

    :param work_root: where job folders live (``<work_root>/<job name>/``).
    :param code_dir: the image's ``/opt/ml/code`` (``training_image/code`` in the project).
    :param fsx_root: the local folder standing in for the FSx mount.
    :param fsx_mount_name: the FSx MountName used in ``DirectoryPath`` (``/<mount>/<path>``).
    :param s3_client: a boto3 S3 client (the provider's ``S3Hook().get_conn()``).
    :param processes: processes per job; > 1 runs the entry point under ``torchrun``.
    :param log: receives each output line of the job, as it is printed.
    """

    work_root: Path
    code_dir: Path
    fsx_root: Path
    fsx_mount_name: str
    s3_client: Any
    processes: int = 1
    log: Callable[[str], None] = print
    python: str = sys.executable
    grace_seconds: float = 15.0
    num_gpus: int = 0
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _stopped: bool = field(default=False, init=False, repr=False)

    # -- public -----------------------------------------------------------------------------

    def run(self, request: Mapping[str, Any]) -> dict[str, Any]:
        name = request["TrainingJobName"]
        job_dir = self.work_root / name
        recorded = self.describe(name)
        if recorded and recorded["TrainingJobStatus"] == "Completed" and self._artefacts_exist(recorded):
            self.log(f"Local job {name} already completed at {recorded['TrainingEndTime']}: re-attaching")
            return recorded

        ml_root = job_dir / "ml"
        shutil.rmtree(ml_root, ignore_errors=True)  # a previous failed attempt's inputs/outputs
        paths = self._prepare(request, ml_root)
        description = self._description(request, status="InProgress", secondary="Starting")
        description["LocalJobDir"] = str(job_dir)
        self._record(job_dir, description)

        started = _now()
        description["TrainingStartTime"] = started.isoformat()
        metrics = self._execute(request, paths)
        ended = _now()
        description.update(
            TrainingEndTime=ended.isoformat(),
            TrainingTimeInSeconds=int((ended - started).total_seconds()),
            BillableTimeInSeconds=int((ended - started).total_seconds()),
            FinalMetricDataList=[
                {"MetricName": k, "Value": v, "Timestamp": ended.isoformat()} for k, v in sorted(metrics.items())
            ],
        )
        returncode = self._process.returncode if self._process else -1
        if returncode != 0 or self._stopped:
            reason = self._failure_reason(paths["output"], returncode)
            status = "Stopped" if self._stopped else "Failed"
            description.update(TrainingJobStatus=status, SecondaryStatus=status, FailureReason=reason)
            self._record(job_dir, description)
            raise LocalJobError(f"Local job {name} {status.lower()}: {reason}")

        description["ModelArtifacts"] = {"S3ModelArtifacts": self._upload_outputs(request, paths)}
        description.update(TrainingJobStatus="Completed", SecondaryStatus="Completed")
        self._record(job_dir, description)
        return description

    def describe(self, name: str) -> dict[str, Any] | None:
        status_file = self.work_root / name / STATUS_FILE
        if not status_file.exists():
            return None
        return json.loads(status_file.read_text())

    def stop(self) -> None:
        """Kill the running job and all its children (SIGTERM, then SIGKILL after a grace)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        self._stopped = True
        self.log(f"Stopping local job (process group {process.pid})")
        try:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=self.grace_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=self.grace_seconds)
        except ProcessLookupError:
            pass

    # -- steps --------------------------------------------------------------------------------

    def _prepare(self, request: Mapping[str, Any], ml_root: Path) -> dict[str, Path]:
        paths = {
            "root": ml_root,
            "input": ml_root / "input",
            "config": ml_root / "input" / "config",
            "data": ml_root / "input" / "data",
            "model": ml_root / "model",
            "output": ml_root / "output",
            "output_data": ml_root / "output" / "data",
            "checkpoints": self._checkpoint_dir(request),
        }
        for key in ("config", "data", "model", "output_data", "checkpoints"):
            paths[key].mkdir(parents=True, exist_ok=True)

        hyperparameters = dict(request.get("HyperParameters") or {})
        channels = {c["ChannelName"]: c for c in request.get("InputDataConfig") or []}
        resource = {"current_host": LOCAL_HOST, "hosts": [LOCAL_HOST], "network_interface_name": "lo"}
        (paths["config"] / "hyperparameters.json").write_text(json.dumps(hyperparameters, indent=1))
        (paths["config"] / "resourceconfig.json").write_text(json.dumps(resource, indent=1))
        (paths["config"] / "inputdataconfig.json").write_text(
            json.dumps({n: {"TrainingInputMode": c.get("InputMode", "File")} for n, c in channels.items()}, indent=1)
        )
        for channel_name, channel in channels.items():
            self._materialise_channel(channel_name, channel["DataSource"], paths["data"] / channel_name)
        return paths

    def _materialise_channel(self, name: str, source: Mapping[str, Any], target: Path) -> None:
        if "FileSystemDataSource" in source:
            directory = source["FileSystemDataSource"]["DirectoryPath"]
            prefix = f"/{self.fsx_mount_name}"
            if not (directory == prefix or directory.startswith(prefix + "/")):
                raise LocalJobError(f"channel {name}: DirectoryPath {directory!r} is not under {prefix}")
            local = _safe_join(self.fsx_root, directory[len(prefix):].lstrip("/"))
            if not local.is_dir():
                raise LocalJobError(f"channel {name}: FSx directory {directory} ({local}) does not exist")
            target.symlink_to(local, target_is_directory=True)
            self.log(f"channel {name}: FSx {directory} -> {local}")
            return
        uri = source["S3DataSource"]["S3Uri"]
        bucket, prefix = _split_s3_uri(uri)
        target.mkdir(parents=True, exist_ok=True)
        paginator = self.s3_client.get_paginator("list_objects_v2")
        count = 0
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(prefix):].lstrip("/") or obj["Key"].rsplit("/", 1)[-1]
                destination = _safe_join(target, relative)
                destination.parent.mkdir(parents=True, exist_ok=True)
                self.s3_client.download_file(bucket, obj["Key"], str(destination))
                count += 1
        if count == 0:
            raise LocalJobError(f"channel {name}: nothing found under {uri}")
        self.log(f"channel {name}: {count} object(s) from {uri}")

    def _checkpoint_dir(self, request: Mapping[str, Any]) -> Path:
        # Keyed by the checkpoint S3 URI, like SageMaker's sync: a retried job resumes.
        uri = (request.get("CheckpointConfig") or {}).get("S3Uri")
        if not uri:
            return self.work_root / request["TrainingJobName"] / "checkpoints"
        return self.work_root / "_checkpoints" / re.sub(r"[^A-Za-z0-9._-]+", "_", uri[5:]).strip("_")

    def _environment(self, request: Mapping[str, Any], paths: dict[str, Path]) -> dict[str, str]:
        hyperparameters = dict(request.get("HyperParameters") or {})
        channels = [c["ChannelName"] for c in request.get("InputDataConfig") or []]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))}
        env.update(request.get("Environment") or {})
        env.update(
            SM_ML_ROOT=str(paths["root"]),
            SM_INPUT_DIR=str(paths["input"]),
            SM_INPUT_CONFIG_DIR=str(paths["config"]),
            SM_MODEL_DIR=str(paths["model"]),
            SM_OUTPUT_DIR=str(paths["output"]),
            SM_OUTPUT_DATA_DIR=str(paths["output_data"]),
            SM_CHECKPOINT_DIR=str(paths["checkpoints"]),
            SM_HPS=json.dumps(hyperparameters),
            SM_CHANNELS=json.dumps(channels),
            SM_HOSTS=json.dumps([LOCAL_HOST]),
            SM_CURRENT_HOST=LOCAL_HOST,
            SM_NUM_GPUS=str(self.num_gpus),
            SM_NUM_CPUS=str(os.cpu_count() or 1),
            SM_USER_ENTRY_POINT=hyperparameters.get(PROGRAM_HP, ""),
            SM_TRAINING_JOB_NAME=request["TrainingJobName"],
            PYTHONUNBUFFERED="1",
        )
        for channel in channels:
            env[f"SM_CHANNEL_{channel.upper()}"] = str(paths["data"] / channel)
        return env

    def _command(self, request: Mapping[str, Any]) -> list[str]:
        program = (request.get("HyperParameters") or {}).get(PROGRAM_HP)
        if not program:
            raise LocalJobError(f"request has no HyperParameters[{PROGRAM_HP!r}] (the entry point)")
        script = _safe_join(self.code_dir, program)
        if not script.is_file():
            raise LocalJobError(f"entry point {program!r} not found in {self.code_dir}")
        if self.processes > 1:
            return [self.python, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.processes}", str(script)]
        return [self.python, str(script)]

    def _execute(self, request: Mapping[str, Any], paths: dict[str, Path]) -> dict[str, float]:
        metric_patterns = [
            (m["Name"], re.compile(m["Regex"]))
            for m in (request.get("AlgorithmSpecification") or {}).get("MetricDefinitions", [])
        ]
        max_runtime = (request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds")
        command = self._command(request)
        self.log(f"Running {' '.join(command)}")
        self._stopped = False
        self._process = subprocess.Popen(
            command,
            cwd=self.code_dir,
            env=self._environment(request, paths),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # its own process group: stop() kills torchrun's workers too
        )
        timer = None
        if max_runtime:
            timer = threading.Timer(float(max_runtime), self._on_max_runtime, args=(max_runtime,))
            timer.daemon = True
            timer.start()
        metrics: dict[str, float] = {}
        try:
            assert self._process.stdout is not None
            for line in self._process.stdout:
                line = line.rstrip("\n")
                self.log(line)
                for metric_name, pattern in metric_patterns:
                    match = pattern.search(line)
                    if match:
                        try:
                            metrics[metric_name] = float(match.group(1))
                        except (IndexError, ValueError):
                            pass
            self._process.wait()
        except BaseException:
            self.stop()
            raise
        finally:
            if timer:
                timer.cancel()
        return metrics

    def _on_max_runtime(self, seconds: int) -> None:
        self.log(f"MaxRuntimeInSeconds ({seconds}) exceeded: stopping the job")
        self.stop()

    def _failure_reason(self, output_dir: Path, returncode: int) -> str:
        failure = output_dir / "failure"
        if failure.exists() and failure.read_text().strip():
            text = failure.read_text().strip()
            return text if len(text) <= 1024 else text[:1021] + "..."
        if self._stopped:
            return "stopped (killed or MaxRuntimeInSeconds exceeded)"
        return f"the entry point exited with code {returncode} and wrote no failure file"

    def _upload_outputs(self, request: Mapping[str, Any], paths: dict[str, Path]) -> str:
        staging = paths["root"] / "_packed"
        staging.mkdir(exist_ok=True)
        for folder, archive in ((paths["model"], "model.tar.gz"), (paths["output_data"], "output.tar.gz")):
            _tar_directory(folder, staging / archive)
            bucket, key = _split_s3_uri(job_output_uri(request, archive))
            self.s3_client.upload_file(str(staging / archive), bucket, key)
        uri = job_output_uri(request, "model.tar.gz")
        self.log(f"Uploaded model artefacts to {uri}")
        return uri

    def _artefacts_exist(self, description: Mapping[str, Any]) -> bool:
        uri = (description.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
        if not uri:
            return False
        bucket, key = _split_s3_uri(uri)
        try:
            self.s3_client.head_object(Bucket=bucket, Key=key)
        except Exception:  # noqa: BLE001 - any failure means "not there": run again
            return False
        return True

    def _description(self, request: Mapping[str, Any], *, status: str, secondary: str) -> dict[str, Any]:
        name = request["TrainingJobName"]
        return {
            "TrainingJobName": name,
            "TrainingJobArn": f"arn:aws:sagemaker:local:000000000000:training-job/{name}",
            "TrainingJobStatus": status,
            "SecondaryStatus": secondary,
            "CreationTime": _now().isoformat(),
            "AlgorithmSpecification": request.get("AlgorithmSpecification"),
            "HyperParameters": request.get("HyperParameters"),
            "InputDataConfig": request.get("InputDataConfig"),
            "OutputDataConfig": request.get("OutputDataConfig"),
            "ResourceConfig": request.get("ResourceConfig"),
            "StoppingCondition": request.get("StoppingCondition"),
            "CheckpointConfig": request.get("CheckpointConfig"),
            "Backend": "local",
            "LocalProcesses": self.processes,
        }

    @staticmethod
    def _record(job_dir: Path, description: Mapping[str, Any]) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        tmp = job_dir / (STATUS_FILE + ".tmp")
        tmp.write_text(json.dumps(description, indent=1, default=str))
        os.replace(tmp, job_dir / STATUS_FILE)
