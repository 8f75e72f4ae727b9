"""``SkuSageMakerJobOperator``: the provider's ``SageMakerTrainingOperator``, made safe for
multi-day paid jobs and able to run the same request on the local job backend.

Why a subclass (the provider operator falls short for this pipeline):

1. **Deferrable by default, sized to the job.** After ``CreateTrainingJob`` the task defers to
   :class:`~sku_retraining.triggers.sagemaker_job.SkuSageMakerJobTrigger` (the provider's
   ``SageMakerTrigger``), whose waiter attempts come from the request's
   ``MaxRuntimeInSeconds`` / ``MaxWaitTimeInSeconds`` (the provider's default gives up after
   an hour). No worker slot is held while a p4d job runs for days.
2. **Who stops the job.** A person marking the deferred task failed/success or clearing it →
   the trigger's ``on_kill`` stops the job. A worker or triggerer restarting → nothing is
   stopped: the task SDK sends the same SIGTERM for a worker shutdown as for a user action,
   so the worker-side :meth:`on_kill` never stops a SageMaker job; the retry re-attaches.
3. **Re-attach only to what this request would compute.** Every job is tagged with
   :func:`~sku_retraining.jobs.naming.request_fingerprint` of its request (dataset snapshot,
   hyperparameters, image, channels...). A retried or cleared task walks the run's attempt
   names (``sku-<kind>-<run hash>``, ``-t2``, ...): a Completed or running job with the same
   fingerprint is adopted; anything else (failed, stopped, or a different request, e.g. after
   ``export_manifests`` was re-run) is passed over and the next free name is started. A
   *running* job of this run whose request is superseded is stopped first.
4. **Configuration at run time.** ``aws_conn_id`` and ``region_name`` default to the
   configuration's (read when the task runs, never at parse time); the request is built by
   :meth:`build_request` (subclasses) and validated against botocore's service model, and is
   what the Rendered Template tab shows as ``config``.
5. **Two backends.** ``job_backend`` ``local`` runs the request with
   :class:`~sku_retraining.jobs.local.LocalJobRunner` and waits in place (the job is a child
   process group of the task: detaching it would leave processes behind on a dev machine);
   it returns the same XCom shape, ``{"Training": DescribeTrainingJob-like dict}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator, serialize

from sku_retraining.config import PROJECT_ROOT, PipelineConfig, load_config_from_airflow
from sku_retraining.jobs.naming import FINGERPRINT_TAG, attempt_names, request_fingerprint, tag_value

if TYPE_CHECKING:
    from airflow.sdk import Context

TRAINING_CODE_DIR = PROJECT_ROOT / "training_image" / "code"
RUNNING_STATES = ("InProgress", "Stopping")
_UNSET: Any = object()


class SageMakerJobError(RuntimeError):
    """The job failed or was stopped; the message carries SageMaker's FailureReason."""


