"""The augmentation job (training_image/code/augment.py) against the SageMaker contract."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import augment
import pytest
from PIL import Image, ImageDraw

from sku_jobs import augmentation
from sku_jobs.sm_env import run_job

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "training_image" / "code" / "augment.py"
PARAM_KEYS = {"crop", "angle", "hflip", "perspective", "brightness", "contrast", "saturation",
              "white_balance", "blur_sigma"}


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A small photo-like image: gradient, a few shapes, a little noise."""
    rng = random.Random(seed)
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.ellipse((x, y, x + size[0] // 3, y + size[1] // 3), fill=tuple(rng.randrange(256) for _ in range(3)))
    # Image.effect_noise is not seeded; the tests need the same bytes for the same seed.
    noise = Image.frombytes("L", size, rng.randbytes(size[0] * size[1])).convert("RGB")
    return Image.blend(img, noise, 0.1)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds one byte of pixels: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


class Job:
    """One job directory in the contract layout, plus ways to run the entry point on it."""

    def __init__(self, root: Path, hps: dict | None = None, host: str = "algo-1",
                 hosts: tuple[str, ...] = ("algo-1",), images: Path | None = None) -> None:
        self.root = root
        self.images = images or root / "fsx"
        self.manifests = root / "manifests"
        self.data_dir = root / "output" / "data"
        self.out_dir = root / "output"
        self.host, self.hosts = host, hosts
        self.hps = {"variants_per_image": "3", "workers": "1", "max_side": "64", **(hps or {})}
        self.rows: list[dict] = []
        for d in (self.images, self.manifests):
            d.mkdir(parents=True, exist_ok=True)

    def add(self, rel: str, data: bytes | None = None, *, sha: str | None = None, seed: int = 0,
            size: tuple[int, int] = (96, 72), output_dir: str = "incoming/b1/augmented/SKU-1",
            fmt: str = "JPEG") -> dict:
        if data is None:
            buf = io.BytesIO()
            photo(size, seed).save(buf, fmt, quality=90)
            data = buf.getvalue()
        target = self.images / rel
        if not rel.startswith("/") and ".." not in rel:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        row = {"path": rel, "sha256": sha or hashlib.sha256(data).hexdigest(), "sku_id": "SKU-1",
               "output_dir": output_dir}
        self.rows.append(row)
        return row

    def write_inputs(self) -> None:
        with (self.manifests / "augment_inputs.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "sha256", "sku_id", "output_dir"])
            writer.writeheader()
            writer.writerows(self.rows)

    def environ(self) -> dict[str, str]:
        return {
            "SM_CHANNELS": json.dumps(["images", "manifests"]),
            "SM_CHANNEL_IMAGES": str(self.images),
            "SM_CHANNEL_MANIFESTS": str(self.manifests),
            "SM_OUTPUT_DATA_DIR": str(self.data_dir),
            "SM_OUTPUT_DIR": str(self.out_dir),
            "SM_MODEL_DIR": str(self.root / "model"),
            "SM_HPS": json.dumps(self.hps),
            "SM_HOSTS": json.dumps(list(self.hosts)),
            "SM_CURRENT_HOST": self.host,
            "SM_NUM_CPUS": "2",
        }

    def run(self, monkeypatch: pytest.MonkeyPatch) -> int:
        """In process, through run_job exactly as the script does."""
        self.write_inputs()
        for key, value in self.environ().items():
            monkeypatch.setenv(key, value)
        return run_job(augment.main, [])

    def run_subprocess(self) -> subprocess.CompletedProcess:
        self.write_inputs()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
        env.update(self.environ())
        return subprocess.run([sys.executable, str(ENTRY)], env=env, capture_output=True, text=True,
                              timeout=120, cwd=self.root)

    # outputs
    def manifest(self) -> list[dict]:
        with (self.data_dir / f"augmentation_manifest-{self.host}.csv").open(newline="") as fh:
            return list(csv.DictReader(fh))

    def manifest_header(self) -> list[str]:
        return (self.data_dir / f"augmentation_manifest-{self.host}.csv").read_text().splitlines()[0].split(",")

    def skipped(self) -> dict[str, str]:
        with (self.data_dir / f"skipped-{self.host}.csv").open(newline="") as fh:
            return {r["source_path"]: r["reason"] for r in csv.DictReader(fh)}

    def summary(self) -> dict:
        return json.loads((self.data_dir / f"summary-{self.host}.json").read_text())

    def variants(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.images)): p.read_bytes()
                for p in sorted(self.images.rglob("*__v*.jpg"))}

    def tmp_leftovers(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.name.endswith(".tmp")]


def test_writes_n_decodable_variants_and_manifest(tmp_path, monkeypatch):
    job = Job(tmp_path)
    job.add("incoming/b1/images/SKU-1/a.jpg", seed=1)
    job.add("incoming/b1/images/SKU-1/b.png", seed=2, size=(50, 120), fmt="PNG")
    job.add("incoming/b1/images/SKU-2/c.jpg", seed=3, size=(300, 200), output_dir="incoming/b1/augmented/SKU-2")
    assert job.run(monkeypatch) == 0

    expected = {f"incoming/b1/augmented/SKU-1/{s}__v{k:02d}.jpg" for s in ("a", "b") for k in (1, 2, 3)}
    expected |= {f"incoming/b1/augmented/SKU-2/c__v{k:02d}.jpg" for k in (1, 2, 3)}
    variants = job.variants()
    assert set(variants) == expected
    for rel, data in variants.items():
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.format == "JPEG" and im.mode == "RGB"
            assert max(im.size) <= 64, rel
    assert len(set(variants.values())) == len(variants), "variants of one source must differ"

    assert job.manifest_header() == list(augmentation.MANIFEST_COLUMNS)
    rows = job.manifest()
    assert [r["variant_path"] for r in rows] == sorted(expected)
    sources = {r["path"]: r["sha256"] for r in job.rows}
    for row in rows:
        data = variants[row["variant_path"]]
        with Image.open(io.BytesIO(data)) as im:
            assert (int(row["width"]), int(row["height"])) == im.size
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["source_sha256"] == sources[row["source_path"]]
        assert row["variant_path"].endswith(f"__v{int(row['variant_index']):02d}.jpg")
        assert Path(row["variant_path"]).stem.split("__v")[0] == Path(row["source_path"]).stem
        assert row["seed"] == "0"
        params = json.loads(row["params"])
        assert row["params"] == json.dumps(params, separators=(",", ":"), sort_keys=True)  # compact
        assert set(params) == PARAM_KEYS
        x, y, w, h = params["crop"]
        assert 0 <= x <= 1 - w + 1e-9 and 0 <= y <= 1 - h + 1e-9 and 0.59 <= w * h <= 1.0
        assert -20 <= params["angle"] <= 20 and isinstance(params["hflip"], bool)
        assert all(0.7 <= params[k] <= 1.3 for k in ("brightness", "contrast", "saturation"))
        assert params["perspective"] is None or len(params["perspective"]) == 8
        assert params["blur_sigma"] is None or 0.75 <= params["blur_sigma"] <= 1.75
    summary = job.summary()
    assert (summary["inputs"], summary["variants_written"], summary["variants_existing"], summary["skipped"]) \
        == (3, 9, 0, 0)
    assert summary["images_per_second"] > 0
    assert job.skipped() == {}
    assert job.tmp_leftovers() == []


def test_params_are_the_ones_drawn_and_applied(tmp_path, monkeypatch):
    """The recorded params re-render the variant exactly, so they are the ones really used."""
    job = Job(tmp_path, hps={"variants_per_image": "6", "max_side": "512"})
    row = job.add("incoming/b1/images/SKU-1/a.jpg", seed=5, size=(120, 90))
    assert job.run(monkeypatch) == 0
    src = Image.open(job.images / row["path"]).convert("RGB")
    means = augmentation.ImageStat.Stat(src.reduce(max(1, min(src.size) // 64))).mean
    fill = tuple(round(m) for m in means)
    manifest = job.manifest()
    assert len(manifest) == 6
    for rec in manifest:
        params = json.loads(rec["params"])
        out = augmentation.render_variant(src, params, src.size, 512, means, fill)
        data = augmentation.encode_jpeg(out, 90)
        assert hashlib.sha256(data).hexdigest() == rec["sha256"]
    # and they come from the documented seed: sha256(f"{source_sha}:{k}:{seed}")
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{row['sha256']}:1:0".encode()).digest(), "big"))
    assert json.loads(manifest[0]["params"]) == augmentation.draw_params(rng)


def _twin_jobs(tmp_path: Path, names: tuple[str, ...], hps: list[dict]) -> list[Job]:
    jobs = []
    for name, hp in zip(names, hps, strict=True):
        job = Job(tmp_path / name, hps=hp)
        for i in range(5):
            job.add(f"incoming/b1/images/SKU-1/img{i}.jpg", seed=i, size=(80 + 10 * i, 70))
        jobs.append(job)
    return jobs


def test_deterministic_across_runs_and_worker_counts(tmp_path, monkeypatch):
    one, two, other_seed = _twin_jobs(tmp_path, ("one", "two", "seed7"),
                                      [{"workers": "1"}, {"workers": "2"}, {"workers": "1", "seed": "7"}])
    for job in (one, two, other_seed):
        assert job.run(monkeypatch) == 0
    assert two.summary()["workers"] == 2  # really ran the 2-process pool
    assert len(one.variants()) == 15
    assert one.variants() == two.variants()
    assert one.manifest() == two.manifest()
    # the seed matters: same names, different bytes
    assert set(other_seed.variants()) == set(one.variants())
    assert all(other_seed.variants()[k] != v for k, v in one.variants().items())
    assert one.tmp_leftovers() == two.tmp_leftovers() == []


def test_rerun_skips_existing_and_rewrites_corrupt(tmp_path, monkeypatch):
    job = Job(tmp_path)
    for i in range(3):
        job.add(f"incoming/b1/images/SKU-1/img{i}.jpg", seed=i)
    assert job.run(monkeypatch) == 0
    first = job.variants()
    first_manifest = job.manifest()
    old = 1_000_000_000_000_000_000  # a fixed mtime in the past, in ns
    for rel in first:
        os.utime(job.images / rel, ns=(old, old))
    corrupt = job.images / "incoming/b1/augmented/SKU-1/img1__v02.jpg"
    whole = first["incoming/b1/augmented/SKU-1/img1__v02.jpg"]
    corrupt.write_bytes(whole[: len(whole) // 2])  # headers intact: only a full decode notices
    os.utime(corrupt, ns=(old, old))

    assert job.run(monkeypatch) == 0
    assert job.variants() == first  # the corrupt one is back, byte-identical
    for rel in first:
        mtime = (job.images / rel).stat().st_mtime_ns
        assert (mtime != old) == (rel.endswith("img1__v02.jpg")), rel
    summary = job.summary()
    assert (summary["variants_written"], summary["variants_existing"]) == (1, 8)
    assert job.manifest() == first_manifest  # existing variants are still reported
    assert job.tmp_leftovers() == []


def test_bad_inputs_are_skipped_with_reasons(tmp_path, monkeypatch):
    job = Job(tmp_path)
    good = [job.add(f"incoming/b1/images/SKU-1/good{i}.jpg", seed=i)["path"] for i in range(2)]
    whole = io.BytesIO()
    photo((96, 72), 9).save(whole, "JPEG", quality=90)
    bad = {
        "incoming/b1/images/SKU-1/trunc.jpg": ("cannot decode: truncated file", whole.getvalue()[:600]),
        "incoming/b1/images/SKU-1/zero.jpg": ("empty file", b""),
        "incoming/b1/images/SKU-1/text.jpg": ("not an image", b"this is not a picture\n" * 20),
        "incoming/b1/images/SKU-1/bomb.png": ("decompression bomb", png_header_only(10_000, 10_000)),
        "incoming/b1/images/SKU-1/bigbomb.png": ("decompression bomb", png_header_only(20_000, 20_000)),
        "../outside/escape.jpg": ("'..' component", b"x"),
        "/etc/hostname": ("absolute path", b"x"),
    }
    for rel, (_, data) in bad.items():
        job.add(rel, data)
    job.add("incoming/b1/images/SKU-1/missing.jpg", b"gone")
    (job.images / "incoming/b1/images/SKU-1/missing.jpg").unlink()
    job.add("incoming/b1/images/SKU-1/changed.jpg", sha="0" * 64)
    job.add("incoming/b1/images/SKU-1/good0.png", seed=3, fmt="PNG")  # same stem, same output dir
    job.add("incoming/b1/images/SKU-1/x.jpg", seed=4, output_dir="../../elsewhere")
    bad.update({
        "incoming/b1/images/SKU-1/missing.jpg": ("no such file", None),
        "incoming/b1/images/SKU-1/changed.jpg": ("sha256 mismatch", None),
        "incoming/b1/images/SKU-1/good0.png": ("output name collision with incoming/b1/images/SKU-1/good0.jpg", None),
        "incoming/b1/images/SKU-1/x.jpg": ("invalid output_dir: '..' component", None),
    })

    assert job.run(monkeypatch) == 0
    skipped = job.skipped()
    assert set(skipped) == set(bad)
    for rel, (what, _) in bad.items():
        assert what in skipped[rel], (rel, skipped[rel])
        assert skipped[rel].endswith(f"({rel})"), skipped[rel]  # says where
    assert {Path(r["variant_path"]).name.split("__v")[0] for r in job.manifest()} == {"good0", "good1"}
    assert {r["source_path"] for r in job.manifest()} == set(good)
    assert len(job.variants()) == 6
    assert not (tmp_path / "outside").exists() and not (tmp_path / "elsewhere").exists()
    summary = job.summary()
    assert (summary["inputs"], summary["skipped"], summary["variants_written"]) == (2 + len(bad), len(bad), 6)


def test_unwritable_output_is_a_skip_without_temp_files(tmp_path, monkeypatch):
    job = Job(tmp_path)
    job.add("incoming/b1/images/SKU-1/a.jpg", seed=1, output_dir="blocked")
    job.add("incoming/b1/images/SKU-1/b.jpg", seed=2)
    (job.images / "blocked").write_text("a file where the output folder should be")
    assert job.run(monkeypatch) == 0
    assert "cannot write" in job.skipped()["incoming/b1/images/SKU-1/a.jpg"]
    assert len(job.variants()) == 3
    assert job.tmp_leftovers() == []


def test_subprocess_exit_codes_success_and_all_bad(tmp_path):
    ok = Job(tmp_path / "ok", hps={"workers": "2"})
    for i in range(3):
        ok.add(f"incoming/b1/images/SKU-1/img{i}.jpg", seed=i)
    proc = ok.run_subprocess()
    assert proc.returncode == 0, proc.stderr
    assert "summary: inputs=3, variants_written=9" in proc.stdout
    assert not (ok.out_dir / "failure").exists()
    assert len(ok.variants()) == 9

    bad = Job(tmp_path / "bad")
    bad.add("incoming/b1/images/SKU-1/zero.jpg", b"")
    bad.add("incoming/b1/images/SKU-1/text.jpg", b"hello")
    proc = bad.run_subprocess()
    assert proc.returncode != 0
    failure = (bad.out_dir / "failure").read_text()
    assert "nothing could be processed" in failure
    assert "empty file (incoming/b1/images/SKU-1/zero.jpg)" in failure
    assert "not an image (incoming/b1/images/SKU-1/text.jpg)" in failure
    assert "JOB FAILED" in proc.stderr
    assert len(bad.skipped()) == 2  # the outputs are still written for the post-mortem


@pytest.mark.parametrize("missing", ["manifests", "images"])
def test_missing_channel_fails_naming_it(tmp_path, monkeypatch, missing):
    job = Job(tmp_path)
    job.add("incoming/b1/images/SKU-1/a.jpg")
    job.write_inputs()
    for key, value in job.environ().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SM_CHANNELS", json.dumps([c for c in ("images", "manifests") if c != missing]))
    monkeypatch.delenv(f"SM_CHANNEL_{missing.upper()}")
    assert run_job(augment.main, []) == 1
    assert f"input channel '{missing}' is missing" in (job.out_dir / "failure").read_text()


def test_missing_input_list_and_bad_hyperparameter_fail(tmp_path, monkeypatch):
    job = Job(tmp_path, hps={"variants_per_image": "many"})
    job.add("incoming/b1/images/SKU-1/a.jpg")
    assert job.run(monkeypatch) == 1
    assert "variants_per_image='many'" in (job.out_dir / "failure").read_text()

    (job.out_dir / "failure").unlink()
    job.hps["variants_per_image"] = "2"
    job.write_inputs()
    (job.manifests / "augment_inputs.csv").unlink()
    for key, value in job.environ().items():
        monkeypatch.setenv(key, value)
    assert run_job(augment.main, []) == 1
    assert "augment_inputs.csv not found" in (job.out_dir / "failure").read_text()


def test_empty_input_list_succeeds_with_nothing(tmp_path, monkeypatch, capsys):
    job = Job(tmp_path)
    assert job.run(monkeypatch) == 0
    assert "input list is empty" in capsys.readouterr().out
    assert job.manifest() == [] and job.skipped() == {}
    summary = job.summary()
    assert (summary["inputs"], summary["variants_written"], summary["skipped"]) == (0, 0, 0)
    assert not (job.out_dir / "failure").exists()


def test_hosts_partition_the_inputs(tmp_path, monkeypatch):
    hosts = ("algo-1", "algo-2")
    jobs = [Job(tmp_path / h, host=h, hosts=hosts, images=tmp_path / "fsx") for h in hosts]
    for job in jobs:
        for i in range(12):
            job.add(f"incoming/b1/images/SKU-1/img{i}.jpg", seed=i, size=(40 + i, 30))
        assert job.run(monkeypatch) == 0
    owned = [{r["source_path"] for r in job.manifest()} for job in jobs]
    everything = {r["path"] for r in jobs[0].rows}
    assert owned[0] and owned[1]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == everything
    for rank, job in enumerate(jobs):
        assert owned[rank] == {r["path"] for r in job.rows if int(r["sha256"][:8], 16) % 2 == rank}
        assert job.summary()["inputs"] == len(owned[rank])
    assert len(list((tmp_path / "fsx").rglob("*__v*.jpg"))) == 12 * 3


def test_large_source_is_capped_at_max_side(tmp_path, monkeypatch):
    job = Job(tmp_path, hps={"max_side": "128", "variants_per_image": "4"})
    job.add("incoming/b1/images/SKU-1/big.jpg", seed=1, size=(1200, 900))
    assert job.run(monkeypatch) == 0
    for row in job.manifest():
        assert max(int(row["width"]), int(row["height"])) == 128  # crop >= 60% of 1200x900 > 128
    # A variant re-rendered alone (the others exist) is byte-identical: the JPEG draft scale
    # must not depend on which variants happen to be missing.
    first = job.variants()
    for rel in first:
        (job.images / rel).unlink()
        assert job.run(monkeypatch) == 0
        assert job.variants() == first, rel


def test_progress_lines(tmp_path, monkeypatch, capsys):
    job = Job(tmp_path, hps={"log_every_seconds": "0.000001"})
    for i in range(3):
        job.add(f"incoming/b1/images/SKU-1/img{i}.jpg", seed=i)
    assert job.run(monkeypatch) == 0
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if "progress" in line]
    assert progress and all("images/s" in line and "ETA" in line for line in progress)
    assert any("progress 1/3 inputs" in line for line in progress)
    assert "summary: inputs=3, variants_written=9, variants_existing=0, skipped=0" in out


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("perspective", [False, True])
def test_opencv_warp_is_pils_transform_with_the_same_coefficients(perspective):
    """The job warps with OpenCV; the map must be exactly the one PIL's ``transform`` applies to
    ``transform_data``'s coefficients (same corners, same pixel-centre convention, output ->
    input), which is what the geometry (crop, rotation, flip, perspective) was written for."""
    import numpy as np

    src = photo((160, 120), seed=3)
    params = {"crop": [0.1, 0.15, 0.7, 0.75], "angle": 12.5, "hflip": True,
              "perspective": [0.05, 0.02, 0.08, 0.0, 0.03, 0.06, 0.01, 0.04] if perspective else None}
    size = augmentation.output_size(params, *src.size, 512)
    quad = augmentation.source_quad(params, *src.size)
    coeffs = augmentation.transform_data(quad, size, perspective)
    method = Image.Transform.PERSPECTIVE if perspective else Image.Transform.AFFINE
    pil = src.transform(size, method, coeffs, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    ours = augmentation.warp_quad(np.asarray(src), quad, size, perspective, (0, 0, 0))
    w, h = size
    centre = (slice(h // 8, 7 * h // 8), slice(w // 8, 7 * w // 8))  # away from the fill at the edges
    assert ours.shape == (h, w, 3)
    assert _psnr(ours[centre], np.asarray(pil)[centre]) > 40


def test_blur_is_a_gaussian_of_the_recorded_sigma_in_output_pixels():
    import numpy as np

    src = np.zeros((64, 64, 3), np.uint8)
    src[:, 32:] = 255  # a vertical edge
    base = {"crop": [0.0, 0.0, 1.0, 1.0], "angle": 0.0, "hflip": False, "perspective": None}
    sharp = augmentation.warp(src, {**base, "blur_sigma": None}, (64, 64), 64, (0, 0, 0))
    soft = augmentation.warp(src, {**base, "blur_sigma": 1.5}, (64, 64), 64, (0, 0, 0))
    row_sharp, row_soft = sharp[32, :, 0].astype(float), soft[32, :, 0].astype(float)
    assert row_sharp[30] == 0 and row_sharp[33] == 255
    # Across the edge a Gaussian of sigma 1.5 px spreads 10%..90% over 2.56 sigma = 3.8 px.
    ramp = [x for x in range(20, 44) if 0.1 * 255 < row_soft[x] < 0.9 * 255]
    assert 3 <= len(ramp) <= 5, row_soft[24:40]
