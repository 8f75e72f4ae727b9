"""The local job backend keeps the SageMaker training-container contract (no Airflow needed)."""

from __future__ import annotations

import io
import json
import tarfile
import textwrap
import threading
import time

import boto3
import pytest
from moto import mock_aws

from sku_dev.local_stack import pid_alive
from sku_retraining.jobs.local import LocalJobError, LocalJobRunner
from sku_retraining.jobs.request import Channel, FsxTarget, JobSpec, build_request

BUCKET = "jobs-bucket"
MOUNT = "fsxmount"

ENTRY_POINTS = {
    # Records what the job saw: the SM_* variables, config files and channel contents.
    "inspect.py": """
        import json, os, pathlib
        env = {k: v for k, v in os.environ.items() if k.startswith("SM_")}
        model = pathlib.Path(os.environ["SM_MODEL_DIR"])
        config = pathlib.Path(os.environ["SM_INPUT_CONFIG_DIR"])
        seen = {
            "env": env,
            "hyperparameters": json.loads((config / "hyperparameters.json").read_text()),
            "resourceconfig": json.loads((config / "resourceconfig.json").read_text()),
            "images": sorted(p.name for p in pathlib.Path(os.environ["SM_CHANNEL_IMAGES"]).iterdir()),
            "manifest": (pathlib.Path(os.environ["SM_CHANNEL_MANIFESTS"]) / "train.csv").read_text(),
        }
        (model / "seen.json").write_text(json.dumps(seen))
        out = pathlib.Path(os.environ["SM_OUTPUT_DATA_DIR"])
        (out / "extra.txt").write_text("output data")
        print("METRIC epoch=1 val_top1=0.5000")
        print("METRIC epoch=2 val_top1=0.7500")
    """,
    "fail.py": """
        import os, pathlib, sys
        print("about to fail")
        pathlib.Path(os.environ["SM_OUTPUT_DIR"], "failure").write_text("ValueError: manifest train.csv is empty")
        sys.exit(3)
    """,
    "crash.py": """
        import sys
        print("no failure file")
        sys.exit(7)
    """,
    # A parent that starts a child: stop() must kill both.
    "hang.py": """
        import os, pathlib, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pathlib.Path(os.environ["SM_MODEL_DIR"], "pids").write_text(f"{os.getpid()} {child.pid}")
        print("started", flush=True)
        time.sleep(600)
    """,
    "count.py": """
        import os, pathlib
        marker = pathlib.Path(os.environ["SM_CHECKPOINT_DIR"]) / "runs"
        marker.write_text(str(int(marker.read_text()) + 1 if marker.exists() else 1))
        print("runs", marker.read_text())
    """,
}


@pytest.fixture
def setup(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    for name, body in ENTRY_POINTS.items():
        (code / name).write_text(textwrap.dedent(body))
    fsx = tmp_path / "fsx"
    (fsx / "incoming" / "b1").mkdir(parents=True)
    (fsx / "incoming" / "b1" / "a.jpg").write_bytes(b"jpeg")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="datasets/ds-1/train.csv", Body=b"path,class_index\nx,0\n")
        lines: list[str] = []
        runner = LocalJobRunner(
            work_root=tmp_path / "jobs", code_dir=code, fsx_root=fsx, fsx_mount_name=MOUNT,
            s3_client=s3, log=lines.append, grace_seconds=3,
        )
        yield runner, s3, lines, tmp_path


def request(program: str, name: str = "sku-test-job", **overrides) -> dict:
    values = dict(
        job_name=name, program=program, image_uri="img:1", role_arn="arn:aws:iam::123456789012:role/r",
        output_s3_uri=f"s3://{BUCKET}/jobs/test/", instance_type="ml.c5.xlarge",
        channels=(Channel("images", "fsx", "incoming/b1"), Channel("manifests", "s3", f"s3://{BUCKET}/datasets/ds-1/")),
        fsx=FsxTarget("fs-0123", MOUNT), subnets=("s",), security_group_ids=("g",),
        hyperparameters={"epochs": 2, "lr": 0.1},
        metric_definitions=({"Name": "val_top1", "Regex": r"val_top1=([0-9.]+)"},),
    )
    values.update(overrides)
    return build_request(JobSpec(**values))


