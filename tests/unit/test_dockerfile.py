"""The training image's Dockerfile: hadolint-clean and shaped as SageMaker expects."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
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
    assert re.search(r"SAGEMAKER_PROGRAM=train\.py", text)
    assert "/opt/ml/code/weights/resnet152-imagenet.pth" in text and "hash_prefix" in text
    # torch must stay the DLC's: the image requirements never name it.
    image_requirements = (ROOT / "training_image" / "requirements-image.txt").read_text()
    assert not re.search(r"^(torch|torchvision)\b", image_requirements, re.M)
    for entry_point in ("train.py", "augment.py", "evaluate.py"):
        assert (ROOT / "training_image" / "code" / entry_point).is_file()


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
