"""The local job backend: jobs launched by the SageMaker training toolkit (no Airflow needed).

The entry points below are tiny scripts in a code folder of the test's own; the runner stages
it as the image's ``/opt/ml/code`` (with the Dockerfile's other ``COPY`` lines), applies the
Dockerfile's ``ENV`` and runs the toolkit's ``train``, which picks and runs the program.
"""

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
    # Records what the job saw: the SM_* variables, config files, arguments and channel contents.
    "show.py": """
        import json, os, pathlib, sys
        import sku_contracts  # the Dockerfile copies it next to the job code
        env = {k: v for k, v in os.environ.items() if k.startswith(("SM_", "SAGEMAKER_", "TRAINING_JOB"))}
        model = pathlib.Path(os.environ["SM_MODEL_DIR"])
        config = pathlib.Path(os.environ["SM_INPUT_CONFIG_DIR"])
        seen = {
            "env": env,
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "pythonpath": os.environ.get("PYTHONPATH", ""),
            "code": sorted(p.name for p in pathlib.Path.cwd().iterdir()),
            "hyperparameters": json.loads((config / "hyperparameters.json").read_text()),
            "resourceconfig": json.loads((config / "resourceconfig.json").read_text()),
            "inputdataconfig": json.loads((config / "inputdataconfig.json").read_text()),
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
    # A parent that starts two children, one in a session of its own (as torchrun starts its
    # workers): stop() must kill them all, and the toolkit above them.
    "hang.py": """
        import os, pathlib, subprocess, sys, time
        sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
        child = subprocess.Popen(sleep)
        detached = subprocess.Popen(sleep, start_new_session=True)
        pids = f"{os.getppid()} {os.getpid()} {child.pid} {detached.pid}"
        pathlib.Path(os.environ["SM_MODEL_DIR"], "pids").write_text(pids)
        print("started", flush=True)
        time.sleep(600)
    """,
    # Under the toolkit's torch-distributed runner: a gloo all-reduce across the processes.
    "dist.py": """
        import torch, torch.distributed as dist
        import os
        dist.init_process_group("gloo")
        t = torch.ones(1)
        dist.all_reduce(t)
        # One write(2) per line: the ranks share the pipe, and print() writes the text and the
        # newline separately, so two ranks' lines could interleave ("rank 1 ...rank 0 ...").
        line = f"rank {dist.get_rank()} of {dist.get_world_size()} sum {int(t.item()) // dist.get_world_size()}\\n"
        os.write(1, line.encode())
        dist.destroy_process_group()
    """,
    # SageMaker's CheckpointConfig.LocalPath is /opt/ml/checkpoints: the base dir's "checkpoints".
    "count.py": """
        import os, pathlib
        marker = pathlib.Path(os.environ.get("SAGEMAKER_BASE_DIR", "/opt/ml"), "checkpoints", "runs")
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


