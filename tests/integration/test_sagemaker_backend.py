"""The ``sagemaker`` job backend against moto's SageMaker API (a real HTTP endpoint).

moto accepts CreateTrainingJob and reports every job ``Completed`` at once; the states it
cannot model (InProgress, Failed) are stubbed on the hook, the rest is the provider's code.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from sku_retraining.config import load_config
from sku_retraining.jobs.naming import FINGERPRINT_TAG, job_name
from sku_retraining.jobs.request import validate_request
from sku_retraining.operators import sagemaker_job
from sku_retraining.operators.augmentation import FsxAugmentationOperator
from sku_retraining.operators.evaluation import SkuEvaluationOperator
from sku_retraining.operators.sagemaker_job import SageMakerJobError
from sku_retraining.operators.training import SkuTrainingOperator
from sku_retraining.triggers.sagemaker_job import SkuSageMakerJobTrigger

RUN_ID = "scheduled__2026-12-01T03:00:00+00:00"
SNAPSHOT = {"s3_uri": "s3://sku-retraining-data/datasets/ds-0123456789abcdef/", "num_classes": 12,
            "snapshot_id": "ds-0123456789abcdef"}
PRODUCTION = {"version": 1, "model_uri": "s3://sku-retraining-data/models/sku-recognition/v0001/model.tar.gz"}


@pytest.fixture
def cfg(s3_endpoint, s3_client, monkeypatch):
    # The provider checks that every S3 input exists before it creates the job.
    for uri in (SNAPSHOT["s3_uri"] + "train.csv", PRODUCTION["model_uri"]):
        s3_client.put_object(Bucket="sku-retraining-data", Key=uri.split("/", 3)[3], Body=b"x")
    monkeypatch.setenv("SKU_RETRAINING_JOB_BACKEND", "sagemaker")
    config = load_config()
    monkeypatch.setattr(sagemaker_job, "load_config_from_airflow", lambda: config)
    return config


def context(task_id: str, try_number: int = 1) -> dict:
    pushed: dict = {}
    ti = SimpleNamespace(dag_id="sku_retraining", task_id=task_id, try_number=try_number, run_id=RUN_ID,
                         map_index=-1, pushed=pushed, xcom_push=lambda key, value: pushed.__setitem__(key, value),
                         xcom_pull=lambda key=None, task_ids=None, **kw: pushed.get(key))
    return {"ti": ti, "run_id": RUN_ID, "params": {"batch_ids": ["2026-11-a"]}}


def training_operator(**kwargs) -> SkuTrainingOperator:
    return SkuTrainingOperator(task_id="train_model", snapshot=SNAPSHOT, production=PRODUCTION,
                               check_interval=0, **kwargs)


def created_jobs(operator) -> list[str]:
    return sorted(j["TrainingJobName"] for j in operator.hook.list_training_jobs())


def test_training_request_is_valid_and_accepted_by_the_api(cfg):
    operator = training_operator(use_spot=True, max_wait_hours=72)
    name = job_name("train", "sku_retraining", RUN_ID)
    request = operator.build_request(context("train_model"), cfg, name)
    validate_request(request, fsx_mount_name=cfg.fsx.mount_name)

    assert request["ResourceConfig"] == {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 2, "VolumeSizeInGB": 200}
    hps = request["HyperParameters"]
    assert hps["sagemaker_distributed_dataparallel_enabled"] == "true"
    assert hps["sagemaker_instance_type"] == "ml.p4d.24xlarge"
    assert hps["arch"] == "resnet152" and hps["image_size"] == "224" and hps["sagemaker_program"] == "train.py"
    channels = {c["ChannelName"]: c["DataSource"] for c in request["InputDataConfig"]}
    assert channels["images"]["FileSystemDataSource"]["FileSystemAccessMode"] == "ro"
    assert channels["model"]["S3DataSource"]["S3Uri"] == PRODUCTION["model_uri"]
    assert request["StoppingCondition"]["MaxWaitTimeInSeconds"] == 72 * 3600
    assert request["CheckpointConfig"]["S3Uri"].endswith(f"/checkpoints/{name}/")
    assert {m["Name"] for m in request["AlgorithmSpecification"]["MetricDefinitions"]} >= {
        "validation:top1", "train:loss"}
    tags = {t["Key"]: t["Value"] for t in request["Tags"]}
    assert tags["run_id"] == RUN_ID and tags["batch_ids"] == "2026-11-a"

    response = operator.hook.get_conn().create_training_job(**request)
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    described = operator.hook.describe_training_job(name)
    assert described["InputDataConfig"][0]["DataSource"]["FileSystemDataSource"]["DirectoryPath"] == "/fsx"


def test_augmentation_and_evaluation_requests_are_accepted(cfg):
    augment = FsxAugmentationOperator(
        task_id="augment_on_fsx", check_interval=0,
        augment_inputs={"s3_uri": "s3://sku-retraining-data/datasets/augment-inputs/x/", "count": 5,
                        "variants_per_image": 4},
    )
    request = augment.build_request(context("augment_on_fsx"), cfg, job_name("augment", "d", RUN_ID))
    validate_request(request, fsx_mount_name=cfg.fsx.mount_name)
    fsx = request["InputDataConfig"][0]["DataSource"]["FileSystemDataSource"]
    assert fsx["FileSystemAccessMode"] == "rw" and "VpcConfig" in request
    assert augment.hook.get_conn().create_training_job(**request)["ResponseMetadata"]["HTTPStatusCode"] == 200

    training = {"Training": {"ModelArtifacts": {"S3ModelArtifacts": "s3://sku-retraining-data/jobs/train/x/output/model.tar.gz"}}}
    evaluate = SkuEvaluationOperator(task_id="evaluate_model", training=training, snapshot=SNAPSHOT,
                                     production=None, check_interval=0)
    request = evaluate.build_request(context("evaluate_model"), cfg, job_name("evaluate", "d", RUN_ID))
    validate_request(request, fsx_mount_name=cfg.fsx.mount_name)
    assert {c["ChannelName"] for c in request["InputDataConfig"]} == {"challenger", "manifests", "images"}
    assert evaluate.hook.get_conn().create_training_job(**request)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_retry_reattaches_to_the_job_of_this_run_instead_of_starting_another(cfg):
    first = training_operator(print_log=False, deferrable=False)
    result = first.execute(context("train_model", try_number=1))
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    name = result["Training"]["TrainingJobName"]
    assert created_jobs(first) == [name]

    retry = training_operator(print_log=False, deferrable=False)
    again = retry.execute(context("train_model", try_number=2))
    assert again["Training"]["TrainingJobName"] == name
    assert created_jobs(retry) == [name]  # no second paid job


def test_changed_request_is_not_adopted(cfg, s3_client):
    """#8.6: after export_manifests is re-run (a new snapshot), a cleared train_model must not
    return the old snapshot's model: the job's fingerprint tag differs, a new attempt starts."""
    first = training_operator(print_log=False, deferrable=False)
    name = first.execute(context("train_model"))["Training"]["TrainingJobName"]
    tags = {t["Key"]: t["Value"] for t in first.hook.conn.list_tags(
        ResourceArn=first.hook.describe_training_job(name)["TrainingJobArn"])["Tags"]}
    assert len(tags[FINGERPRINT_TAG]) == 16

    new_snapshot = {**SNAPSHOT, "s3_uri": "s3://sku-retraining-data/datasets/ds-fedcba9876543210/",
                    "snapshot_id": "ds-fedcba9876543210"}
    s3_client.put_object(Bucket="sku-retraining-data", Key="datasets/ds-fedcba9876543210/train.csv", Body=b"x")
    cleared = SkuTrainingOperator(task_id="train_model", snapshot=new_snapshot, production=PRODUCTION,
                                  check_interval=0, print_log=False, deferrable=False)
    result = cleared.execute(context("train_model", try_number=1))  # a cleared task may restart at try 1
    assert result["Training"]["TrainingJobName"] == f"{name}-t2"
    channels = {c["ChannelName"]: c for c in result["Training"]["InputDataConfig"]}
    assert channels["manifests"]["DataSource"]["S3DataSource"]["S3Uri"] == new_snapshot["s3_uri"]
    assert created_jobs(cleared) == [name, f"{name}-t2"]

    # And the unchanged request re-attaches to its own job again, whichever attempt it was.
    again = SkuTrainingOperator(task_id="train_model", snapshot=new_snapshot, production=PRODUCTION,
                                check_interval=0, print_log=False, deferrable=False)
    assert again.execute(context("train_model", try_number=3))["Training"]["TrainingJobName"] == f"{name}-t2"
    assert created_jobs(again) == [name, f"{name}-t2"]


def test_changed_params_get_a_fresh_checkpoint_prefix(cfg):
    """#8.7: the checkpoint prefix is per request fingerprint, so a re-run with other params
    never meets the old params' checkpoints (train.py refuses to resume a different run)."""
    ctx = context("train_model")
    name = job_name("train", "sku_retraining", RUN_ID)
    same_a = training_operator(learning_rate=0.1)._final_request(ctx, cfg, name)
    same_b = training_operator(learning_rate="0.1")._final_request(ctx, cfg, name)
    other = training_operator(learning_rate=0.05)._final_request(ctx, cfg, name)
    prefix = f"s3://{cfg.data_bucket}/{cfg.prefixes.jobs}checkpoints/{name}/"
    assert same_a["CheckpointConfig"]["S3Uri"] == same_b["CheckpointConfig"]["S3Uri"]
    assert same_a["CheckpointConfig"]["S3Uri"].startswith(prefix)
    assert other["CheckpointConfig"]["S3Uri"].startswith(prefix)
    assert other["CheckpointConfig"]["S3Uri"] != same_a["CheckpointConfig"]["S3Uri"]
    # Retried attempts of the same request share one prefix (spot / retry resume).
    retry = training_operator(learning_rate=0.1)._final_request(ctx, cfg, f"{name}-t2")
    assert retry["CheckpointConfig"] == same_a["CheckpointConfig"]


