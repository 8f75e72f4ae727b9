"""``SkuSageMakerJobTrigger``: the provider's ``SageMakerTrigger`` (the triggerer polls the job
with the ``TrainingJobComplete`` waiter) plus *who stops a paid job*.

- A person marking the deferred task failed or success, or clearing it: the triggerer calls
  :meth:`on_kill` (Airflow ≥ 3.3 ``BaseTrigger.on_kill``) → the job is stopped.
- The triggerer shutting down or moving the trigger, or a worker restarting: only
  ``cleanup()`` runs → the job keeps running and the trigger resumes on a triggerer.
"""

from __future__ import annotations

import math

from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

#: Added to the job's own time bound when sizing the waiter: instance provisioning, image pull,
#: data download and the model upload happen outside ``MaxRuntimeInSeconds``.
PROVISIONING_MARGIN_SECONDS = 2 * 3600
STOPPABLE_STATES = ("InProgress",)


def waiter_attempts(request: dict, waiter_delay: int) -> int:
    """Waiter attempts covering the job's whole life (the provider's default, 60 polls of
    ``check_interval``, gives up on a multi-day job after an hour)."""
    stopping = request.get("StoppingCondition") or {}
    bound = max(int(stopping.get("MaxRuntimeInSeconds") or 0), int(stopping.get("MaxWaitTimeInSeconds") or 0))
    return max(1, math.ceil((bound + PROVISIONING_MARGIN_SECONDS) / max(1, waiter_delay)))


class SkuSageMakerJobTrigger(SageMakerTrigger):
    """Waits for one training job (see the module docstring)."""

    async def on_kill(self) -> None:
        from asgiref.sync import sync_to_async

        hook = self.hook()
        try:
            status = (await sync_to_async(hook.describe_training_job)(self.job_name))["TrainingJobStatus"]
            if status not in STOPPABLE_STATES:
                self.log.info("Task acted on by a user; job %s is %s: nothing to stop", self.job_name, status)
                return
            self.log.info("Task acted on by a user (mark failed / clear): stopping SageMaker job %s", self.job_name)
            await sync_to_async(hook.conn.stop_training_job)(TrainingJobName=self.job_name)
        except Exception:  # noqa: BLE001 - the triggerer ignores on_kill errors; say what to do
            self.log.exception("Could not stop SageMaker job %s; stop it by hand "
                               "(aws sagemaker stop-training-job --training-job-name %s)", self.job_name, self.job_name)
