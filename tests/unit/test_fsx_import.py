"""The FSx import task against botocore's FSx model (issue #8, point 2).

moto does not implement FSx data repository tasks, so the calls go to a real botocore FSx
client with a ``Stubber``: the client validates every request against the service model
(required members, types, lengths), the stubber checks the exact parameters and answers with
responses validated against the model's output shapes, and the patterns the model declares
(which botocore's ParamValidator leaves out) are checked with the request validator's
pattern walker.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import botocore.session
import pytest
from botocore.stub import Stubber

from sku_retraining import fsx
from sku_retraining.config import load_config
from sku_retraining.jobs.request import model_constraint_errors

FS_ID = "fs-0123456789abcdef0"
TASK_ID = "task-0123456789abcdef0"


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    session = botocore.session.get_session()
    fsx_client = session.create_client("fsx", region_name="us-east-1")
    sent: list[tuple[str, dict]] = []

    def record(params, model, **_):
        sent.append((model.name, dict(params)))

    fsx_client.meta.events.register("provide-client-params.fsx.*", record)
    with Stubber(fsx_client) as stubber:
        yield fsx_client, stubber, sent
        stubber.assert_no_pending_responses()
    # Every request sent also keeps the model's patterns.
    service = session.get_service_model("fsx")
    for operation, params in sent:
        assert model_constraint_errors(service.operation_model(operation).input_shape, params) == [], operation


def _task(lifecycle: str, **extra) -> dict:
    return {"TaskId": TASK_ID, "Lifecycle": lifecycle, "Type": "IMPORT_METADATA_FROM_REPOSITORY",
            "CreationTime": "2026-12-01T03:00:00Z", "FileSystemId": FS_ID, **extra}


def _create_params(paths: list[str]) -> dict:
    return {"FileSystemId": FS_ID, "Type": "IMPORT_METADATA_FROM_REPOSITORY", "Paths": paths,
            "Report": {"Enabled": False}}


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_model_says_import_paths_are_s3_uris():
    """What this module's contract rests on, read from botocore's FSx model itself."""
    model = botocore.session.get_session().get_service_model("fsx")
    paths = model.operation_model("CreateDataRepositoryTask").input_shape.members["Paths"]
    doc = re.sub(r"<[^>]+>", "", paths.documentation)
    assert "For import tasks, the list contains paths in the Amazon S3 bucket" in doc
    assert "s3://bucket-name/prefix" in doc
    assert paths.metadata.get("max") == fsx.MAX_TASK_PATHS
    errors = {e.name for e in model.operation_model("CreateDataRepositoryTask").error_shapes}
    assert fsx.TASK_EXECUTING in errors
    assert fsx.TASK_ENDED in {e.name for e in model.operation_model("CancelDataRepositoryTask").error_shapes}


def test_import_batches_to_fsx_sends_s3_paths(client, monkeypatch):
    """The task the intake step starts names the batches' ``s3://bucket/prefix`` paths."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    from sku_retraining.tasks.intake import import_batches_to_fsx

    fsx_client, stubber, _ = client
    monkeypatch.setattr(AwsBaseHook, "get_conn", lambda self: fsx_client)
    cfg = load_config(environ={"SKU_RETRAINING_JOB_BACKEND": "sagemaker", "SKU_RETRAINING_DATA_BUCKET": "data-b"})
    cfg = cfg.__class__(**{**cfg.__dict__, "fsx": cfg.fsx.__class__(**{**cfg.fsx.__dict__, "file_system_id": FS_ID})})
    stubber.add_response("create_data_repository_task", {"DataRepositoryTask": _task("PENDING")},
                         _create_params(["s3://data-b/incoming/2026-11-a/", "s3://data-b/incoming/2026-11-b/"]))
    stubber.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [_task("SUCCEEDED")]},
                         {"TaskIds": [TASK_ID]})
    assert import_batches_to_fsx(["2026-11-a", "2026-11-b"], cfg) == 2


def test_waits_for_the_task_and_returns_its_id(client):
    fsx_client, stubber, _ = client
    clock = FakeTime()
    stubber.add_response("create_data_repository_task", {"DataRepositoryTask": _task("PENDING")},
                         _create_params(["s3://b/incoming/x/"]))
    for state in ("PENDING", "EXECUTING", "SUCCEEDED"):
        stubber.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [_task(state)]},
                             {"TaskIds": [TASK_ID]})
    ids = fsx.import_prefixes_to_aws_fsx(fsx_client, FS_ID, [fsx.s3_import_path("b", "incoming/x/")],
                                         poll_seconds=5, sleep=clock.sleep, clock=clock.clock)
    assert ids == [TASK_ID] and clock.sleeps == [5, 5]