def test_contract_env_files_channels_outputs_and_metrics(setup, monkeypatch):
    runner, s3, lines, tmp_path = setup
    # The Airflow worker's secrets and import path never reach the job.
    monkeypatch.setenv("AIRFLOW_CONN_SECRET", "postgres://user:pw@host/db")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "worker-only"))
    description = runner.run(request("show.py", channels=(
        Channel("images", "fsx", "incoming/b1"),
        Channel("manifests", "s3", f"s3://{BUCKET}/datasets/ds-1/", content_type="text/csv"),
    )))

    assert description["TrainingJobStatus"] == "Completed"
    assert description["ModelArtifacts"]["S3ModelArtifacts"] == (
        f"s3://{BUCKET}/jobs/test/sku-test-job/output/model.tar.gz"
    )
    assert {m["MetricName"]: m["Value"] for m in description["FinalMetricDataList"]} == {"val_top1": 0.75}
    assert description["LocalLaunch"]["Launcher"].startswith("sagemaker-training 5.")
    model = read_tar(s3, "jobs/test/sku-test-job/output/model.tar.gz")
    seen = json.loads(model["seen.json"])
    assert read_tar(s3, "jobs/test/sku-test-job/output/output.tar.gz") == {"extra.txt": b"output data"}

    # The config files, as SageMaker writes them.
    assert seen["hyperparameters"] == {"epochs": "2", "lr": "0.1", "sagemaker_program": "show.py"}
    assert seen["inputdataconfig"] == {
        "images": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"},
        "manifests": {"ContentType": "text/csv", "TrainingInputMode": "File",
                      "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"},
    }
    assert seen["resourceconfig"] == {
        "current_host": "localhost", "current_instance_type": "ml.c5.xlarge",
        "current_group_name": "homogeneousCluster", "hosts": ["localhost"],
        "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": "ml.c5.xlarge",
                             "hosts": ["localhost"]}],
        "network_interface_name": "lo",
    }
    # What the toolkit made of them: decoded hyperparameters (sagemaker_* ones left out), the
    # SM_* variables, and the hyperparameters again as arguments.
    env = seen["env"]
    assert json.loads(env["SM_HPS"]) == {"epochs": 2, "lr": 0.1}
    assert env["SM_USER_ENTRY_POINT"] == "show.py" and env["SM_MODULE_NAME"] == "show"
    assert json.loads(env["SM_HOSTS"]) == ["localhost"] and env["SM_CURRENT_HOST"] == "localhost"
    assert json.loads(env["SM_CHANNELS"]) == ["images", "manifests"]
    ml = runner.work_root / "sku-test-job" / "ml"
    assert env["SAGEMAKER_BASE_DIR"] == str(ml)
    assert env["SM_CHANNEL_IMAGES"] == str(ml / "input" / "data" / "images")
    assert env["SM_MODEL_DIR"] == str(ml / "model") and env["SM_OUTPUT_DATA_DIR"] == str(ml / "output" / "data")
    assert env["SM_NUM_GPUS"] == "0"
    assert env["SM_FRAMEWORK_MODULE"] == "sagemaker_pytorch_container.training:main"  # the DLC's ENV
    assert env["SAGEMAKER_SUBMIT_DIRECTORY"] == str(ml / "code")  # the Dockerfile's ENV, /opt/ml rebased
    assert "SAGEMAKER_PROGRAM" not in env
    assert env["TRAINING_JOB_NAME"] == "sku-test-job"
    assert seen["argv"][1:] == ["--epochs", "2", "--lr", "0.1"]
    # /opt/ml/code: the test's code folder plus what the Dockerfile copies next to it.
    assert seen["cwd"] == str(ml / "code") and "sku_contracts" in seen["code"] and "show.py" in seen["code"]
    assert "worker-only" not in seen["pythonpath"]
    assert seen["images"] == ["a.jpg"]  # the FSx channel is the local FSx folder
    assert seen["manifest"].startswith("path,class_index")  # the S3 channel was downloaded
    # Streamed into the log: the job's lines and the toolkit's own.
    assert "METRIC epoch=2 val_top1=0.7500" in lines
    text = "\n".join(lines)
    assert "sagemaker_pytorch_container.training INFO     Invoking user training script." in text
    assert "Reporting training SUCCESS" in text
    assert "AIRFLOW_CONN_SECRET" not in text and "pw@host" not in text


def test_failure_file_becomes_the_error(setup):
    runner, _, lines, tmp_path = setup
    with pytest.raises(LocalJobError, match="failed: ValueError: manifest train.csv is empty"):
        runner.run(request("fail.py"))
    assert "about to fail" in lines
    recorded = runner.describe("sku-test-job")
    assert recorded["TrainingJobStatus"] == "Failed"
    assert recorded["FailureReason"] == "ValueError: manifest train.csv is empty"


def test_exit_code_without_failure_file_is_reported_by_the_toolkit(setup):
    runner, *_ = setup
    with pytest.raises(LocalJobError, match=r"(?s)failed: .*ExecuteUserScriptError.*ExitCode 7"):
        runner.run(request("crash.py"))
    reason = runner.describe("sku-test-job")["FailureReason"]
    assert len(reason) <= 1024  # DescribeTrainingJob's FailureReason: the file's first 1024 characters


