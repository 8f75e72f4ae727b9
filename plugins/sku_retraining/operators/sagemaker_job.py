"""``SkuSageMakerJobOperator``: the provider's ``SageMakerTrainingOperator``, made safe to retry
and able to run the same request on the local job backend.

Why a subclass (the provider operator falls short in three ways for multi-day paid jobs):

1. **Retries re-attach.** With ``check_if_job_exists`` the provider either fails or starts a
   *second* job with a timestamped name when the task is retried; here the job name is
   derived from the DAG run (:mod:`sku_retraining.jobs.naming`), and a retry looks for the
   run's newest attempt: still running → tail its log until it ends; completed → return it;
   failed or stopped → start attempt ``-t<try>``.
2. **Killing the task stops the job** (``on_kill``): marking the task failed in the UI or a
   timeout would otherwise leave a p4d cluster running.
3. **Two backends.** ``job_backend`` (configuration or argument) ``local`` runs the request
   with :class:`~sku_retraining.jobs.local.LocalJobRunner` and returns the same XCom shape.

The request is built at run time by :meth:`build_request` (subclasses: augmentation,
training, evaluation) and validated against botocore's service model before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator, serialize

from sku_retraining.config import PROJECT_ROOT, PipelineConfig, load_config_from_airflow
from sku_retraining.jobs.naming import attempt_names

if TYPE_CHECKING:
    from airflow.sdk import Context

TRAINING_CODE_DIR = PROJECT_ROOT / "training_image" / "code"
RUNNING_STATES = ("InProgress", "Stopping")


class SkuSageMakerJobOperator(SageMakerTrainingOperator):
    """Run one of the project's container jobs (see the module docstring).

    :param job_kind: short name used in the job name (``augment``, ``train``, ``evaluate``).
    :param job_backend: ``local`` or ``sagemaker``; default: the configuration's ``job_backend``.
    :param config: a ready ``CreateTrainingJob`` request (templated); subclasses build it instead.
    :param local_processes: processes for the local backend (> 1 runs under ``torchrun``).
    """

    template_fields: Sequence[str] = (*SageMakerTrainingOperator.template_fields, "job_backend")

    def __init__(
        self,
        *,
        job_kind: str,
        job_backend: str | None = None,
        config: dict | None = None,
        local_processes: int = 1,
        check_interval: int = 60,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("print_log", True)
        # A multi-day job must not be given up on by the poller: no ingestion limit.
        kwargs.setdefault("max_ingestion_time", None)
        super().__init__(
            config=config or {},
            check_if_job_exists=False,
            check_interval=check_interval,
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

    # -- execution ------------------------------------------------------------------------

    def execute(self, context: Context) -> dict:
        from sku_retraining.jobs.request import validate_request

        cfg = load_config_from_airflow()
        backend = self.job_backend or cfg.job_backend
        ti = context["ti"]
        names = attempt_names(self.job_kind, ti.dag_id, context["run_id"], int(getattr(ti, "try_number", 1) or 1))
        if backend == "local":
            self.config = self.build_request(context, cfg, names[-1])
            validate_request(self.config, fsx_mount_name=cfg.fsx.mount_name)
            return self._execute_local(cfg)
        if backend != "sagemaker":
            raise ValueError(f"job_backend must be 'local' or 'sagemaker', got {backend!r}")
        return self._execute_sagemaker(context, cfg, names)

    def _execute_sagemaker(self, context: Context, cfg: PipelineConfig, names: list[str]) -> dict:
        from sku_retraining.jobs.request import validate_request

        newest_status = None
        newest_name = None
        for name in names:  # newest attempt first
            status = self._job_status(name)
            if status is not None:
                newest_name, newest_status = name, status
                break
        if newest_status in RUNNING_STATES or newest_status == "Completed":
            self.log.info("Job %s of this run is %s: re-attaching instead of starting another", newest_name,
                          newest_status)
            self._active_job_name = newest_name
            if newest_status != "Completed":
                self.hook.check_training_status_with_log(
                    newest_name, self.hook.non_terminal_states, self.hook.training_failed_states,
                    wait_for_completion=True, check_interval=self.check_interval,
                    max_ingestion_time=self.max_ingestion_time,
                )
            return self.serialize_result(newest_name)

        name = names[0]
        if newest_status is not None:
            self.log.info("Previous attempt %s ended %s; starting %s", newest_name, newest_status, name)
        self.config = self.build_request(context, cfg, name)
        validate_request(self.config, fsx_mount_name=cfg.fsx.mount_name)
        self._active_job_name = name
        result = super().execute(context)
        return result if isinstance(result, dict) and "Training" in result else self.serialize_result(name)

    def _job_status(self, name: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.hook.describe_training_job(name)["TrainingJobStatus"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ValidationException":
                return None  # "Requested resource not found"
            raise

    def _execute_local(self, cfg: PipelineConfig) -> dict:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from sku_retraining.jobs.local import LocalJobRunner

        self._local_runner = LocalJobRunner(
            work_root=Path(cfg.fsx.local_path()).parent / "jobs",
            code_dir=TRAINING_CODE_DIR,
            fsx_root=cfg.fsx.local_path(),
            fsx_mount_name=cfg.fsx.mount_name,
            s3_client=S3Hook(aws_conn_id=self.aws_conn_id or cfg.aws_conn_id).get_conn(),
            processes=self.local_processes_for(cfg),
            log=lambda line: self.log.info("%s", line),
        )
        self._active_job_name = self.config["TrainingJobName"]
        description = self._local_runner.run(self.config)
        return {"Training": serialize(description)}

    def on_kill(self) -> None:
        """Stop the job this task started (local process group or SageMaker job)."""
        if self._local_runner is not None:
            self._local_runner.stop()
            return
        name = self._active_job_name
        if not name:
            return
        try:
            if self._job_status(name) in ("InProgress",):
                self.log.info("Task killed: stopping SageMaker job %s", name)
                self.hook.conn.stop_training_job(TrainingJobName=name)
        except Exception:  # noqa: BLE001 - best effort while being killed; say so
            self.log.exception("Could not stop SageMaker job %s; stop it by hand", name)