def read_tar(s3, key: str) -> dict[str, bytes]:
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_contract_env_files_channels_outputs_and_metrics(setup):
    runner, s3, lines, _ = setup
    description = runner.run(request("inspect.py"))

    assert description["TrainingJobStatus"] == "Completed"
    assert description["ModelArtifacts"]["S3ModelArtifacts"] == (
        f"s3://{BUCKET}/jobs/test/sku-test-job/output/model.tar.gz"
    )
    assert {m["MetricName"]: m["Value"] for m in description["FinalMetricDataList"]} == {"val_top1": 0.75}
    model = read_tar(s3, "jobs/test/sku-test-job/output/model.tar.gz")
    seen = json.loads(model["seen.json"])
    assert read_tar(s3, "jobs/test/sku-test-job/output/output.tar.gz") == {"extra.txt": b"output data"}

    env = seen["env"]
    assert json.loads(env["SM_HOSTS"]) == ["algo-1"] and env["SM_CURRENT_HOST"] == "algo-1"
    assert json.loads(env["SM_CHANNELS"]) == ["images", "manifests"]
    assert json.loads(env["SM_HPS"])["epochs"] == "2"
    assert seen["hyperparameters"]["sagemaker_program"] == "inspect.py"
    assert seen["resourceconfig"]["hosts"] == ["algo-1"]
    assert seen["images"] == ["a.jpg"]  # the FSx channel is the local FSx folder
    assert seen["manifest"].startswith("path,class_index")  # the S3 channel was downloaded
    assert "METRIC epoch=2 val_top1=0.7500" in lines  # streamed into the log


def test_failure_file_becomes_the_error(setup):
    runner, _, lines, tmp_path = setup
    with pytest.raises(LocalJobError, match="failed: ValueError: manifest train.csv is empty"):
        runner.run(request("fail.py"))
    assert "about to fail" in lines
    recorded = runner.describe("sku-test-job")
    assert recorded["TrainingJobStatus"] == "Failed"
    assert recorded["FailureReason"] == "ValueError: manifest train.csv is empty"


def test_exit_code_without_failure_file_is_reported(setup):
    runner, *_ = setup
    with pytest.raises(LocalJobError, match="exited with code 7 and wrote no failure file"):
        runner.run(request("crash.py"))


def test_missing_fsx_directory_and_entry_point_are_clear_errors(setup):
    runner, *_ = setup
    with pytest.raises(LocalJobError, match=r"FSx directory /fsxmount/incoming/nope .* does not exist"):
        runner.run(request("inspect.py", channels=(Channel("images", "fsx", "incoming/nope"),)))
    with pytest.raises(LocalJobError, match="entry point 'missing.py' not found"):
        runner.run(request("missing.py", channels=()))


def test_stop_kills_the_job_and_its_children(setup):
    runner, *_ = setup
    errors: list[BaseException] = []

    def run():
        try:
            runner.run(request("hang.py", channels=()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    pids_file = runner.work_root / "sku-test-job" / "ml" / "model" / "pids"
    deadline = time.monotonic() + 60
    while not (pids_file.exists() and pids_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    parent, child = (int(p) for p in pids_file.read_text().split())
    runner.stop()
    thread.join(timeout=30)
    assert isinstance(errors[0], LocalJobError) and "stopped" in str(errors[0])
    deadline = time.monotonic() + 10  # the kernel may take a moment to tear a process down
    while any(pid_alive(p) for p in (parent, child)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in (parent, child):
        assert not pid_alive(pid), f"process {pid} survived stop()"
    assert runner.describe("sku-test-job")["TrainingJobStatus"] == "Stopped"


def test_max_runtime_stops_the_job(setup):
    runner, *_ = setup
    job = request("hang.py", channels=(), max_runtime_seconds=2)
    started = time.monotonic()
    with pytest.raises(LocalJobError, match="stopped"):
        runner.run(job)
    assert time.monotonic() - started < 20


def test_completed_job_is_reattached_not_rerun_and_checkpoints_persist(setup):
    runner, *_ = setup
    job = request("count.py", channels=(), checkpoint_s3_uri=f"s3://{BUCKET}/checkpoints/run-1/")
    runner.run(job)
    again = runner.run(job)
    assert again["TrainingJobStatus"] == "Completed"
    checkpoints = next((runner.work_root / "_checkpoints").iterdir())
    assert (checkpoints / "runs").read_text() == "1"  # not run a second time
    # A new job of the same run (e.g. a retried attempt) sees the same checkpoint folder.
    runner.run(request("count.py", name="sku-test-job-t2", channels=(),
                       checkpoint_s3_uri=f"s3://{BUCKET}/checkpoints/run-1/"))
    assert (checkpoints / "runs").read_text() == "2"
