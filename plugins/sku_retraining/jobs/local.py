"""Run a SageMaker ``CreateTrainingJob`` request on this machine (the ``local`` backend).

The job is launched by the code the SageMaker PyTorch DLC runs: the ``sagemaker-training``
toolkit's ``train`` entry point with ``SAGEMAKER_TRAINING_MODULE`` set to the DLC's
``sagemaker_pytorch_container.training:main`` (``sagemaker-pytorch-training``). So program
selection (``SAGEMAKER_PROGRAM`` before the ``sagemaker_program`` hyperparameter), the decoding
of hyperparameters, the ``SM_*`` variables, the command line (``--name value`` per
hyperparameter), the runner (one process, or ``torchrun`` for a torch-distributed job), the DNS
wait for the hosts and the ``failure`` / ``success`` files are AWS's code, not ours.

What this module still does, standing in for the SageMaker platform and the image:

* a ``/opt/ml`` tree per job: ``SAGEMAKER_BASE_DIR`` points the toolkit at
  ``<work_root>/<job>/ml``; ``input/config/hyperparameters.json``, ``inputdataconfig.json`` and
  ``resourceconfig.json`` are written from the request as SageMaker writes them;
* the image: its ``/opt/ml/code`` is staged per job from the Dockerfile's ``COPY`` lines (build
  context = the repository root), and its ``ENV`` lines (plus the DLC's own, see
  :data:`BASE_IMAGE_ENV`) are applied; the venv stands in for the image's Python packages;
* channels: FSx channels are the local FSx folder (a symlink), S3 channels are downloaded;
* checkpoints: ``CheckpointConfig.LocalPath`` is a folder kept per ``CheckpointConfig.S3Uri``
  (what SageMaker's sync gives: a retried job resumes);
* the process: its own process group; output streamed line by line to ``log``; killed with
  every descendant (torchrun's workers run in sessions of their own) on :meth:`stop` or after
  ``StoppingCondition.MaxRuntimeInSeconds``; ``output/failure`` is the job's FailureReason;
* outputs: ``model.tar.gz`` / ``output.tar.gz`` uploaded to ``<S3OutputPath>/<job>/output/``;
  the result is a ``DescribeTrainingJob``-like dict, and a completed job is re-attached to,
  not run again.

See docs/contracts.md ("The container contract: AWS's code and ours") for the reasons.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sku_retraining.config import PROJECT_ROOT
from sku_retraining.jobs.request import SMDDP_ENABLED_HP, job_output_uri

STATUS_FILE = "job.json"

#: The training image's Dockerfile and its build context (``docker build -f
#: training_image/Dockerfile .`` from the repository root, see training_image/README.md).
DOCKERFILE = PROJECT_ROOT / "training_image" / "Dockerfile"
BUILD_CONTEXT = PROJECT_ROOT
IMAGE_ML_ROOT = PurePosixPath("/opt/ml")
IMAGE_CODE_DIR = IMAGE_ML_ROOT / "code"

#: ``ENV`` of the base image (the SageMaker PyTorch training DLC, ``sagemaker`` stage of
#: aws/deep-learning-containers ``pytorch/training/docker/2.5/py3/cu124/Dockerfile.gpu``) that a
#: job's launch depends on. ``SAGEMAKER_TRAINING_MODULE`` is what makes the toolkit hand over to
#: the PyTorch container's ``training.main`` (which picks the runner); the rest keeps output
#: unbuffered and UTF-8 as in the container. Its PATH / LD_LIBRARY_PATH / CUDA variables name
#: the image's own folders and are not applied.
BASE_IMAGE_ENV: dict[str, str] = {
    "SAGEMAKER_TRAINING_MODULE": "sagemaker_pytorch_container.training:main",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONIOENCODING": "UTF-8",
    "DLC_CONTAINER_TYPE": "training",
}

#: The DLC's ``train`` command (console script ``train = sagemaker_training.cli.train:main``).
#: ``-P``: as for the console script, the working directory (``/opt/ml/code``) is not on the
#: launcher's own ``sys.path``, so a job file named like a module never shadows the toolkit's.
TOOLKIT_TRAIN = ("-P", "-m", "sagemaker_training.cli.train")

#: Host name written to ``resourceconfig.json``. SageMaker names hosts ``algo-1``...; here the
#: name must resolve, because the PyTorch container's ``train`` and the toolkit's entry point
#: both block (retrying for up to 15 minutes) until every host's DNS lookup succeeds, and
#: ``algo-1`` resolves only on SageMaker's network. ``localhost`` resolves on every machine.
LOCAL_HOST = "localhost"
LOCAL_NETWORK_INTERFACE = "lo"
INSTANCE_GROUP = "homogeneousCluster"

#: Hyperparameters of the SageMaker Python SDK's ``distribution={"torch_distributed": ...}``:
#: the toolkit then runs the program under ``torchrun --nproc_per_node <processes per host>``.
TORCH_DISTRIBUTED_HP = "sagemaker_torch_distributed_enabled"
PROCESSES_PER_HOST_HP = "sagemaker_mpi_num_of_processes_per_host"

# Variables of the Airflow worker that must not reach the job: secrets (connections, config),
# the worker's own import path (the image has no PYTHONPATH, so the job imports only what the
# image has), and anything that would pre-empt what the image, the request or the toolkit set.
_DROPPED_PREFIXES = ("AIRFLOW_CONN_", "AIRFLOW__", "SM_", "SAGEMAKER_", "PET_")
_DROPPED_NAMES = frozenset({
    "PYTHONPATH", "CURRENT_HOST", "TRAINING_JOB_NAME", "TRAINING_JOB_ARN",
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
})


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list:
    """``pid``'s descendants (psutil handles: signalling one checks the pid was not reused)."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _is_alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list, timeout: float) -> list:
    """Wait until none of ``procs`` runs (zombies count as gone); return those still running."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _is_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _processes_in(job_dir: Path) -> list:
    """Processes (other than this one) whose working directory is inside ``job_dir``."""
    import psutil

    root, found = job_dir.resolve(), []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and Path(proc.cwd()).is_relative_to(root):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _signal_all(pgid: int, procs: list, sig: signal.Signals) -> None:
    import psutil

    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


# --------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class ImageSpec:
    """What the local backend takes from the training image's Dockerfile.

    :param env: the final stage's ``ENV`` values, in order (later lines win).
    :param code: ``(source in the build context, destination in the image)`` for every ``COPY``
        into ``/opt/ml/code``, in order; a destination ending in ``/`` is a folder.
    :param workdir: the final ``WORKDIR``.
    """

    env: dict[str, str]
    code: tuple[tuple[Path, str], ...]
    workdir: PurePosixPath = PurePosixPath("/")


_VAR_RE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def _expand(value: str, variables: Mapping[str, str]) -> str:
    """Docker's ``$NAME`` / ``${NAME}`` substitution (the forms our Dockerfile may use)."""
    return _VAR_RE.sub(lambda m: variables.get(m.group("braced") or m.group("bare"), ""), value)