def test_retries_with_backoff_while_another_task_executes(client):
    fsx_client, stubber, _ = client
    clock = FakeTime()
    for _ in range(3):
        stubber.add_client_error("create_data_repository_task", service_error_code=fsx.TASK_EXECUTING,
                                 service_message="An existing data repository task is currently executing",
                                 http_status_code=400, expected_params=_create_params(["s3://b/p/"]))
    stubber.add_response("create_data_repository_task", {"DataRepositoryTask": _task("PENDING")},
                         _create_params(["s3://b/p/"]))
    stubber.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [_task("SUCCEEDED")]},
                         {"TaskIds": [TASK_ID]})
    assert fsx.import_prefixes_to_aws_fsx(fsx_client, FS_ID, ["s3://b/p/"], busy_backoff_seconds=(10, 25),
                                          sleep=clock.sleep, clock=clock.clock) == [TASK_ID]
    assert clock.sleeps == [10, 20, 25]


def test_gives_up_when_the_other_task_keeps_running(client):
    fsx_client, stubber, _ = client
    clock = FakeTime()
    for _ in range(4):  # at 0, 20, 40 and 60 s; a fifth try would start after the 60 s
        stubber.add_client_error("create_data_repository_task", service_error_code=fsx.TASK_EXECUTING,
                                 http_status_code=400)
    with pytest.raises(fsx.FsxError, match="another data repository task was still running"):
        fsx.import_prefixes_to_aws_fsx(fsx_client, FS_ID, ["s3://b/p/"], busy_timeout_seconds=60,
                                       busy_backoff_seconds=(20, 20), sleep=clock.sleep, clock=clock.clock)
    assert clock.sleeps == [20, 20, 20]


def test_other_errors_are_not_retried(client):
    fsx_client, stubber, _ = client
    stubber.add_client_error("create_data_repository_task", service_error_code="FileSystemNotFound",
                             http_status_code=400)
    with pytest.raises(Exception, match="FileSystemNotFound"):
        fsx.import_prefixes_to_aws_fsx(fsx_client, FS_ID, ["s3://b/p/"], sleep=pytest.fail)


def test_timeout_cancels_our_task(client):
    fsx_client, stubber, _ = client
    clock = FakeTime()
    stubber.add_response("create_data_repository_task", {"DataRepositoryTask": _task("PENDING")},
                         _create_params(["s3://b/p/"]))
    for _ in range(3):
        stubber.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [_task("EXECUTING")]},
                             {"TaskIds": [TASK_ID]})
    stubber.add_response("cancel_data_repository_task", {"Lifecycle": "CANCELING", "TaskId": TASK_ID},
                         {"TaskId": TASK_ID})
    with pytest.raises(fsx.FsxError, match="still EXECUTING after 20 s: cancelled"):
        fsx.import_prefixes_to_aws_fsx(fsx_client, FS_ID, ["s3://b/p/"], poll_seconds=15, timeout_seconds=20,
                                       sleep=clock.sleep, clock=clock.clock)


def test_cancel_of_a_task_that_just_ended_is_not_an_error_of_its_own(client):
    fsx_client, stubber, _ = client
    clock = FakeTime()
    stubber.add_response("create_data_repository_task", {"DataRepositoryTask": _task("PENDING")},
                         _create_params(["s3://b/p/"]))
    for _ in range(2):
        stubber.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [_task("EXECUTING")]},
                             {"TaskIds": [TASK_ID]})
    stubber.add_client_error("cancel_data_repository_task", service_error_code=fsx.TASK_ENDED,
                             http_status_code=400, expected_params={"TaskId": TASK_ID})
    with pytest.raises(fsx.FsxError, match="cancelled"):
        fsx.import_prefixes_to_aws_fsx(fsx_client, FS_ID, ["s3://b/p/"], poll_seconds=15, timeout_seconds=10,
                                       sleep=clock.sleep, clock=clock.clock)


def test_failed_task_reports_its_failure_details(client):
    fsx_client, stubber, _ = client
    stubber.add_response("create_data_repository_task", {"DataRepositoryTask": _task("PENDING")},
                         _create_params(["s3://b/p/"]))
    stubber.add_response("describe_data_repository_tasks",
                         {"DataRepositoryTasks": [_task("FAILED", FailureDetails={"Message": "no association"})]},
                         {"TaskIds": [TASK_ID]})
    with pytest.raises(fsx.FsxError, match="FAILED: .*no association"):
        fsx.import_prefixes_to_aws_fsx(fsx_client, FS_ID, ["s3://b/p/"])


def test_more_than_100_paths_are_split_into_tasks(client):
    fsx_client, stubber, _ = client
    paths = [fsx.s3_import_path("b", f"incoming/{i:03d}/") for i in range(150)]
    for chunk in (paths[:100], paths[100:]):
        stubber.add_response("create_data_repository_task", {"DataRepositoryTask": _task("PENDING")},
                             _create_params(chunk))
        stubber.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [_task("SUCCEEDED")]},
                             {"TaskIds": [TASK_ID]})
    assert fsx.import_prefixes_to_aws_fsx(fsx_client, FS_ID, paths) == [TASK_ID, TASK_ID]


def test_bare_prefixes_are_refused():
    with pytest.raises(fsx.FsxError, match="s3://bucket/prefix"):
        fsx.import_prefixes_to_aws_fsx(SimpleNamespace(), FS_ID, ["incoming/x/"])
    assert fsx.s3_import_path("bucket", "/incoming/x/") == "s3://bucket/incoming/x/"
