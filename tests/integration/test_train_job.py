"""The training job end to end: torchrun with 2 CPU processes (gloo) on a tiny generated image set.

The images are coloured shapes on noise, learnable in a few epochs by a resnet18 at 64 px even
with random init and conv1..layer3 frozen, so "above chance" is a real check of the loop.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "training_image" / "code" / "train.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"

# (sku_id, colour, shape): colour alone separates the classes, shape makes them less trivial.
CLASS_SPECS = [
    ("SKU-RED-CIRCLE", (220, 30, 30), "circle"),
    ("SKU-GREEN-SQUARE", (30, 190, 40), "square"),
    ("SKU-BLUE-TRIANGLE", (40, 60, 220), "triangle"),
    ("SKU-YELLOW-CIRCLE", (235, 215, 30), "circle"),
    ("SKU-MAGENTA-SQUARE", (210, 40, 200), "square"),
    ("SKU-CYAN-TRIANGLE", (30, 200, 210), "triangle"),
]
SPLIT_OF = {**dict.fromkeys(range(0, 28), "train"), **dict.fromkeys(range(28, 34), "val"),
            **dict.fromkeys(range(34, 40), "test")}
PER_CLASS = 40
BASE_ARGS = ["--arch", "resnet18", "--batch-size", "16", "--workers", "0", "--head-hidden", "64",
             "--lr", "0.4", "--warmup-epochs", "0.5", "--print-freq", "0"]
TRAIN_ARGS = [*BASE_ARGS, "--image-size", "64"]


def _draw(spec, rng: random.Random, size: int = 64):
    from PIL import Image, ImageDraw

    noise = bytes(rng.randrange(90, 170) for _ in range(size * size * 3))
    img = Image.frombytes("RGB", (size, size), noise)
    draw = ImageDraw.Draw(img)
    _, colour, shape = spec
    colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour)
    r = rng.randint(14, 24)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def make_images(images: Path, num_classes: int = 6, seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    """Write the images (JPEG, every 5th PNG); return split -> [(relative path, class index)]."""
    rng = random.Random(seed)
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for cls, spec in enumerate(CLASS_SPECS[:num_classes]):
        (images / spec[0]).mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            ext = "png" if i % 5 == 4 else "jpg"
            rel = f"{spec[0]}/{i:03d}.{ext}"
            _draw(spec, rng).save(images / rel, quality=90) if ext == "jpg" else _draw(spec, rng).save(images / rel)
            rows[SPLIT_OF[i]].append((rel, cls))
    return rows


def write_manifests(manifests: Path, images: Path, rows, num_classes: int, extra_train=()) -> None:
    manifests.mkdir(parents=True, exist_ok=True)
    classes = [s[0] for s in CLASS_SPECS[:num_classes]]
    (manifests / "classes.json").write_text(json.dumps({"num_classes": num_classes, "classes": classes}))
    for split, items in rows.items():
        items = [r for r in items if r[1] < num_classes] + (list(extra_train) if split == "train" else [])
        with (manifests / f"{split}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "class_index", "sku_id", "sha256"])
            for rel, cls in items:
                digest = hashlib.sha256((images / rel).read_bytes()).hexdigest()
                w.writerow([rel, cls, classes[cls], digest])


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fsx") / "images"
    rows = make_images(root)
    # One corrupt "JPEG" in train: the epoch must log and skip it, not crash.
    (root / "SKU-RED-CIRCLE" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root, rows


def job_env(job: Path, manifests: Path, images: Path, model: Path | None = None, hps: dict | None = None):
    """SM_* variables for a job directory, as the local backend sets them."""
    channels = {"manifests": manifests, "images": images} | ({"model": model} if model else {})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(
        SAGEMAKER_BASE_DIR=str(job),
        SM_CHANNELS=json.dumps(sorted(channels)),
        SM_MODEL_DIR=str(job / "model"),
        SM_OUTPUT_DIR=str(job / "output"),
        SM_OUTPUT_DATA_DIR=str(job / "output" / "data"),
        SM_HPS=json.dumps(hps or {}),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update({f"SM_CHANNEL_{k.upper()}": str(v) for k, v in channels.items()})
    return env


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), str(TRAIN_PY), *args]


def run(cmd, env, timeout=240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-6000:], proc.stderr[-4000:], sep="\n")
    return proc


def metric_epochs(text: str) -> list[dict[str, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith("METRIC epoch="):
            out.append({k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])})
    return out


def _predict(model_dir: Path, images: Path, rows) -> list[tuple[int, int]]:
    """(true, predicted) for rows, with the artefact's own eval transform."""
    import torch

    from sku_jobs.data import decode_image, eval_resize, eval_transform
    from sku_jobs.model import load_model_artifact

    model, meta = load_model_artifact(model_dir / "model.pt")
    tf = eval_transform(meta["image_size"])
    # Decoded as the job decodes (upright, JPEG draft scale), so the numbers are comparable.
    x = torch.stack([tf(decode_image(images / rel, eval_resize(meta["image_size"]))) for rel, _ in rows])
    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    return [(cls, p) for (_, cls), p in zip(rows, pred, strict=True)]


