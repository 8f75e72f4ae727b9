"""The training image's Dockerfile: hadolint-clean and shaped as SageMaker expects."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "training_image" / "Dockerfile"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_structure():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \$\{BASE_ACCOUNT\}\.dkr\.ecr\.\$\{REGION\}\.amazonaws\.com/pytorch-training:\$\{BASE_TAG\}$",
                     text, re.M)
    assert "ARG BASE_TAG=2.5.1-gpu-py311-cu124-ubuntu22.04-sagemaker" in text
    assert "ARG REGION=" in text
    assert "COPY training_image/code/ /opt/ml/code/" in text
    # The contracts package both sides import sits next to the job code in the image.
    assert "COPY plugins/sku_contracts/ /opt/ml/code/sku_contracts/" in text
    assert "/opt/ml/code/weights/resnet152-imagenet.pth" in text and "hash_prefix" in text
    # torch must stay the DLC's: the image requirements never name it.
    image_requirements = (ROOT / "training_image" / "requirements-image.txt").read_text()
    assert not re.search(r"^(torch|torchvision)\b", image_requirements, re.M)
    for entry_point in ("train.py", "augment.py", "evaluate.py"):
        assert (ROOT / "training_image" / "code" / entry_point).is_file()


def test_env_and_code_as_the_local_backend_reads_them():
    """No SAGEMAKER_PROGRAM: the DLC's launcher reads it before the ``sagemaker_program``
    hyperparameter, so augmentation and evaluation jobs would run train.py (issue #8, point 1)."""
    from sku_retraining.jobs.local import read_dockerfile

    image = read_dockerfile(DOCKERFILE, ROOT)
    assert "SAGEMAKER_PROGRAM" not in image.env
    assert image.env["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/code"
    assert image.code == (
        (ROOT / "training_image" / "code", "/opt/ml/code/"),
        (ROOT / "plugins" / "sku_contracts", "/opt/ml/code/sku_contracts/"),
    )
    assert str(image.workdir) == "/opt/ml/code"


def test_dockerfile_reader(tmp_path):
    """ENV forms, continuation lines, comments inside them, variables, stages, COPY --from."""
    from sku_retraining.jobs.local import read_dockerfile

    (tmp_path / "src").mkdir()
    (tmp_path / "one.py").write_text("")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(textwrap.dedent("""\
        FROM builder AS build
        ENV DROPPED=1
        FROM base
        ARG WHERE=/opt/ml
        ENV A=1 \\
        # a comment inside the continued instruction
            B="two words" \\
            C=${WHERE}/code
        ENV LEGACY value with spaces
        WORKDIR /opt/ml/code
        COPY src/ ./pkg/
        COPY one.py /opt/ml/code/
        COPY --from=build /x /opt/ml/code/x
        COPY one.py /elsewhere/
    """))
    image = read_dockerfile(dockerfile, tmp_path)
    assert image.env == {"A": "1", "B": "two words", "C": "/opt/ml/code", "LEGACY": "value with spaces"}
    assert image.code == ((tmp_path / "src", "/opt/ml/code/pkg/"), (tmp_path / "one.py", "/opt/ml/code/"))


def test_job_code_imports_only_the_contracts_package():
    """The image has ``sku_jobs`` and ``sku_contracts`` only: no Airflow, no ``sku_retraining``."""
    import ast

    forbidden = ("airflow", "sku_retraining", "sku_dev")
    roots = [ROOT / "training_image" / "code", ROOT / "plugins" / "sku_contracts"]
    offenders = []
    for root in roots:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not offenders, offenders
    contracts = [p.name for p in (ROOT / "plugins" / "sku_contracts").glob("*.py")]
    for path in (ROOT / "plugins" / "sku_contracts").glob("*.py"):
        tree = ast.parse(path.read_text())
        third_party = [
            n.module for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and n.level == 0
            and n.module.split(".")[0] not in ("__future__", "sku_contracts", *sys.stdlib_module_names)
        ]
        assert not third_party, f"{path.name} imports {third_party}: sku_contracts is standard library only"
    assert "metrics.py" in contracts and "ids.py" in contracts
