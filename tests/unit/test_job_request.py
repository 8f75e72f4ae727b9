"""CreateTrainingJob requests: built from a JobSpec, validated against botocore's model."""

from __future__ import annotations

import copy

import pytest

from sku_retraining.jobs.naming import attempt_names, job_name
from sku_retraining.jobs.request import (
    Channel,
    FsxTarget,
    JobSpec,
    RequestValidationError,
    build_request,
    validate_request,
)

MOUNT = "abcdefgh"


def spec(**overrides) -> JobSpec:
    values = dict(
        job_name="sku-train-0123456789",
        program="train.py",
        image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/sku-retraining-training:1",
        role_arn="arn:aws:iam::123456789012:role/sagemaker",
        output_s3_uri="s3://bucket/jobs/train/",
        instance_type="ml.p4d.24xlarge",
        instance_count=2,
        channels=(
            Channel("images", "fsx", "incoming"),
            Channel("manifests", "s3", "s3://bucket/datasets/ds-1/"),
        ),
        fsx=FsxTarget("fs-0123456789abcdef0", MOUNT),
        subnets=("subnet-0123",),
        security_group_ids=("sg-0123",),
        smddp=True,
        hyperparameters={"epochs": 3, "amp": True},
        tags={"dag_id": "sku_retraining"},
        checkpoint_s3_uri="s3://bucket/checkpoints/run-1/",
        metric_definitions=({"Name": "val_top1", "Regex": r"val_top1=([0-9.]+)"},),
    )
    values.update(overrides)
    return JobSpec(**values)


def test_training_request_has_fsx_vpc_smddp_and_string_hyperparameters():
    request = build_request(spec())
    validate_request(request, fsx_mount_name=MOUNT)
    fsx = request["InputDataConfig"][0]["DataSource"]["FileSystemDataSource"]
    assert fsx == {
        "FileSystemId": "fs-0123456789abcdef0", "FileSystemType": "FSxLustre",
        "FileSystemAccessMode": "ro", "DirectoryPath": f"/{MOUNT}/incoming",
    }
    assert request["VpcConfig"] == {"Subnets": ["subnet-0123"], "SecurityGroupIds": ["sg-0123"]}
    hps = request["HyperParameters"]
    assert hps["sagemaker_distributed_dataparallel_enabled"] == "true"
    assert hps["sagemaker_instance_type"] == "ml.p4d.24xlarge"
    assert hps["sagemaker_program"] == "train.py"
    assert hps["epochs"] == "3" and hps["amp"] == "true"
    assert request["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert request["ResourceConfig"]["InstanceCount"] == 2


def test_augmentation_channel_is_read_write_at_the_mount_root():
    request = build_request(spec(program="augment.py", smddp=False, instance_type="ml.c5.18xlarge",
                                 channels=(Channel("images", "fsx", "", access_mode="rw"),)))
    validate_request(request, fsx_mount_name=MOUNT)
    fsx = request["InputDataConfig"][0]["DataSource"]["FileSystemDataSource"]
    assert fsx["DirectoryPath"] == f"/{MOUNT}" and fsx["FileSystemAccessMode"] == "rw"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("RoleArn"), 'Missing required parameter in input: "RoleArn"'),
        (lambda r: r.__setitem__("TrainingJobName", "bad_name!"), "TrainingJobName: 'bad_name!' does not match"),
        (lambda r: r["ResourceConfig"].__setitem__("InstanceCount", "2"), "ResourceConfig.InstanceCount"),
        (lambda r: r["ResourceConfig"].__setitem__("InstanceType", "ml.nope.huge"), "ResourceConfig.InstanceType"),
        (lambda r: r["InputDataConfig"][0]["DataSource"]["FileSystemDataSource"].__setitem__(
            "DirectoryPath", "/other/incoming"), "must start with /abcdefgh"),
        (lambda r: r["InputDataConfig"][0]["DataSource"]["FileSystemDataSource"].__setitem__(
            "DirectoryPath", f"/{MOUNT}/../etc"), "normalised"),
        (lambda r: r.pop("VpcConfig"), "VpcConfig: FSx for Lustre channels need VpcConfig"),
        (lambda r: r["HyperParameters"].__setitem__("epochs", 3), "HyperParameters['epochs']: must be a string"),
        (lambda r: r["HyperParameters"].pop("sagemaker_program"), "sagemaker_program"),
        (lambda r: r["ResourceConfig"].__setitem__("InstanceType", "ml.g5.12xlarge"), "does not support SMDDP"),
    ],
)
def test_each_bad_field_is_named(mutate, message):
    request = copy.deepcopy(build_request(spec()))
    mutate(request)
    with pytest.raises(RequestValidationError) as error:
        validate_request(request, fsx_mount_name=MOUNT)
    assert message in str(error.value)


def test_spot_needs_max_wait_and_checkpoints():
    request = build_request(spec(use_spot=True, max_wait_seconds=100, max_runtime_seconds=3600))
    with pytest.raises(RequestValidationError, match="MaxWaitTimeInSeconds"):
        validate_request(request, fsx_mount_name=MOUNT)
    request = build_request(spec(use_spot=True, checkpoint_s3_uri=None))
    with pytest.raises(RequestValidationError, match="CheckpointConfig"):
        validate_request(request, fsx_mount_name=MOUNT)
    ok = build_request(spec(use_spot=True))
    validate_request(ok, fsx_mount_name=MOUNT)
    assert ok["StoppingCondition"]["MaxWaitTimeInSeconds"] >= ok["StoppingCondition"]["MaxRuntimeInSeconds"]


def test_job_names_are_stable_per_run_and_valid():
    first = job_name("train", "sku_retraining", "scheduled__2026-12-01T03:00:00+00:00")
    assert first == job_name("train", "sku_retraining", "scheduled__2026-12-01T03:00:00+00:00")
    assert first != job_name("train", "sku_retraining", "manual__2026-12-01T03:00:00+00:00")
    names = attempt_names("train", "sku_retraining", "r", 3)
    assert names == [names[0], f"{names[0]}-t2", f"{names[0]}-t3"]
    for name in names:
        validate_request(build_request(spec(job_name=name)), fsx_mount_name=MOUNT)
