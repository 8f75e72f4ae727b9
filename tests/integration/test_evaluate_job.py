"""The evaluation job end to end: ``evaluate.py`` as a subprocess on tiny resnet18 models.

The models are random resnet18s at 32 px whose class rows are imprinted from one test image
per SKU, so they get some images right and some wrong. Every number in evaluation.json is
checked against the models run directly on the same images in the test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EVALUATE_PY = REPO / "training_image" / "code" / "evaluate.py"

SKUS = ["SKU-A", "SKU-B", "SKU-C", "SKU-D", "SKU-E", "SKU-F"]  # E and F are new in this run
OLD = 4
PER_CLASS = 3
SIZE = 32
COLOURS = [(220, 30, 30), (30, 190, 40), (40, 60, 220), (235, 215, 30), (210, 40, 200), (30, 200, 210)]


def _image(cls: int, rng: random.Random, size: int = 40):
    from PIL import Image, ImageDraw

    img = Image.frombytes("RGB", (size, size), bytes(rng.randrange(60, 200) for _ in range(size * size * 3)))
    r = rng.randint(8, 14)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[cls])
    return img


def _make_model(num_classes: int, seed: int, image_size: int, rows: list[tuple[str, int]], images: Path):
    """A resnet18 whose class rows are the (centred) mean embeddings of that class's images in ``rows``."""
    import torch

    from sku_jobs.data import decode_image, eval_resize, eval_transform
    from sku_jobs.model import build_model

    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes, head_hidden=16, freeze=()).eval()
    tf = eval_transform(image_size)
    x = torch.stack([tf(decode_image(images / rel, eval_resize(image_size))) for rel, _ in rows])
    y = torch.tensor([c for _, c in rows])
    with torch.no_grad():
        emb = model.embed(x)
        ref = emb.mean(0)
        for c in sorted(set(y.tolist())):
            d = emb[y == c].mean(0) - ref
            model.classifier.weight[c] = d / d.norm().clamp_min(1e-6)
            model.classifier.bias[c] = -(model.classifier.weight[c] @ ref)
    return model


