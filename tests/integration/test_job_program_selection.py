"""Each job kind runs its own program when AWS's launcher starts it (issue #8, point 1).

The request is the one the project's operators build (``build_request`` of the augmentation,
training and evaluation operators, local backend); the local backend launches it with the
SageMaker training toolkit and the PyTorch container's ``training.main``, as the DLC does, with
the ``ENV`` lines of ``training_image/Dockerfile`` applied. The image's job code is replaced by
one-line programs that say who they are, so the test shows which program the launcher picked.

An ``ENV SAGEMAKER_PROGRAM=...`` in the Dockerfile wins over the ``sagemaker_program``
hyperparameter in the toolkit (``environment.Environment``), so every job would run that one
program: this test fails then.
"""

from __future__ import annotations

import io
import tarfile
import textwrap
from types import SimpleNamespace

import boto3
import pytest
from moto import mock_aws

from sku_retraining.config import load_config
from sku_retraining.jobs.local import LocalJobRunner
from sku_retraining.jobs.naming import job_name
from sku_retraining.jobs.request import validate_request
from sku_retraining.operators.augmentation import FsxAugmentationOperator
from sku_retraining.operators.evaluation import SkuEvaluationOperator
from sku_retraining.operators.training import SkuTrainingOperator

BUCKET = "sku-retraining-data"
RUN_ID = "scheduled__2026-12-01T03:00:00+00:00"
SNAPSHOT = {"s3_uri": f"s3://{BUCKET}/datasets/ds-0123456789abcdef/", "num_classes": 2,
            "snapshot_id": "ds-0123456789abcdef"}
AUGMENT_INPUTS = {"s3_uri": f"s3://{BUCKET}/datasets/augment-inputs/x/", "count": 3, "variants_per_image": 2}
CHALLENGER = f"s3://{BUCKET}/jobs/train/x/output/model.tar.gz"

# Stand-ins for the image's entry points: each records its own name (every process of a
# torch-distributed job does; they agree).
PROGRAM = """
    import os, pathlib, sys
    name = pathlib.Path(__file__).name
    print(f"PROGRAM {name} rank {os.environ.get('RANK', '-')}", flush=True)
    pathlib.Path(os.environ["SM_OUTPUT_DATA_DIR"], "program.txt").write_text(name)
"""


def _operators():
    return {
        "augment": FsxAugmentationOperator(task_id="augment_on_fsx", augment_inputs=AUGMENT_INPUTS),
        "train": SkuTrainingOperator(task_id="train_model", snapshot=SNAPSHOT, production=None),
        "evaluate": SkuEvaluationOperator(
            task_id="evaluate_model", snapshot=SNAPSHOT, production=None,
            training={"Training": {"ModelArtifacts": {"S3ModelArtifacts": CHALLENGER}}},
        ),
    }


@pytest.fixture
def stack(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    for program in ("augment.py", "train.py", "evaluate.py"):
        (code / program).write_text(textwrap.dedent(PROGRAM))
    fsx = tmp_path / "fsx"
    fsx.mkdir()
    cfg = load_config(environ={
        "SKU_RETRAINING_JOB_BACKEND": "local", "SKU_RETRAINING_FSX_ROOT": str(fsx),
        "SKU_RETRAINING_DATA_BUCKET": BUCKET,
    })
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for uri in (SNAPSHOT["s3_uri"] + "train.csv", AUGMENT_INPUTS["s3_uri"] + "augment_inputs.csv", CHALLENGER):
            s3.put_object(Bucket=BUCKET, Key=uri.split("/", 3)[3], Body=b"x")
        yield cfg, code, s3, tmp_path


def _program_that_ran(s3, description) -> str:
    output = description["ModelArtifacts"]["S3ModelArtifacts"].replace("model.tar.gz", "output.tar.gz")
    body = s3.get_object(Bucket=BUCKET, Key=output.split("/", 3)[3])["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return tar.extractfile("program.txt").read().decode()


@pytest.mark.parametrize(("kind", "program"), [("augment", "augment.py"), ("train", "train.py"),
                                               ("evaluate", "evaluate.py")])
def test_the_launcher_runs_the_program_the_request_names(stack, kind, program):
    cfg, code, s3, tmp_path = stack
    operator = _operators()[kind]
    context = {"ti": SimpleNamespace(dag_id="sku_retraining", task_id=operator.task_id, try_number=1),
               "run_id": RUN_ID, "params": {"batch_ids": ["2026-11-a"]}}
    request = operator.build_request(context, cfg, job_name(kind, "sku_retraining", RUN_ID))
    validate_request(request, fsx_mount_name=cfg.fsx.mount_name)
    assert request["HyperParameters"]["sagemaker_program"] == program

    lines: list[str] = []
    runner = LocalJobRunner(
        work_root=tmp_path / "jobs", code_dir=code, fsx_root=cfg.fsx.local_path(),
        fsx_mount_name=cfg.fsx.mount_name, s3_client=s3, processes=operator.local_processes_for(cfg),
        log=lines.append,
    )
    description = runner.run(request)

    assert _program_that_ran(s3, description) == program
    text = "\n".join(lines)
    # The toolkit's own launcher lines are in the log, naming the program it started.
    assert "Invoking user training script." in text
    invoked = lines[lines.index("Invoking script with the following command:") + 2]
    assert f" {program} " in f"{invoked} "
    assert {line.split()[1] for line in lines if line.startswith("PROGRAM ")} == {program}