def patch_status(monkeypatch, status: str, only: str | None = None, **extra) -> None:
    """moto reports every job Completed: report ``status`` for job ``only`` (or every job)."""
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    real = SageMakerHook.describe_training_job
    monkeypatch.setattr(SageMakerHook, "describe_training_job", lambda self, n: (
        {**real(self, n), "TrainingJobStatus": status, **extra} if only in (None, n) else real(self, n)))


def test_failed_attempt_is_followed_by_a_new_attempt(cfg, monkeypatch):
    first = training_operator(print_log=False, deferrable=False)
    name = first.execute(context("train_model"))["Training"]["TrainingJobName"]
    retry = training_operator(print_log=False, deferrable=False)
    patch_status(monkeypatch, "Failed", only=name)
    result = retry.execute(context("train_model", try_number=2))
    assert result["Training"]["TrainingJobName"] == f"{name}-t2"
    assert created_jobs(retry) == [name, f"{name}-t2"]


def test_job_is_waited_on_deferred_with_attempts_from_its_max_runtime(cfg):
    """#8.5: deferrable by default; the trigger outlives a multi-day job, uses the configured
    connection and region, and carries the request back to execute_complete."""
    operator = training_operator()
    assert operator.deferrable is True
    ctx = context("train_model")
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(ctx)
    # The console and CloudWatch buttons exist while the task is deferred (#11).
    pushed = ctx["ti"].pushed
    for key in ("sku_sagemaker_training_job", "sku_sagemaker_training_logs"):
        assert pushed[key]["job_name"] == deferred.value.trigger.job_name, pushed
        assert pushed[key]["region_name"] == cfg.region_name
    trigger = deferred.value.trigger
    assert isinstance(trigger, SkuSageMakerJobTrigger)
    assert deferred.value.method_name == "execute_complete"
    request = deferred.value.kwargs["request"]
    assert trigger.job_name == request["TrainingJobName"] == job_name("train", "sku_retraining", RUN_ID)
    runtime = request["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert runtime >= 24 * 3600
    assert trigger.waiter_delay == operator.check_interval or operator.check_interval == 0
    assert trigger.attempts * max(1, trigger.waiter_delay) >= runtime
    assert trigger.region_name == cfg.region_name and trigger.aws_conn_id == cfg.aws_conn_id
    classpath, kwargs = trigger.serialize()
    assert classpath == "sku_retraining.triggers.sagemaker_job.SkuSageMakerJobTrigger"
    assert kwargs["waiter_max_attempts"] == trigger.attempts
    assert operator.config == request  # what the Rendered Template tab shows after the task


def test_execute_complete_succeeds_fails_with_the_reason_or_reattaches(cfg, monkeypatch):
    operator = training_operator()
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context("train_model"))
    name, request = deferred.value.trigger.job_name, deferred.value.kwargs["request"]

    resumed = training_operator()  # the triggerer resumes the task in a fresh operator
    result = resumed.execute_complete(context("train_model"), {"status": "success", "job_name": name}, request=request)
    assert result["Training"]["TrainingJobName"] == name and resumed.config == request

    failed = training_operator()
    patch_status(monkeypatch, "Failed", FailureReason="AlgorithmError: CUDA out of memory")
    with pytest.raises(SageMakerJobError, match="Failed: AlgorithmError: CUDA out of memory"):
        failed.execute_complete(context("train_model"), {"status": "failed", "job_name": name, "message": "x"},
                                request=request)

    # The waiter ran out (or polling broke) while the job still runs: defer again, re-attached.
    running = training_operator()
    patch_status(monkeypatch, "InProgress")
    with pytest.raises(TaskDeferred) as again:
        running.execute_complete(context("train_model"), {"status": "timeout", "job_name": name}, request=request)
    assert again.value.trigger.job_name == name