def _instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comment lines dropped
    (Docker drops comment lines inside a continued instruction too)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = (pending + stripped).strip()
        pending = ""
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    if pending.strip():
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _env_pairs(arguments: str, variables: Mapping[str, str]) -> list[tuple[str, str]]:
    tokens = shlex.split(arguments, posix=True)
    if tokens and "=" not in tokens[0]:  # legacy "ENV NAME value with spaces"
        name, _, value = arguments.partition(" ")
        return [(name, _expand(value.strip(), variables))]
    pairs = []
    for token in tokens:
        name, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"ENV {arguments!r}: {token!r} is not NAME=value")
        pairs.append((name, _expand(value, variables)))
    return pairs


def read_dockerfile(dockerfile: Path = DOCKERFILE, context: Path = BUILD_CONTEXT) -> ImageSpec:
    """Parse the final stage's ``ENV``, ``WORKDIR`` and ``COPY … /opt/ml/code…`` lines."""
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    code: list[tuple[Path, str]] = []
    workdir = PurePosixPath("/")
    for instruction, arguments in _instructions(dockerfile.read_text()):
        if instruction == "FROM":  # a new stage: only the last one is the image
            env, code, workdir = {}, [], PurePosixPath("/")
        elif instruction == "ARG":
            name, _, default = arguments.partition("=")
            args[name.strip()] = _expand(default.strip().strip('"'), {**args, **env})
        elif instruction == "ENV":
            for name, value in _env_pairs(arguments, {**args, **env}):
                env[name] = value
        elif instruction == "WORKDIR":
            workdir = workdir / _expand(arguments, {**args, **env})
        elif instruction in ("COPY", "ADD"):
            tokens = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
            flags = [t for t in tokens if t.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                continue  # from another stage or image, not from the build context
            paths = [_expand(t, {**args, **env}) for t in tokens if not t.startswith("--")]
            *sources, destination = paths
            dest = workdir / destination
            if dest != IMAGE_CODE_DIR and IMAGE_CODE_DIR not in dest.parents:
                continue
            for source in sources:
                matches = sorted(context.glob(source.rstrip("/"))) if any(c in source for c in "*?[") else [
                    context / source.rstrip("/")]
                for match in matches:
                    code.append((match, str(dest) + ("/" if destination.endswith("/") else "")))
    return ImageSpec(env=env, code=tuple(code), workdir=workdir)


# --------------------------------------------------------------------------- the runner


@dataclass
class LocalJobRunner:
    """Executes requests locally through the SageMaker training toolkit. One job at a time.

    :param work_root: where job folders live (``<work_root>/<job name>/``).
    :param code_dir: the folder the Dockerfile copies to ``/opt/ml/code/``
        (``training_image/code``); the Dockerfile's other ``COPY`` lines into ``/opt/ml/code``
        (``plugins/sku_contracts``) are staged next to it. Tests pass a folder of their own.
    :param fsx_root: the local folder standing in for the FSx mount.
    :param fsx_mount_name: the FSx MountName used in ``DirectoryPath`` (``/<mount>/<path>``).
    :param s3_client: a boto3 S3 client (the provider's ``S3Hook().get_conn()``).
    :param processes: processes per job; > 1 runs the toolkit's torch-distributed runner
        (``torchrun``; gloo on CPU).
    :param log: receives each output line of the job (the toolkit's own lines included).
    :param python: the interpreter that runs the toolkit (and, through it, the job).
    :param dockerfile: the image's Dockerfile, read for ``ENV`` and ``COPY``.
    :param build_context: the Docker build context the ``COPY`` sources are relative to.
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
    dockerfile: Path = DOCKERFILE
    build_context: Path = BUILD_CONTEXT
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _stopped: bool = field(default=False, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    # -- public -----------------------------------------------------------------------------

    def run(self, request: Mapping[str, Any]) -> dict[str, Any]:
        name = request["TrainingJobName"]
        job_dir = self.work_root / name
        recorded = self.describe(name)
        if recorded and recorded["TrainingJobStatus"] == "Completed" and self._artefacts_exist(recorded):
            self.log(f"Local job {name} already completed at {recorded['TrainingEndTime']}: re-attaching")
            return recorded
        if recorded and recorded["TrainingJobStatus"] == "InProgress":
            self._kill_stale(job_dir, recorded)

        ml_root = job_dir / "ml"
        # A previous failed attempt's inputs and outputs. rmtree unlinks the FSx and checkpoint
        # symlinks without following them.
        shutil.rmtree(ml_root, ignore_errors=True)
        image = read_dockerfile(self.dockerfile, self.build_context)
        hyperparameters = self._launch_hyperparameters(request)
        paths = self._prepare(request, ml_root, image, hyperparameters)
        description = self._description(request, status="InProgress", secondary="Starting")
        description["LocalJobDir"] = str(job_dir)
        description["LocalLaunch"] = {
            "Launcher": self._launcher_version(),
            "SageMakerBaseDir": str(ml_root),
            "AddedHyperParameters": {k: v for k, v in hyperparameters.items()
                                     if (request.get("HyperParameters") or {}).get(k) != v},
        }
        self._record(job_dir, description)

        started = _now()
        description["TrainingStartTime"] = started.isoformat()
        metrics = self._execute(request, paths, image)
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
        """Kill the running job and every process it started (SIGTERM, then SIGKILL after a
        grace). torchrun starts each worker in a session of its own, so signalling the job's
        process group is not enough: every descendant seen is signalled too."""
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                return
            self._stopped = True
        self.log(f"Stopping local job (process group {process.pid})")
        deadline = time.monotonic() + self.grace_seconds
        tree = _descendants(process.pid)
        _signal_all(process.pid, tree, signal.SIGTERM)
        try:
            process.wait(timeout=self.grace_seconds)
        except subprocess.TimeoutExpired:
            pass
        alive = _wait_gone(tree + _descendants(process.pid), max(0.0, deadline - time.monotonic()))
        if alive or process.poll() is None:
            self.log(f"{len(alive) + (process.poll() is None)} process(es) outlived SIGTERM: SIGKILL")
            _signal_all(process.pid, alive, signal.SIGKILL)
            _wait_gone(alive, self.grace_seconds)
            try:
                process.wait(timeout=self.grace_seconds)
            except subprocess.TimeoutExpired:
                pass

    def _note_process(self, job_dir: Path, pid: int) -> None:
        """Record the job's process group in its ``InProgress`` record, so that the next run of
        this job can find it if this worker dies without stopping it (see :meth:`_kill_stale`)."""
        import psutil

        description = json.loads((job_dir / STATUS_FILE).read_text())
        description["LocalProcess"] = {"pgid": pid, "create_time": psutil.Process(pid).create_time()}
        self._record(job_dir, description)

    def kill_leftovers(self, name: str) -> None:
        """Kill what a dead worker left running of job ``name`` (recorded ``InProgress``)."""
        recorded = self.describe(name)
        if recorded and recorded["TrainingJobStatus"] == "InProgress":
            self._kill_stale(self.work_root / name, recorded)

    def _kill_stale(self, job_dir: Path, recorded: Mapping[str, Any]) -> None:
        """Kill what is left of a run of this job whose worker died (SIGKILL, OOM, a lost pod).

        The job is a session of its own, so it outlives a SIGKILLed worker and would keep writing
        into the folder this run is about to reuse. Killed (SIGKILL): the recorded process group
        when its leader is still the recorded process (not a reused pid), its descendants, and
        any process still working in the job's folder (torchrun's workers, whose leader is gone).
        """
        import psutil

        info = recorded.get("LocalProcess") or {}
        pgid, procs = info.get("pgid"), []
        if pgid:
            try:
                leader = psutil.Process(pgid)
                if abs(leader.create_time() - float(info.get("create_time", 0))) < 0.01:
                    procs = [leader, *_descendants(pgid)]
                else:
                    pgid = None  # the pid names another process now: never signal its group
            except psutil.Error:
                pgid = None
        procs += [p for p in _processes_in(job_dir) if p not in procs]
        procs = [p for p in procs if _is_alive(p)]
        if not procs:
            return
        self.log(f"Local job {job_dir.name} was left running by a worker that died: killing its "
                 f"{len(procs)} process(es) (process group {info.get('pgid')}) before running it again")
        if pgid:
            _signal_all(pgid, procs, signal.SIGKILL)
        else:
            for proc in procs:
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
        alive = _wait_gone(procs, self.grace_seconds)
        if alive:
            raise LocalJobError(f"local job {job_dir.name}: {len(alive)} process(es) of its previous run "
                                f"survived SIGKILL: {[p.pid for p in alive]}")

    # -- steps --------------------------------------------------------------------------------

    def _launch_hyperparameters(self, request: Mapping[str, Any]) -> dict[str, str]:
        """The request's hyperparameters, plus the SDK's torch-distributed ones for a job of
        several local processes (on SageMaker our training job runs SMDDP, which needs GPUs)."""
        hyperparameters = dict(request.get("HyperParameters") or {})
        if hyperparameters.get(SMDDP_ENABLED_HP) == "true":
            raise LocalJobError(
                f"{request['TrainingJobName']}: {SMDDP_ENABLED_HP} needs SMDDP (mpirun, smddprun, GPUs), which the "
                "local backend does not have; build the local request without it (the operators do)"
            )
        if self.processes > 1:
            hyperparameters[TORCH_DISTRIBUTED_HP] = "true"
            hyperparameters[PROCESSES_PER_HOST_HP] = str(self.processes)
        return hyperparameters

    def _prepare(
        self, request: Mapping[str, Any], ml_root: Path, image: ImageSpec, hyperparameters: Mapping[str, str]
    ) -> dict[str, Path]:
        paths = {
            "root": ml_root,
            "code": ml_root / "code",
            "input": ml_root / "input",
            "config": ml_root / "input" / "config",
            "data": ml_root / "input" / "data",
            "model": ml_root / "model",
            "output": ml_root / "output",
            "output_data": ml_root / "output" / "data",
        }
        for key in ("config", "data", "model", "output_data"):
            paths[key].mkdir(parents=True, exist_ok=True)
        self._stage_code(image, paths["code"])
        self._link_checkpoints(request, ml_root)

        channels = list(request.get("InputDataConfig") or [])
        config = paths["config"]
        (config / "hyperparameters.json").write_text(json.dumps(dict(hyperparameters)))
        (config / "inputdataconfig.json").write_text(json.dumps(input_data_config(request)))
        (config / "resourceconfig.json").write_text(json.dumps(resource_config(request)))
        instance_count = int((request.get("ResourceConfig") or {}).get("InstanceCount", 1))
        if instance_count > 1:
            self.log(f"InstanceCount {instance_count}: the local backend runs one host ({LOCAL_HOST})")
        for channel in channels:
            name = channel["ChannelName"]
            self._materialise_channel(name, channel["DataSource"], paths["data"] / name)
        return paths

    def _stage_code(self, image: ImageSpec, code_root: Path) -> None:
        """The image's ``/opt/ml/code``: what its ``COPY`` lines put there, in order. The
        ``COPY`` into ``/opt/ml/code/`` itself takes :attr:`code_dir`."""
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        copies = list(image.code)
        roots = [i for i, (_, dest) in enumerate(copies) if PurePosixPath(dest) == IMAGE_CODE_DIR]
        if roots:
            copies[roots[0]] = (Path(self.code_dir), copies[roots[0]][1])
        else:
            copies.insert(0, (Path(self.code_dir), f"{IMAGE_CODE_DIR}/"))
        code_root.mkdir(parents=True, exist_ok=True)
        for source, dest in copies:
            if not source.exists():
                raise LocalJobError(f"the Dockerfile copies {source}, which does not exist")
            target = code_root / PurePosixPath(dest).relative_to(IMAGE_CODE_DIR)
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True, ignore=ignore)
            elif dest.endswith("/") or target.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / source.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        for name in ("requirements.txt", "setup.py"):
            if (code_root / name).exists():
                # The toolkit would pip-install it, here into the Airflow worker's venv.
                raise LocalJobError(f"/opt/ml/code/{name}: the toolkit would pip-install it; the image's "
                                    "packages belong in training_image/requirements-image.txt")

    def _link_checkpoints(self, request: Mapping[str, Any], ml_root: Path) -> None:
        """``CheckpointConfig.LocalPath`` is a folder kept per ``S3Uri``: SageMaker syncs the two,
        so a later job (a retry) with the same ``S3Uri`` starts with the checkpoints."""
        checkpoint = request.get("CheckpointConfig") or {}
        if not checkpoint.get("S3Uri"):
            return
        local_path = PurePosixPath(checkpoint.get("LocalPath") or "/opt/ml/checkpoints")
        if IMAGE_ML_ROOT not in local_path.parents:
            raise LocalJobError(f"CheckpointConfig.LocalPath {local_path} is not under {IMAGE_ML_ROOT}")
        store = self._checkpoint_store(checkpoint["S3Uri"])
        store.mkdir(parents=True, exist_ok=True)
        link = ml_root / local_path.relative_to(IMAGE_ML_ROOT)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(store, target_is_directory=True)
        self.log(f"checkpoints: {local_path} -> {store} (kept for {checkpoint['S3Uri']})")

    def _checkpoint_store(self, s3_uri: str) -> Path:
        return self.work_root / "_checkpoints" / re.sub(r"[^A-Za-z0-9._-]+", "_", s3_uri[5:]).strip("_")

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

    def _environment(self, request: Mapping[str, Any], paths: dict[str, Path], image: ImageSpec) -> dict[str, str]:
        """The container's environment: the image's ``ENV`` (the DLC's, then the Dockerfile's,
        ``/opt/ml`` read as the job folder), the request's ``Environment``, what SageMaker sets
        (``TRAINING_JOB_NAME`` / ``_ARN``), and ``SAGEMAKER_BASE_DIR``. Everything else is the
        toolkit's to set."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED_NAMES}
        # The venv stands in for the image's Python: its torchrun is the one the toolkit runs.
        env["PATH"] = os.pathsep.join([str(Path(self.python).parent), env.get("PATH", os.defpath)])
        env.update(BASE_IMAGE_ENV)
        env.update({k: self._rebase(v, paths["root"]) for k, v in image.env.items()})
        env.update(request.get("Environment") or {})
        name = request["TrainingJobName"]
        env.update(
            TRAINING_JOB_NAME=name,
            TRAINING_JOB_ARN=f"arn:aws:sagemaker:local:000000000000:training-job/{name}",
            SAGEMAKER_BASE_DIR=str(paths["root"]),
        )
        if self.processes > 1:
            # torchrun's rendezvous port (its --master_port reads PET_MASTER_PORT): a free one,
            # so two local jobs never meet on torchrun's fixed default.
            env["PET_MASTER_PORT"] = str(_free_port())
        return env

    @staticmethod
    def _rebase(value: str, ml_root: Path) -> str:
        """An image path under ``/opt/ml`` is that path under the job's folder."""
        if value == str(IMAGE_ML_ROOT) or value.startswith(f"{IMAGE_ML_ROOT}/"):
            return str(ml_root / PurePosixPath(value).relative_to(IMAGE_ML_ROOT))
        return value

    def _command(self) -> list[str]:
        return [self.python, *TOOLKIT_TRAIN]

    def _execute(self, request: Mapping[str, Any], paths: dict[str, Path], image: ImageSpec) -> dict[str, float]:
        metric_patterns = [
            (m["Name"], re.compile(m["Regex"]))
            for m in (request.get("AlgorithmSpecification") or {}).get("MetricDefinitions", [])
        ]
        max_runtime = (request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds")
        command = self._command()
        workdir = Path(self._rebase(str(image.workdir), paths["root"]))
        cwd = workdir if workdir.is_dir() else paths["code"]
        self.log(f"Launching {request['TrainingJobName']} with the SageMaker training toolkit: "
                 f"SAGEMAKER_BASE_DIR={paths['root']} {' '.join(command)}")
        env = self._environment(request, paths, image)
        with self._lock:
            self._stopped = False
            self._process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,  # its own process group (and session), like the container
            )
            self._note_process(paths["root"].parent, self._process.pid)
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
        if failure.exists() and failure.read_text(errors="replace").strip():
            text = failure.read_text(errors="replace").strip()
            # DescribeTrainingJob's FailureReason is the first 1024 characters of the file.
            return text if len(text) <= 1024 else text[:1021] + "..."
        if self._stopped:
            return "stopped (killed or MaxRuntimeInSeconds exceeded)"
        return f"the launcher exited with code {returncode} and wrote no failure file"

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

    @staticmethod
    def _launcher_version() -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return (f"sagemaker-training {version('sagemaker-training')}, "
                    f"sagemaker-pytorch-training {version('sagemaker-pytorch-training')}")
        except PackageNotFoundError as exc:
            raise LocalJobError(f"the local backend needs {exc.name} (training_image/requirements.txt)") from None

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
            # DescribeTrainingJob has no tags (ListTags does); the local record keeps them so
            # the operator can match a recorded job's request fingerprint.
            "Tags": request.get("Tags") or [],
            "Backend": "local",
            "LocalProcesses": self.processes,
        }

    @staticmethod
    def _record(job_dir: Path, description: Mapping[str, Any]) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        tmp = job_dir / (STATUS_FILE + ".tmp")
        tmp.write_text(json.dumps(description, indent=1, default=str))
        os.replace(tmp, job_dir / STATUS_FILE)