# --------------------------------------------------------------------------- fast


def test_missing_manifest_fails_with_failure_file(tmp_path, image_root):
    images, rows = image_root
    manifests = tmp_path / "manifests"
    write_manifests(manifests, images, rows, 6)
    (manifests / "val.csv").unlink()
    env = job_env(tmp_path / "job", manifests, images)
    proc = run([sys.executable, str(TRAIN_PY), *TRAIN_ARGS, "--epochs", "1"], env, timeout=120)
    assert proc.returncode != 0
    failure = (tmp_path / "job" / "output" / "failure").read_text()
    assert "missing manifest file" in failure and "val.csv" in failure
    assert "JOB FAILED" in proc.stderr


def test_bad_inputs_fail_clearly(tmp_path, image_root):
    """num_classes mismatch and an empty train set each stop the job with a reason."""
    images, rows = image_root
    manifests = tmp_path / "manifests"
    write_manifests(manifests, images, rows, 6)
    (manifests / "classes.json").write_text(json.dumps({"num_classes": 5, "classes": ["a", "b", "c", "d", "e"]}))
    env = job_env(tmp_path / "job1", manifests, images)
    assert run([sys.executable, str(TRAIN_PY), *TRAIN_ARGS], env, timeout=120).returncode != 0
    assert "num_classes mismatch" in (tmp_path / "job1" / "output" / "failure").read_text()

    write_manifests(manifests, images, {"train": [], "val": rows["val"], "test": rows["test"]}, 6)
    env = job_env(tmp_path / "job2", manifests, images)
    assert run([sys.executable, str(TRAIN_PY), *TRAIN_ARGS], env, timeout=120).returncode != 0
    assert "empty train set" in (tmp_path / "job2" / "output" / "failure").read_text()

    env = job_env(tmp_path / "job3", tmp_path / "nowhere", images)
    assert run([sys.executable, str(TRAIN_PY), *TRAIN_ARGS], env, timeout=120).returncode != 0
    assert "missing input channel 'manifests'" in (tmp_path / "job3" / "output" / "failure").read_text()


