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
    assert "COPY code/ /opt/ml/code/" in text
    assert re.search(r"SAGEMAKER_PROGRAM=train\.py", text)
    assert "/opt/ml/code/weights/resnet152-imagenet.pth" in text and "hash_prefix" in text
    # torch must stay the DLC's: the image requirements never name it.
    image_requirements = (ROOT / "training_image" / "requirements-image.txt").read_text()
    assert not re.search(r"^(torch|torchvision)\b", image_requirements, re.M)
    for entry_point in ("train.py", "augment.py", "evaluate.py"):
        assert (ROOT / "training_image" / "code" / entry_point).is_file()