# --------------------------------------------------------------------------- config files


def input_data_config(request: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``/opt/ml/input/config/inputdataconfig.json`` as SageMaker writes it: per channel its
    ``ContentType`` (when the request sets one), ``TrainingInputMode`` (the channel's
    ``InputMode``, else the job's), ``S3DistributionType`` and ``RecordWrapperType``."""
    default_mode = (request.get("AlgorithmSpecification") or {}).get("TrainingInputMode", "File")
    out: dict[str, dict[str, str]] = {}
    for channel in request.get("InputDataConfig") or []:
        s3 = (channel.get("DataSource") or {}).get("S3DataSource") or {}
        entry: dict[str, str] = {}
        if channel.get("ContentType"):
            entry["ContentType"] = channel["ContentType"]
        entry["TrainingInputMode"] = channel.get("InputMode") or default_mode
        entry["S3DistributionType"] = s3.get("S3DataDistributionType", "FullyReplicated")
        entry["RecordWrapperType"] = channel.get("RecordWrapperType", "None")
        out[channel["ChannelName"]] = entry
    return out


def resource_config(request: Mapping[str, Any]) -> dict[str, Any]:
    """``/opt/ml/input/config/resourceconfig.json`` as SageMaker writes it for a one-host,
    homogeneous cluster, with a host name that resolves here (:data:`LOCAL_HOST`)."""
    instance_type = (request.get("ResourceConfig") or {}).get("InstanceType", "local")
    return {
        "current_host": LOCAL_HOST,
        "current_instance_type": instance_type,
        "current_group_name": INSTANCE_GROUP,
        "hosts": [LOCAL_HOST],
        "instance_groups": [
            {"instance_group_name": INSTANCE_GROUP, "instance_type": instance_type, "hosts": [LOCAL_HOST]}
        ],
        "network_interface_name": LOCAL_NETWORK_INTERFACE,
    }