def test_empty_val_split_keeps_the_last_epoch(tmp_path, image_root):
    """Val groups are drawn by fraction, so a small catalogue may have none: the job says so and
    keeps the last epoch instead of refusing to train (or keeping epoch 1's all-zero val score),
    even when asked to select by val."""
    images, rows = image_root
    manifests = tmp_path / "manifests"
    write_manifests(manifests, images, {"train": rows["train"][:48], "val": [], "test": rows["test"]}, 6)
    proc = run([sys.executable, str(TRAIN_PY), *TRAIN_ARGS, "--epochs", "2", "--max-steps-per-epoch", "2",
                "--select-epoch", "best-val"], job_env(tmp_path / "job", manifests, images), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val.csv has no rows: no validation metrics; --select-epoch best-val cannot select" in proc.stdout
    metrics = json.loads((tmp_path / "job" / "model" / "metrics.json").read_text())
    assert metrics["best"]["epoch"] == 2 and metrics["test"]["count"] == len(rows["test"])


@pytest.mark.parametrize("select", ["last", "best-val"])
def test_select_epoch_outputs_the_last_or_the_best_val_epoch(tmp_path, image_root, select):
    """The job's model is the last epoch's (default) or the best val epoch's. Val is mislabelled
    (class + 1), so the better the model learns, the lower its val top-1: best-val must go back to
    an earlier epoch, last must not."""
    images, rows = image_root
    manifests = tmp_path / "manifests"
    wrong_val = [(rel, (cls + 1) % 6) for rel, cls in rows["val"]]
    write_manifests(manifests, images, {"train": rows["train"], "val": wrong_val, "test": rows["test"]}, 6)
    job = tmp_path / "job"
    extra = [] if select == "last" else ["--select-epoch", select]
    proc = run([sys.executable, str(TRAIN_PY), *TRAIN_ARGS, "--epochs", "3", "--max-steps-per-epoch", "6",
                "--keep-checkpoints", "3", *extra], job_env(job, manifests, images), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((job / "model" / "metrics.json").read_text())
    val = [e["val_top1"] for e in metrics["history"]]
    first_best = val.index(max(val)) + 1
    assert first_best < 3, f"the mislabelled val top-1 should fall as the model learns: {val}"
    expected = 3 if select == "last" else first_best
    assert metrics["best"]["epoch"] == expected and metrics["select_epoch"] == select
    assert metrics["best"]["val_top1"] == pytest.approx(val[expected - 1])
    # The artefact holds that epoch's weights: the same as the epoch's checkpoint.
    import torch

    from sku_jobs.model import load_model_artifact

    model, _meta = load_model_artifact(job / "model" / "model.pt")
    ckpt = torch.load(job / "checkpoints" / f"checkpoint-epoch{expected:04d}.pt", map_location="cpu",
                      weights_only=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name]), name


def test_dataset_skips_undecodable_files(tmp_path, image_root):
    from sku_jobs.data import ManifestDataset, Sample, collate_skip_bad, eval_transform, make_loader

    images, rows = image_root
    samples = [Sample(rows["train"][0][0], 0, "x", ""), Sample("SKU-RED-CIRCLE/corrupt.jpg", 0, "x", ""),
               Sample("SKU-RED-CIRCLE/missing.jpg", 0, "x", "")]
    ds = ManifestDataset(images, samples, eval_transform(32), draft_size=37)
    batch = collate_skip_bad([ds[i] for i in range(3)])
    assert batch.images.shape == (1, 3, 32, 32) and batch.targets.tolist() == [0]
    assert [Path(p).name for p in batch.failed] == ["corrupt.jpg", "missing.jpg"]
    # Through a worker process too (persistent workers, prefetch).
    loader = make_loader(ds, 3, workers=1)
    (only,) = list(loader)
    assert len(only) == 1 and len(only.failed) == 2


def test_options_from_hyperparameters_and_command_line(tmp_path):
    """SageMaker hps (strings, hyphen or underscore names) set defaults; the command line wins."""
    import train

    from sku_jobs.sm_env import JobEnv

    hps = {"epochs": "3", "batch-size": "8", "warm_start": "False", "amp": "false", "freeze": "",
           "lr": "0.2", "workers": "auto", "sagemaker_program": "train.py"}
    env = JobEnv.from_environment({"SM_HPS": json.dumps(hps), "SAGEMAKER_BASE_DIR": str(tmp_path)})
    args = train.parse_args([], env)
    assert (args.epochs, args.batch_size, args.warm_start, args.amp, args.freeze, args.lr, args.workers) == (
        3, 8, False, "off", "", 0.2, None)
    assert args.checkpoint_dir == str(tmp_path / "checkpoints") and args.arch == "resnet152"
    args = train.parse_args(["--epochs", "5", "--batch_size", "4", "--warm-start", "--amp", "bf16"], env)
    assert (args.epochs, args.batch_size, args.warm_start, args.amp) == (5, 4, True, "bf16")
    with pytest.raises(ValueError, match="replay-fraction"):
        train.parse_args(["--replay-fraction", "1.5"], env)


def test_head_shape_defaults_to_the_warm_start_models_else_one_classifier(tmp_path, image_root):
    """Without ``head_hidden`` a fresh model gets one classifier and a warm start keeps the
    champion's head (a production model with a bottleneck head still warm-starts); an explicit
    ``head_hidden`` that differs from the champion's is refused with both named."""
    import train

    from sku_jobs.model import build_model, save_model_artifact
    from sku_jobs.sm_env import JobEnv

    images, rows = image_root
    write_manifests(tmp_path / "manifests", images, rows, 4)
    champion = tmp_path / "champion"
    save_model_artifact(build_model("resnet18", 4, head_hidden=24), champion / "model.pt", image_size=64,
                        classes=[c[0] for c in CLASS_SPECS[:4]])

    def inputs(argv, model=None):
        env = JobEnv.from_environment(job_env(tmp_path / "job", tmp_path / "manifests", images, model=model))
        i = TRAIN_ARGS.index("--head-hidden")
        args = train.parse_args([*TRAIN_ARGS[:i], *TRAIN_ARGS[i + 2:], *argv], env)
        return args, train.Inputs(args, env)

    args, _ = inputs([])
    assert args.head_hidden == 0
    args, got = inputs([], model=champion)
    assert args.head_hidden == 24 and got.warm_model == champion / "model.pt"
    args, _ = inputs(["--warm-start", "false"], model=champion)
    assert args.head_hidden == 0
    with pytest.raises(ValueError, match="head-hidden must be >= 0"):
        inputs(["--head-hidden", "-1"])
    (champion / "model.pt").write_bytes(b"not a model")
    with pytest.raises(train.InputError, match="warm-start model .* cannot be read"):
        inputs([], model=champion)


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_train_two_processes_under_the_toolkit_learns_and_writes_artefacts(tmp_path, image_root):
    """The local backend's launch, as on SageMaker: the toolkit's ``train`` reads the config
    files, decodes the hyperparameters and runs ``train.py`` under its torch-distributed runner
    (torchrun, 2 processes, gloo on CPU); outputs are packed and uploaded."""
    import boto3
    from moto import mock_aws

    from sku_retraining.jobs.local import LocalJobRunner
    from sku_retraining.jobs.request import Channel, FsxTarget, JobSpec, build_request

    images, rows = image_root
    fsx = images.parent  # the FSx folder: images/ and this test's dataset
    manifests = fsx / "datasets" / tmp_path.name
    write_manifests(manifests, images, rows, 6, extra_train=[("SKU-RED-CIRCLE/corrupt.jpg", 0)])
    hps = {"arch": "resnet18", "batch_size": 16, "workers": 0, "head_hidden": 64, "lr": 0.4,
           "warmup_epochs": 0.5, "print_freq": 0, "epochs": 5, "image_size": 64}
    request = build_request(JobSpec(
        job_name="sku-train-toolkit", program="train.py", image_uri="img:1",
        role_arn="arn:aws:iam::123456789012:role/r", output_s3_uri="s3://jobs/train/",
        instance_type="ml.c5.xlarge", fsx=FsxTarget("fs-0123456789abcdef0", "fsx"),
        subnets=("subnet-1",), security_group_ids=("sg-1",), hyperparameters=hps,
        channels=(Channel("images", "fsx", "images"), Channel("manifests", "fsx", f"datasets/{tmp_path.name}")),
        checkpoint_s3_uri="s3://jobs/checkpoints/run-1/",
    ))
    lines: list[str] = []
    start = time.monotonic()
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="jobs")
        runner = LocalJobRunner(work_root=tmp_path / "jobs", code_dir=TRAIN_PY.parent, fsx_root=fsx,
                                fsx_mount_name="fsx", s3_client=s3, processes=2, log=lines.append)
        description = runner.run(request)
        assert s3.head_object(Bucket="jobs", Key="train/sku-train-toolkit/output/model.tar.gz")
    elapsed = time.monotonic() - start
    out = "\n".join(lines)
    print(out[-6000:])
    assert description["TrainingJobStatus"] == "Completed"
    assert "torchrun --nnodes 1 --nproc_per_node 2 train.py --arch resnet18 --batch_size 16" in out
    epochs = metric_epochs(out)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5]
    assert "PARAMS total=" in out and "world 2" in out and "backend gloo" in out
    # Logged once per process that meets it (not once per epoch), with its path.
    bad = [line for line in out.splitlines() if "skipping undecodable image" in line]
    assert 1 <= len(bad) <= 2 and len(set(bad)) == len(bad) and all("corrupt.jpg" in line for line in bad)
    best = max(e["val_top1"] for e in epochs)
    assert best > 2 / 6, f"val_top1 {best} not clearly above chance"
    assert "METRIC final best_epoch=" in out
    assert {m["MetricName"] for m in description["FinalMetricDataList"]} == set()  # no MetricDefinitions asked

    job = tmp_path / "jobs" / "sku-train-toolkit" / "ml"
    model_dir = job / "model"
    assert {p.name for p in model_dir.iterdir()} == {"model.pt", "classes.json", "metrics.json"}
    doc = json.loads((model_dir / "metrics.json").read_text())
    # The job's model is the last epoch's (--select-epoch last, the default).
    assert len(doc["history"]) == 5 and doc["best"]["epoch"] == 5
    assert doc["best"]["val_top1"] == pytest.approx(epochs[-1]["val_top1"], abs=1e-4)
    assert doc["test"]["count"] == 36
    assert json.loads((job / "output" / "data" / "training_metrics.json").read_text())["best"] == doc["best"]
    assert json.loads((model_dir / "classes.json").read_text())["num_classes"] == 6
    # CheckpointConfig.LocalPath (/opt/ml/checkpoints) is the folder kept for the checkpoint URI.
    ckpts = sorted(p.name for p in (job / "checkpoints").glob("checkpoint-epoch*.pt"))
    assert ckpts == ["checkpoint-epoch0004.pt", "checkpoint-epoch0005.pt"]  # the last two kept
    assert (job / "checkpoints").resolve().parent == (tmp_path / "jobs" / "_checkpoints").resolve()
    pairs = _predict(model_dir, images, rows["val"])
    assert sum(t == p for t, p in pairs) / len(pairs) == pytest.approx(doc["best"]["val_top1"], abs=0.02)
    print(f"2-process training run under the toolkit: {elapsed:.1f}s, best val_top1 {best:.3f}")