def test_missing_fsx_directory_and_entry_point_are_clear_errors(setup):
    runner, *_ = setup
    with pytest.raises(LocalJobError, match=r"FSx directory /fsxmount/incoming/nope .* does not exist"):
        runner.run(request("show.py", channels=(Channel("images", "fsx", "incoming/nope"),)))
    with pytest.raises(LocalJobError, match=r"(?s)failed: .*missing\.py"):
        runner.run(request("missing.py", channels=()))


def test_torch_distributed_runner_on_cpu(setup):
    """Several local processes: the toolkit's torch-distributed runner (torchrun), gloo on CPU."""
    runner, _, lines, _ = setup
    runner.processes = 2
    runner.run(request("dist.py", channels=()))
    text = "\n".join(lines)
    assert "Invoking TorchDistributed..." in text
    assert "torchrun --nnodes 1 --nproc_per_node 2 dist.py --epochs 2 --lr 0.1" in text
    assert sorted(line for line in lines if line.startswith("rank ")) == ["rank 0 of 2 sum 1", "rank 1 of 2 sum 1"]


def test_smddp_request_is_refused_locally(setup):
    runner, *_ = setup
    with pytest.raises(LocalJobError, match="needs SMDDP"):
        runner.run(request("show.py", smddp=True, instance_type="ml.p4d.24xlarge"))


def _run_in_thread(runner, job) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run():
        try:
            runner.run(job)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_stop_kills_the_launcher_the_job_and_all_its_children(setup):
    runner, *_ = setup
    thread, errors = _run_in_thread(runner, request("hang.py", channels=()))
    pids_file = runner.work_root / "sku-test-job" / "ml" / "model" / "pids"
    deadline = time.monotonic() + 60
    while not (pids_file.exists() and pids_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(p) for p in pids_file.read_text().split()]  # toolkit, job, child, detached grandchild
    assert pids[0] == runner._process.pid  # the job runs under the toolkit's process
    runner.stop()
    thread.join(timeout=60)
    assert isinstance(errors[0], LocalJobError) and "stopped" in str(errors[0])
    deadline = time.monotonic() + 10  # the kernel may take a moment to tear a process down
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        assert not pid_alive(pid), f"process {pid} survived stop()"
    assert runner.describe("sku-test-job")["TrainingJobStatus"] == "Stopped"


def test_max_runtime_stops_the_job(setup):
    runner, *_ = setup
    job = request("hang.py", channels=(), max_runtime_seconds=3)
    started = time.monotonic()
    with pytest.raises(LocalJobError, match="stopped"):
        runner.run(job)
    assert time.monotonic() - started < 30


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
    assert (runner.work_root / "sku-test-job-t2" / "ml" / "checkpoints").resolve() == checkpoints.resolve()


def test_leftover_of_a_superseded_local_job_is_killed(tmp_path):
    """A worker died while job A ran; the retry's request changed (job B): A's leftovers die."""
    import subprocess as sp

    from sku_retraining.jobs.local import LocalJobRunner as Runner

    runner = Runner(work_root=tmp_path, code_dir=tmp_path, fsx_root=tmp_path, fsx_mount_name="fsx",
                    s3_client=None, log=lambda line: None)
    job_dir = tmp_path / "sku-train-0123456789"
    job_dir.mkdir()
    leftover = sp.Popen(["sleep", "60"], cwd=job_dir, start_new_session=True)  # noqa: S607 - test process
    try:
        import psutil

        record = {"TrainingJobName": job_dir.name, "TrainingJobStatus": "InProgress",
                  "LocalProcess": {"pgid": leftover.pid, "create_time": psutil.Process(leftover.pid).create_time()}}
        (job_dir / "job.json").write_text(json.dumps(record))
        runner.kill_leftovers(job_dir.name)
        assert leftover.wait(timeout=10) == -9
    finally:
        if leftover.poll() is None:
            leftover.kill()
