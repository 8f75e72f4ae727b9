"""The ``sagemaker`` job backend against moto's SageMaker API (a real HTTP endpoint).

moto accepts CreateTrainingJob and reports every job ``Completed`` at once; the states it
cannot model (InProgress, Failed) are stubbed on the hook, the rest is the provider's code.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sku_retraining.config import load_config
from sku_retraining.jobs.naming import job_name
from sku_retraining.jobs.request import validate_request
from sku_retraining.operators import sagemaker_job
from sku_retraining.operators.augmentation import FsxAugmentationOperator
from sku_retraining.operators.evaluation import SkuEvaluationOperator
from sku_retraining.operators.training import SkuTrainingOperator

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
    ti = SimpleNamespace(dag_id="sku_retraining", task_id=task_id, try_number=try_number)
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
    first = training_operator(print_log=False)
    result = first.execute(context("train_model", try_number=1))
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    name = result["Training"]["TrainingJobName"]
    assert created_jobs(first) == [name]

    retry = training_operator(print_log=False)
    again = retry.execute(context("train_model", try_number=2))
    assert again["Training"]["TrainingJobName"] == name
    assert created_jobs(retry) == [name]  # no second paid job


def test_running_job_is_tailed_not_duplicated(cfg, monkeypatch):
    first = training_operator(print_log=False)
    name = first.execute(context("train_model"))["Training"]["TrainingJobName"]
    retry = training_operator(print_log=False)
    tailed = []
    real_describe = retry.hook.describe_training_job
    monkeypatch.setattr(retry.hook, "describe_training_job",
                        lambda n: {**real_describe(n), "TrainingJobStatus": "InProgress"} if not tailed else real_describe(n))
    monkeypatch.setattr(retry.hook, "check_training_status_with_log", lambda n, *a, **k: tailed.append(n))
    result = retry.execute(context("train_model", try_number=2))
    assert tailed == [name] and result["Training"]["TrainingJobName"] == name
    assert created_jobs(retry) == [name]


def test_failed_attempt_is_followed_by_a_new_attempt(cfg, monkeypatch):
    first = training_operator(print_log=False)
    name = first.execute(context("train_model"))["Training"]["TrainingJobName"]
    retry = training_operator(print_log=False)
    real_describe = retry.hook.describe_training_job
    monkeypatch.setattr(retry.hook, "describe_training_job",
                        lambda n: {**real_describe(n), "TrainingJobStatus": "Failed"} if n == name else real_describe(n))
    result = retry.execute(context("train_model", try_number=2))
    assert result["Training"]["TrainingJobName"] == f"{name}-t2"
    assert created_jobs(retry) == [name, f"{name}-t2"]


def test_on_kill_stops_the_running_job(cfg, monkeypatch):
    operator = training_operator(print_log=False)
    name = operator.execute(context("train_model"))["Training"]["TrainingJobName"]
    monkeypatch.setattr(operator.hook, "describe_training_job",
                        lambda n: {"TrainingJobName": n, "TrainingJobStatus": "InProgress"})
    stopped = []
    monkeypatch.setattr(operator.hook.conn, "stop_training_job", lambda **kw: stopped.append(kw))
    operator.on_kill()
    assert stopped == [{"TrainingJobName": name}]

    operator_done = training_operator(print_log=False)
    operator_done._active_job_name = name
    monkeypatch.setattr(operator_done.hook, "describe_training_job",
                        lambda n: {"TrainingJobName": n, "TrainingJobStatus": "Completed"})
    monkeypatch.setattr(operator_done.hook.conn, "stop_training_job", lambda **kw: stopped.append(kw))
    operator_done.on_kill()
    assert len(stopped) == 1  # a finished job is left alone


def test_log_streaming_path_works_against_the_api(cfg):
    """print_log=True (the DAG's setting) reads CloudWatch; moto has no streams for the job."""
    operator = training_operator()
    assert operator.print_log is True and operator.max_ingestion_time is None
    result = operator.execute(context("train_model"))
    assert result["Training"]["TrainingJobStatus"] == "Completed"