@pytest.mark.slow
def test_resume_after_kill(tmp_path, image_root):
    images, rows = image_root
    manifests = tmp_path / "manifests"
    write_manifests(manifests, images, rows, 6)
    job = tmp_path / "job"
    env = job_env(job, manifests, images, hps={"epochs": 3})
    ckpt = job / "checkpoints" / "checkpoint-epoch0001.pt"
    proc = subprocess.Popen(torchrun_cmd(*TRAIN_ARGS), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint appeared"
        os.killpg(proc.pid, signal.SIGTERM)  # like a spot interruption
        first, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert not (job / "model" / "model.pt").exists()
    done_before = [e["epoch"] for e in metric_epochs(first)]
    assert done_before and done_before[-1] < 3

    second = run(torchrun_cmd(*TRAIN_ARGS), env)
    assert second.returncode == 0, second.stderr[-3000:]
    k = max(int(p.stem[-4:]) for p in (job / "checkpoints").glob("checkpoint-epoch*.pt") if p.exists())
    assert k == 3
    assert "Resumed from checkpoint" in second.stdout
    resumed_epoch = int(second.stdout.split("(epoch ")[1].split(" ")[0])
    assert resumed_epoch >= 1
    assert [e["epoch"] for e in metric_epochs(second.stdout)] == list(range(resumed_epoch + 1, 4))
    doc = json.loads((job / "model" / "metrics.json").read_text())
    assert [h["epoch"] for h in doc["history"]] == [1, 2, 3]  # history carried across the restart
    assert (job / "model" / "model.pt").exists()


@pytest.mark.slow
def test_warm_start_widens_head_and_keeps_old_classes(tmp_path, image_root):
    images, rows = image_root
    first = tmp_path / "month1"
    write_manifests(first / "manifests", images, rows, 4)
    proc = run(torchrun_cmd(*TRAIN_ARGS, "--epochs", "4"), job_env(first, first / "manifests", images))
    assert proc.returncode == 0, proc.stderr[-3000:]
    old_val = [r for r in rows["val"] if r[1] < 4]
    acc_before = sum(t == p for t, p in _predict(first / "model", images, old_val)) / len(old_val)

    second = tmp_path / "month2"
    write_manifests(second / "manifests", images, rows, 6)
    proc = run(
        torchrun_cmd(*TRAIN_ARGS, "--epochs", "3", "--replay-fraction", "1.0"),
        job_env(second, second / "manifests", images, model=first / "model"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warm start from" in proc.stdout and "4 -> 6 classes (2 new: 2 initialised from train-image" in proc.stdout
    assert "Replay: " in proc.stdout
    from sku_jobs.model import read_artifact

    art = read_artifact(second / "model" / "model.pt")
    assert art["num_classes"] == 6 and art["classes"][:4] == read_artifact(first / "model" / "model.pt")["classes"]
    pairs = _predict(second / "model", images, rows["val"])
    old = [(t, p) for t, p in pairs if t < 4]
    new = [(t, p) for t, p in pairs if t >= 4]
    acc_old = sum(t == p for t, p in old) / len(old)
    acc_new = sum(t == p for t, p in new) / len(new)
    print(f"warm start: old-class val acc {acc_before:.3f} -> {acc_old:.3f}, new-class val acc {acc_new:.3f}")
    assert acc_before > 0.5
    assert acc_old >= acc_before - 0.2 and acc_old > 0.5
    assert acc_new > 1 / 6
