"""train.py's freeze policy and warm-start levers, end to end on a tiny image set (one process).

The freeze policy follows the weights actually loaded: nothing frozen at random init, the
configured layers with ImageNet weights or a warm-start model; the levers of a warm-started
month are applied and recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_train_job import REPO, TRAIN_PY, job_env, make_images, write_manifests

from sku_jobs.model import DEFAULT_FREEZE

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--head-hidden", "16",
        "--epochs", "1", "--max-steps-per-epoch", "2", "--print-freq", "0", "--lr", "0.4"]


def train(job, manifests, images, *extra, model=None):
    proc = subprocess.run([sys.executable, str(TRAIN_PY), *TINY, *extra],
                          env=job_env(job, manifests, images, model=model) | {"SAGEMAKER_BASE_DIR": str(job)},
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((job / "model" / "metrics.json").read_text())


def policy_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("Freeze policy: "))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    images = root / "images"
    rows = make_images(images)
    write_manifests(root / "m4", images, rows, 4)
    write_manifests(root / "m6", images, rows, 6)
    return root, images


@pytest.mark.slow
def test_freeze_policy_follows_the_weights_loaded(tmp_path, tiny):
    import torch
    import torchvision

    root, images = tiny
    # Random init: nothing frozen unless asked.
    out, metrics = train(tmp_path / "random", root / "m4", images)
    assert policy_line(out) == "Freeze policy: nothing frozen: random init (freeze=auto)"
    assert metrics["compute"]["frozen"] == [] and metrics["compute"]["backbone_init"] == "random"
    assert metrics["params"]["trainable"] == metrics["params"]["total"]
    out, metrics = train(tmp_path / "random-asked", root / "m4", images, "--freeze", "conv1,layer1")
    assert "frozen: conv1,layer1 (random init" in policy_line(out) and "WARNING" in policy_line(out)
    assert metrics["compute"]["frozen"] == ["conv1", "layer1"]

    # ImageNet-style weights loaded: the configured layers.
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    out, metrics = train(tmp_path / "imagenet", root / "m4", images, "--pretrained-weights", str(weights))
    assert policy_line(out) == ("Freeze policy: frozen: conv1,bn1,layer1,layer2,layer3 "
                                "(loaded from ImageNet weights; freeze=auto)")
    assert metrics["compute"]["frozen"] == list(DEFAULT_FREEZE)
    assert metrics["params"]["trainable"] < metrics["params"]["total"]
    out, metrics = train(tmp_path / "imagenet-none", root / "m4", images, "--pretrained-weights", str(weights),
                         "--freeze", "none")
    assert policy_line(out) == "Freeze policy: nothing frozen: loaded from ImageNet weights (freeze=none)"

    # Warm start from the random-init model: it was loaded, so auto freezes the configured layers.
    out, metrics = train(tmp_path / "warm", root / "m6", images, model=tmp_path / "random" / "model")
    assert "(loaded from the warm-start model; freeze=auto)" in policy_line(out)
    assert metrics["compute"]["frozen"] == list(DEFAULT_FREEZE)
    assert metrics["compute"]["backbone_init"] == "warm_start"


@pytest.mark.slow
def test_warm_start_levers_are_applied_and_recorded(tmp_path, tiny):
    root, images = tiny
    train(tmp_path / "m1", root / "m4", images)
    out, metrics = train(tmp_path / "m2", root / "m6", images, "--replay-fraction", "0.25", "--replay-balanced",
                         "--backbone-lr-mult", "0.1", "--distill-weight", "1.0", "--freeze", "none",
                         model=tmp_path / "m1" / "model")
    assert "Warm start from" in out and "4 -> 6 classes" in out
    assert "(an equal quota per old SKU)" in out
    assert "Distillation from the warm-start model on its 4 classes: weight 1.0, temperature 2.0" in out
    assert "Backbone learning rate: 0.1 x the head's" in out
    c = metrics["compute"]
    assert (c["replay_fraction"], c["replay_balanced"], c["backbone_lr_mult"], c["distill_weight"]) == (
        0.25, True, 0.1, 1.0)
    # 2 steps of batch 8; the balanced replay set: 2 new classes x 28 + 4 old x ceil(0.25 * 112 / 4).
    assert c["train_images"] == 16 and c["epochs"] == 1
    assert "Replay: 84 train images = 56 of new SKUs + 28 of 112 old" in out