def _predict(model_pt: Path, images: Path, rows: list[tuple[str, int]]) -> list[int]:
    """Top-1 of a saved model on rows, through the job's own decode + eval transform."""
    import torch

    from sku_jobs.data import decode_image, eval_resize
    from sku_jobs.data import eval_transform as tf_for
    from sku_jobs.model import load_model_artifact

    model, meta = load_model_artifact(model_pt)
    size = meta["image_size"]
    x = torch.stack([tf_for(size)(decode_image(images / rel, eval_resize(size))) for rel, _ in rows])
    with torch.inference_mode():
        return model(x).argmax(1).tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from sku_jobs.model import save_model_artifact

    root = tmp_path_factory.mktemp("evaluate")
    images = root / "images"
    rng = random.Random(0)
    rows: list[tuple[str, int]] = []
    for cls, sku in enumerate(SKUS):
        (images / sku).mkdir(parents=True)
        for i in range(PER_CLASS):
            rel = f"{sku}/{i}.png"
            _image(cls, rng).save(images / rel)
            rows.append((rel, cls))
    (images / "SKU-A" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")

    manifests = root / "manifests"
    manifests.mkdir()
    (manifests / "classes.json").write_text(json.dumps({"num_classes": len(SKUS), "classes": SKUS}))
    (manifests / "evaluation_context.json").write_text(
        json.dumps({"new_sku_ids": ["SKU-F", "SKU-E"], "snapshot_id": "ds-test"}))
    with (manifests / "test.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "class_index", "sku_id", "sha256"])
        for rel, cls in [*rows[:1], ("SKU-A/bad.jpg", 0), *rows[1:]]:
            w.writerow([rel, cls, SKUS[cls], hashlib.sha256((images / rel).read_bytes()).hexdigest()])

    first = [r for r in rows if r[0].endswith("/0.png")]  # imprinting from one image per SKU
    # Challenger: all 6 SKUs, packed as model.tar.gz (what SageMaker downloads from S3).
    build = root / "build"
    challenger_pt = save_model_artifact(_make_model(6, 0, SIZE, first, images), build / "challenger" / "model.pt",
                                        image_size=SIZE, classes=SKUS)
    (build / "challenger" / "classes.json").write_text((manifests / "classes.json").read_text())
    challenger = root / "challenger"
    challenger.mkdir()
    with tarfile.open(challenger / "model.tar.gz", "w:gz") as tar:
        for p in sorted((build / "challenger").iterdir()):
            tar.add(p, arcname=p.name)
    # Champions, extracted: the 4 old SKUs at the same size (one decode pass for both models)
    # and at another size (a pass of its own); one with 7 classes, which must be refused.
    champion = save_model_artifact(_make_model(OLD, 1, SIZE, first[:OLD], images),
                                   root / "champion" / "model.pt", image_size=SIZE, classes=SKUS[:OLD])
    champion_40 = save_model_artifact(_make_model(OLD, 2, 40, first[:OLD], images),
                                      root / "champion40" / "model.pt", image_size=40, classes=SKUS[:OLD])
    bigger = save_model_artifact(_make_model(7, 3, SIZE, first, images), root / "champion7" / "model.pt",
                                 image_size=SIZE, classes=[*SKUS, "SKU-G"])
    return {
        "root": root, "images": images, "manifests": manifests, "rows": rows, "challenger": challenger,
        "challenger_pt": challenger_pt, "champion": champion.parent, "champion_pt": champion,
        "champion40": champion_40.parent, "champion40_pt": champion_40, "bigger": bigger.parent,
    }


def job_env(job: Path, channels: dict[str, Path], hps: dict | None = None) -> dict[str, str]:
    """SM_* variables for a job directory, as the local backend sets them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(
        SAGEMAKER_BASE_DIR=str(job),
        SM_CHANNELS=json.dumps(sorted(channels)),
        SM_MODEL_DIR=str(job / "model"),
        SM_OUTPUT_DIR=str(job / "output"),
        SM_OUTPUT_DATA_DIR=str(job / "output" / "data"),
        SM_HPS=json.dumps(hps if hps is not None else {"workers": "0"}),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update({f"SM_CHANNEL_{k.upper()}": str(v) for k, v in channels.items()})
    return env


def run_job(job: Path, channels: dict[str, Path], hps: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(EVALUATE_PY)], env=job_env(job, channels, hps), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    print(proc.stdout[-5000:], proc.stderr[-3000:], sep="\n")
    return proc


def _channels(setup: dict, champion: str | None = "champion") -> dict[str, Path]:
    ch = {"challenger": setup["challenger"], "manifests": setup["manifests"], "images": setup["images"]}
    return ch | ({"champion": setup[champion]} if champion else {})


def _expected(setup: dict, model_pt: Path, num_classes: int) -> tuple[int, int, dict[str, int]]:
    """(images scored, correct, correct per SKU) computed directly."""
    rows = [r for r in setup["rows"] if r[1] < num_classes]
    pred = _predict(model_pt, setup["images"], rows)
    per: dict[str, int] = {}
    for (_, cls), p in zip(rows, pred, strict=True):
        per[SKUS[cls]] = per.get(SKUS[cls], 0) + int(p == cls)
    return len(rows), sum(per.values()), per


def _check_report(out: Path) -> str:
    page = (out / "report.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(not r.startswith(("http:", "https:", "//", "/")) for r in refs), refs
    for ref in refs:
        assert (out / ref).is_file(), f"report.html references missing {ref}"
    assert "<script" not in page
    assert {p.name for p in (out / "plots").iterdir()} == {"per_sku_accuracy.png", "headline.png"}
    return page


def _check_model(metrics: dict, setup: dict, model_pt: Path, num_classes: int, skipped: int) -> None:
    n, correct, per = _expected(setup, model_pt, num_classes)
    assert metrics["num_images"] == n and metrics["num_skipped"] == skipped
    assert sum(v["n"] for v in metrics["per_sku"].values()) == n
    assert {s: v["correct"] for s, v in metrics["per_sku"].items()} == per
    assert metrics["top1"] == round(correct / n, 6)
    assert metrics["macro_accuracy"] == round(sum(c / PER_CLASS for c in per.values()) / len(per), 6)
    assert metrics["top5_k"] == min(5, num_classes) and metrics["top1"] <= metrics["top5"]


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_challenger_vs_champion_deterministic_with_report(setup, tmp_path):
    proc = run_job(tmp_path / "job1", _channels(setup))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "job1" / "output" / "data"
    doc = json.loads((out / "evaluation.json").read_text())

    assert doc["format"] == "sku-evaluation/v1" and doc["snapshot_id"] == "ds-test"
    assert doc["test_manifest_sha256"] == hashlib.sha256((setup["manifests"] / "test.csv").read_bytes()).hexdigest()
    assert (doc["num_test_images"], doc["num_classes"], doc["new_sku_ids"]) == (19, 6, ["SKU-E", "SKU-F"])
    chal, champ, comp = doc["challenger"], doc["champion"], doc["comparison"]
    _check_model(chal, setup, setup["challenger_pt"], 6, skipped=1)
    _check_model(champ, setup, setup["champion_pt"], OLD, skipped=1)
    assert set(champ["per_sku"]) == set(SKUS[:OLD]) and champ["new_sku_top1"] is None
    new_correct = chal["per_sku"]["SKU-E"]["correct"] + chal["per_sku"]["SKU-F"]["correct"]
    assert chal["new_sku_top1"] == round(new_correct / 6, 6)
    assert chal["old_sku_top1"] == round((sum(v["correct"] for v in chal["per_sku"].values()) - new_correct) / 12, 6)
    assert comp["old_sku_top1_delta"] == pytest.approx(chal["old_sku_top1"] - champ["old_sku_top1"], abs=2e-6)
    assert comp["num_known_images"] == 12
    assert chal["model"]["sha256"] == hashlib.sha256(setup["challenger_pt"].read_bytes()).hexdigest()

    # The metric line matches what the regexes the operator hands to SageMaker read back.
    from sku_contracts.metrics import parse_evaluation_metric_lines

    found = parse_evaluation_metric_lines(proc.stdout)
    assert found["evaluation:challenger:top1"] == [pytest.approx(chal["top1"], abs=5e-5)]
    assert found["evaluation:champion:old_sku_top1"] == [pytest.approx(champ["old_sku_top1"], abs=5e-5)]
    assert found["evaluation:old_sku_top1_delta"] == [pytest.approx(comp["old_sku_top1_delta"], abs=5e-5)]
    assert "bad.jpg" in proc.stdout  # the skipped image is named in the log

    page = _check_report(out)
    assert "SKU-A/bad.jpg" in page and "Challenger vs champion" in page
    assert len(list((out / "examples").glob("*.jpg"))) >= 1

    # Same models + same manifest -> the very same bytes (no timestamps, fixed rounding).
    assert run_job(tmp_path / "job2", _channels(setup)).returncode == 0
    assert (tmp_path / "job2" / "output" / "data" / "evaluation.json").read_bytes() == \
        (out / "evaluation.json").read_bytes()


def test_champion_at_another_image_size_is_scored_in_its_own_pass(setup, tmp_path):
    # With a data-loader worker process this time (two loaders: one per image size).
    proc = run_job(tmp_path / "job", _channels(setup, "champion40"), {"workers": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(1 workers)" in proc.stdout
    doc = json.loads((tmp_path / "job" / "output" / "data" / "evaluation.json").read_text())
    _check_model(doc["champion"], setup, setup["champion40_pt"], OLD, skipped=1)
    assert doc["champion"]["model"]["image_size"] == 40 and "at 40 px" in proc.stdout


def test_first_run_without_champion(setup, tmp_path):
    hps = {"worst-skus": "2", "examples_per_sku": "1", "confused_pairs": "1", "workers": "0", "batch_size": "4",
           "snapshot_id": "ds-from-hp"}
    manifests = tmp_path / "manifests"
    shutil.copytree(setup["manifests"], manifests)
    (manifests / "evaluation_context.json").write_text(json.dumps({"new_sku_ids": ["SKU-E", "SKU-F"]}))
    proc = run_job(tmp_path / "job", _channels(setup, None) | {"manifests": manifests}, hps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "job" / "output" / "data"
    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["snapshot_id"] == "ds-from-hp"  # the context file has none: the hyperparameter fills in
    assert doc["champion"] is None and doc["comparison"] is None
    _check_model(doc["challenger"], setup, setup["challenger_pt"], 6, skipped=1)
    assert len(doc["challenger"]["worst_skus"]) == 2 and len(doc["challenger"]["confused_pairs"]) <= 1
    assert "champion_top1=n/a" in proc.stdout
    page = _check_report(out)
    assert "No champion" in page
    assert len(list((out / "examples").glob("worst-*.jpg"))) <= 2  # examples_per_sku=1, 2 worst SKUs


def test_champion_with_more_classes_fails_with_reason(setup, tmp_path):
    proc = run_job(tmp_path / "job", _channels(setup, "bigger"))
    assert proc.returncode != 0
    failure = (tmp_path / "job" / "output" / "failure").read_text()
    assert "champion model has 7 classes, more than the challenger's 6" in failure
    assert not (tmp_path / "job" / "output" / "data" / "evaluation.json").exists()


# In-process (no interpreter start-up): each broken input stops the job with a failure file.
def _break_missing_channel(ch, m):
    ch.pop("images")


def _break_empty_test(ch, m):
    (m / "test.csv").write_text("path,class_index,sku_id,sha256\n")


def _break_challenger_classes(ch, m):
    (m / "classes.json").write_text(json.dumps({"num_classes": 7, "classes": [*SKUS, "SKU-G"]}))


def _break_class_index(ch, m):
    with (m / "test.csv").open("a") as fh:
        fh.write("SKU-A/0.png,6,SKU-A,\n")


def _break_context(ch, m):
    (m / "evaluation_context.json").unlink()


def _break_archive(ch, m):
    bad = m.parent / "bad-challenger"
    bad.mkdir()
    (bad / "model.tar.gz").write_bytes(b"not a tar file")
    ch["challenger"] = bad


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_break_missing_channel, "missing input channel 'images'"),
        (_break_empty_test, "empty test set"),
        (_break_challenger_classes, "challenger model has 6 classes but classes.json has 7"),
        (_break_class_index, "class_index 6 outside [0, 6)"),
        (_break_context, "missing manifest file"),
        (_break_archive, "cannot extract"),
    ],
)
def test_bad_inputs_fail_clearly(setup, tmp_path, monkeypatch, breaker, message):
    import evaluate

    manifests = tmp_path / "manifests"
    shutil.copytree(setup["manifests"], manifests)
    channels = _channels(setup) | {"manifests": manifests}
    breaker(channels, manifests)
    job = tmp_path / "job"
    for key in [k for k in os.environ if k.startswith("SM_")]:
        monkeypatch.delenv(key)
    for key, value in job_env(job, channels).items():
        if key.startswith("SM_"):
            monkeypatch.setenv(key, value)
    assert evaluate.run_job(evaluate.main, []) == 1
    assert message in (job / "output" / "failure").read_text()