class SkuSageMakerJobOperator(SageMakerTrainingOperator):
    """Run one of the project's container jobs (see the module docstring).

    :param job_kind: short name used in the job name (``augment``, ``train``, ``evaluate``).
    :param job_backend: ``local`` or ``sagemaker``; default: the configuration's ``job_backend``.
    :param config: a ready ``CreateTrainingJob`` request (templated); subclasses build it instead.
    :param local_processes: processes for the local backend (> 1 runs under ``torchrun``).
    :param deferrable: wait for a SageMaker job in the triggerer (default ``True``).
    :param check_interval: seconds between status polls.
    :param aws_conn_id: default: the configuration's ``aws_conn_id``.
    :param region_name: default: the configuration's ``region_name``.
    """

    template_fields: Sequence[str] = (*SageMakerTrainingOperator.template_fields, "job_backend")
    # The request is built at run time: send the final one to the Rendered Template tab.
    overwrite_rtif_after_execution = True

    def __init__(
        self,
        *,
        job_kind: str,
        job_backend: str | None = None,
        config: dict | None = None,
        local_processes: int = 1,
        check_interval: int = 60,
        deferrable: bool = True,
        aws_conn_id: str | None = _UNSET,
        region_name: str | None = _UNSET,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("print_log", True)
        # A multi-day job must not be given up on by the synchronous poller: no ingestion limit.
        kwargs.setdefault("max_ingestion_time", None)
        self._conn_from_config = aws_conn_id is _UNSET
        self._region_from_config = region_name is _UNSET
        if not self._conn_from_config:
            kwargs["aws_conn_id"] = aws_conn_id
        if not self._region_from_config:
            kwargs["region_name"] = region_name
        super().__init__(
            config=config or {},
            check_if_job_exists=False,
            check_interval=check_interval,
            deferrable=deferrable,
            **kwargs,
        )
        self.job_kind = job_kind
        self.job_backend = job_backend
        self.local_processes = local_processes
        self._local_runner = None
        self._active_job_name: str | None = None

    # -- to override ----------------------------------------------------------------------

    def build_request(self, context: Context, cfg: PipelineConfig, job_name: str) -> dict[str, Any]:
        """Return the ``CreateTrainingJob`` request; default: the templated ``config``."""
        return {**self.config, "TrainingJobName": job_name}

    def local_processes_for(self, cfg: PipelineConfig) -> int:
        return self.local_processes

    # -- configuration --------------------------------------------------------------------

    def _apply_config(self, cfg: PipelineConfig) -> None:
        """Connection and region from configuration unless given to the operator."""
        before = (self.aws_conn_id, self.region_name)
        if self._conn_from_config:
            self.aws_conn_id = cfg.aws_conn_id
        if self._region_from_config:
            self.region_name = cfg.region_name
        if (self.aws_conn_id, self.region_name) != before:
            self.__dict__.pop("hook", None)  # the provider's cached hook was built with the old values

    def _backend(self, cfg: PipelineConfig) -> str:
        backend = self.job_backend or cfg.job_backend
        if backend not in ("local", "sagemaker"):
            raise ValueError(f"job_backend must be 'local' or 'sagemaker', got {backend!r}")
        return backend

    def _final_request(self, context: Context, cfg: PipelineConfig, job_name: str) -> dict[str, Any]:
        """The request, tagged with its fingerprint; a checkpoint prefix gets the fingerprint
        appended, so a run re-run with other params never resumes the old params' checkpoints."""
        from sku_retraining.jobs.request import validate_request

        request = self.build_request(context, cfg, job_name)
        fingerprint = request_fingerprint(request)
        checkpoint = request.get("CheckpointConfig")
        if checkpoint and checkpoint.get("S3Uri"):
            request["CheckpointConfig"] = {**checkpoint, "S3Uri": f"{checkpoint['S3Uri'].rstrip('/')}/{fingerprint}/"}
        tags = [t for t in request.get("Tags") or [] if t.get("Key") != FINGERPRINT_TAG]
        request["Tags"] = [*tags, {"Key": FINGERPRINT_TAG, "Value": fingerprint}]
        validate_request(request, fsx_mount_name=cfg.fsx.mount_name)
        return request

    # -- execution ------------------------------------------------------------------------

    def execute(self, context: Context) -> dict:
        cfg = load_config_from_airflow()
        self._apply_config(cfg)
        backend = self._backend(cfg)
        ti = context["ti"]
        names = attempt_names(self.job_kind, ti.dag_id, context["run_id"])
        request = self._final_request(context, cfg, names[0])
        fingerprint = tag_value(request["Tags"], FINGERPRINT_TAG)
        name, status = self._choose_attempt(names, fingerprint, local=backend == "local", cfg=cfg)
        self.config = {**request, "TrainingJobName": name}
        self._active_job_name = name
        self.log.info("Job %s, request fingerprint %s", name, fingerprint)
        if backend == "local":
            return self._execute_local(cfg)
        from sku_retraining.operators.links import persist_job_links

        # Console and CloudWatch buttons while the job runs (Airflow stores links at task end otherwise).
        persist_job_links(context, self, cfg=cfg, job_name=name)
        if status == "Completed":
            self.log.info("Job %s of this run already completed with this request: re-attaching", name)
            return self.serialize_result(name)
        if status in RUNNING_STATES:
            self.log.info("Job %s of this run is %s with this request: re-attaching", name, status)
            return self._wait(name)
        self.preprocess_config()
        self.log.info("Creating SageMaker training job %s", name)
        response = self.hook.create_training_job(self.config, wait_for_completion=False, print_log=False)
        if response["ResponseMetadata"]["HTTPStatusCode"] != 200:
            raise SageMakerJobError(f"CreateTrainingJob {name} failed: {response}")
        return self._wait(name)

    def _choose_attempt(
        self, names: list[str], fingerprint: str | None, *, local: bool, cfg: PipelineConfig
    ) -> tuple[str, str | None]:
        """``(name, status)``: the run's job to adopt (status set) or the next free name (``None``)."""
        for name in names:
            status, job_fingerprint = self._lookup(name, local=local, cfg=cfg)
            if status is None:
                return name, None
            if job_fingerprint == fingerprint and (status == "Completed" or status in RUNNING_STATES):
                return name, status
            if local and job_fingerprint == fingerprint and status not in ("Failed", "Stopped"):
                return name, status  # a local job left InProgress by a dead worker: run it again, resuming
            reason = f"request fingerprint {job_fingerprint}" if job_fingerprint != fingerprint else status
            self.log.info("Passing over job %s (%s, %s): not this request's result", name, status, reason)
            if status == "InProgress" and job_fingerprint != fingerprint:
                self.log.warning("Job %s runs a superseded request of this run: stopping it", name)
                if local:
                    self._runner(cfg).kill_leftovers(name)  # left by a dead worker, if anything
                else:
                    self.hook.conn.stop_training_job(TrainingJobName=name)
        raise SageMakerJobError(f"all {len(names)} attempt names of this run are used; start a new DAG run")

    def _lookup(self, name: str, *, local: bool, cfg: PipelineConfig) -> tuple[str | None, str | None]:
        """``(status, fingerprint)`` of job ``name``, ``(None, None)`` when there is none."""
        if local:
            recorded = self._runner(cfg).describe(name)
            if not recorded:
                return None, None
            return recorded["TrainingJobStatus"], tag_value(recorded.get("Tags"), FINGERPRINT_TAG)
        from botocore.exceptions import ClientError

        try:
            description = self.hook.describe_training_job(name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ValidationException":
                return None, None  # "Requested resource not found"
            raise
        tags = self.hook.conn.list_tags(ResourceArn=description["TrainingJobArn"]).get("Tags", [])
        return description["TrainingJobStatus"], tag_value(tags, FINGERPRINT_TAG)

    def _wait(self, name: str) -> dict:
        if self.deferrable:
            from sku_retraining.triggers.sagemaker_job import SkuSageMakerJobTrigger, waiter_attempts

            self.defer(
                trigger=SkuSageMakerJobTrigger(
                    job_name=name,
                    job_type="Training",
                    waiter_delay=self.check_interval,
                    waiter_max_attempts=waiter_attempts(self.config, self.check_interval),
                    aws_conn_id=self.aws_conn_id,
                    region_name=self.region_name,
                    verify=self.verify,
                    botocore_config=self.botocore_config,
                ),
                method_name="execute_complete",
                kwargs={"request": self.config},
            )
        # Synchronous (deferrable=False): the provider's pollers, as its own operator waits.
        if self.print_log:
            self.hook.check_training_status_with_log(
                name, self.hook.non_terminal_states, self.hook.training_failed_states,
                wait_for_completion=True, check_interval=self.check_interval,
                max_ingestion_time=self.max_ingestion_time,
            )
        else:
            description = self.hook.check_status(
                name, "TrainingJobStatus", self.hook.describe_training_job, self.check_interval,
                self.max_ingestion_time, self.hook.non_terminal_states,
            )
            if description["TrainingJobStatus"] in self.hook.training_failed_states:
                raise SageMakerJobError(f"SageMaker job {name} {description['TrainingJobStatus']}: "
                                        f"{description.get('FailureReason') or '(no reason given)'}")
        return self.serialize_result(name)

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, request: dict | None = None
    ) -> dict[str, dict]:
        """Resume after the trigger: succeed, fail with the job's FailureReason, or re-attach."""
        cfg = load_config_from_airflow()
        self._apply_config(cfg)
        self.config = request or {}
        if not event or "job_name" not in event:
            raise SageMakerJobError(f"trigger returned no job: {event!r}")
        name = event["job_name"]
        self._active_job_name = name
        status = event.get("status")
        if status == "success":
            self.log.info("SageMaker job %s completed", name)
            return self.serialize_result(name)
        description = self.hook.describe_training_job(name)
        job_status = description["TrainingJobStatus"]
        if job_status == "Completed":
            return self.serialize_result(name)
        if job_status in RUNNING_STATES:
            # The waiter ran out of attempts or the poll failed while the job still runs.
            self.log.warning("Trigger ended with %s (%s) while job %s is %s: re-attaching", status,
                             event.get("message"), name, job_status)
            return self._wait(name)
        reason = description.get("FailureReason") or event.get("message") or "(no reason given)"
        raise SageMakerJobError(f"SageMaker job {name} {job_status}: {reason}")

    # -- local backend --------------------------------------------------------------------

    def _runner(self, cfg: PipelineConfig):
        if self._local_runner is None:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            from sku_retraining.jobs.local import LocalJobRunner
            from sku_retraining.tasks.hooks import aws_hook

            self._local_runner = LocalJobRunner(
                work_root=Path(cfg.fsx.local_path()).parent / "jobs",
                code_dir=TRAINING_CODE_DIR,
                fsx_root=cfg.fsx.local_path(),
                fsx_mount_name=cfg.fsx.mount_name,
                s3_client=aws_hook(cfg, S3Hook, aws_conn_id=self.aws_conn_id).get_conn(),
                processes=self.local_processes_for(cfg),
                log=lambda line: self.log.info("%s", line),
            )
        return self._local_runner

    def _execute_local(self, cfg: PipelineConfig) -> dict:
        description = self._runner(cfg).run(self.config)
        return {"Training": serialize(description)}

    def on_kill(self) -> None:
        """Worker side: stop a *local* job (a child process group of this task).

        A SageMaker job is never stopped here: the task SDK sends this task the same SIGTERM
        for a worker shutdown (deploy, scale-in, pod eviction) as for a person acting on it,
        so stopping would kill a multi-day job on every deploy. A person marking the deferred
        task failed or clearing it stops the job through the trigger's ``on_kill``; the retry
        of a killed task re-attaches to the still-running job by its request fingerprint.
        """
        if self._local_runner is not None:
            self._local_runner.stop()
            return
        if self._active_job_name:
            self.log.warning(
                "Task process terminated; SageMaker job %s keeps running (a retry re-attaches to it). "
                "To stop it: mark the task failed while it is deferred, or "
                "`aws sagemaker stop-training-job --training-job-name %s`.",
                self._active_job_name, self._active_job_name,
            )