def _stubbed_hook(status: str, name: str, expect_stop: bool):
    """A SageMakerHook whose client is botocore's Stubber: calls are checked against the
    service model (parameters and response shapes), not against our reading of it."""
    import boto3
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
    from botocore.stub import Stubber

    client = boto3.client("sagemaker", region_name="us-east-1")
    stubber = Stubber(client)
    stubber.add_response("describe_training_job", {
        "TrainingJobName": name, "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{name}",
        "ModelArtifacts": {"S3ModelArtifacts": ""}, "TrainingJobStatus": status, "SecondaryStatus": "Training",
        "AlgorithmSpecification": {"TrainingInputMode": "File"}, "ResourceConfig": {
            "InstanceType": "ml.p4d.24xlarge", "InstanceCount": 2, "VolumeSizeInGB": 200},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600}, "CreationTime": datetime(2026, 12, 1, tzinfo=UTC),
    }, {"TrainingJobName": name})
    if expect_stop:
        stubber.add_response("stop_training_job", {}, {"TrainingJobName": name})
    stubber.activate()
    hook = SageMakerHook(aws_conn_id=None, region_name="us-east-1")
    hook.__dict__["conn"] = client
    return hook, stubber


@pytest.mark.parametrize("status, stops", [("InProgress", True), ("Completed", False)])
def test_a_person_acting_on_the_deferred_task_stops_the_job(status, stops, monkeypatch):
    name = "sku-train-0123456789"
    hook, stubber = _stubbed_hook(status, name, expect_stop=stops)
    trigger = SkuSageMakerJobTrigger(job_name=name, job_type="Training", waiter_delay=60, waiter_max_attempts=10)
    monkeypatch.setattr(trigger, "hook", lambda: hook)
    asyncio.run(trigger.on_kill())  # the triggerer calls this on mark-failed / clear / mark-success
    stubber.assert_no_pending_responses()  # stop_training_job was called exactly when expected


def test_worker_shutdown_and_triggerer_restart_stop_nothing(cfg, monkeypatch):
    """SIGTERM to the worker (on_kill) or a triggerer moving the trigger (cleanup) leave the job."""
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    stops = []
    monkeypatch.setattr(SageMakerHook, "stop_training_job", lambda self, *a, **k: stops.append(a), raising=False)
    operator = training_operator()
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context("train_model"))
    real_conn = operator.hook.conn
    monkeypatch.setattr(operator.hook, "describe_training_job",
                        lambda n: {"TrainingJobName": n, "TrainingJobStatus": "InProgress"})
    monkeypatch.setattr(real_conn, "stop_training_job", lambda **kw: stops.append(kw))
    operator.on_kill()  # the task SDK's SIGTERM handler
    asyncio.run(deferred.value.trigger.cleanup())  # what a triggerer shutdown runs
    assert stops == []

def test_log_streaming_path_works_against_the_api(cfg):
    """print_log=True (the DAG's setting) reads CloudWatch; moto has no streams for the job."""
    operator = training_operator(deferrable=False)
    assert operator.print_log is True and operator.max_ingestion_time is None
    result = operator.execute(context("train_model"))
    assert result["Training"]["TrainingJobStatus"] == "Completed"
