"""Benchmark of the augmentation job (training_image/code/sku_jobs/augmentation.py).

Generates K photo-like 512x512 JPEGs, then measures in one run:
  (a) the floor: read + decode + re-encode (same quality) + write each image, PIL, 1 process;
  (b) the job at 1 process: output variants/s, as % of the floor (target >= 70%);
  (c) the job at 2 processes: speed-up over (b) (target >= 1.8x);
  (d) the transform library: the job's OpenCV renderer vs the previous PIL-only one and
      torchvision.transforms.v2 functional ops on PIL images, same parameters, ms per variant
      and PSNR vs a reference.

    .venv/bin/python bench/augment_bench.py [--images 200] [--variants 4] [--skip-torchvision]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageStat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training_image" / "code"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

TARGET_FLOOR_PCT = 70.0
TARGET_SPEEDUP = 1.8


def aug():
    """The job module (imported lazily so spawned workers only pay for what they use)."""
    from sku_jobs import augmentation

    return augmentation


# --------------------------------------------------------------------------- data


def photo(rng: random.Random, size: int) -> Image.Image:
    """A product-on-the-till-like picture: lit background, boxes/cans/labels, optics, sensor noise."""
    tint = [rng.randint(60, 200) for _ in range(3)]
    bg = Image.linear_gradient("L").rotate(rng.uniform(0, 360)).resize((size, size))
    img = Image.merge("RGB", [bg.point(lambda v, t=t: int(t * 0.6 + v * 0.4)) for t in tint])
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(4, 9)):
        x, y = rng.randrange(size), rng.randrange(size)
        w, h = rng.randint(size // 10, size // 2), rng.randint(size // 10, size // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.random()
        if kind < 0.4:
            draw.rectangle((x, y, x + w, y + h), fill=colour, outline=(0, 0, 0), width=2)
        elif kind < 0.7:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        else:
            draw.polygon([(x + rng.randint(-w, w), y + rng.randint(-h, h)) for _ in range(5)], fill=colour)
        for line in range(rng.randint(0, 3)):  # label text
            draw.text((x + 6, y + 6 + line * 18), f"SKU {rng.randint(1000, 99999)}", fill=(255, 255, 255),
                      font_size=16)
    img = img.filter(ImageFilter.GaussianBlur(0.8))  # lens
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size)).convert("RGB")
    return Image.blend(img, noise, 0.06)  # sensor noise, ~ +-8 grey levels


def make_dataset(root: Path, count: int, size: int, quality: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        rel = f"incoming/bench/images/SKU-{i % 20:03d}/img{i:05d}.jpg"
        buf = io.BytesIO()
        photo(rng, size).save(buf, "JPEG", quality=quality)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(buf.getvalue())
        rows.append({"path": rel, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                     "sku_id": f"SKU-{i % 20:03d}"})
    return rows


# --------------------------------------------------------------------------- measurements


def measure_floor(root: Path, rows: list[dict], quality: int) -> float:
    """(a) images/s of read + decode + encode + write, the least any augmentation must do."""
    out = root / "floor"
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    for i, row in enumerate(rows):
        data = (root / row["path"]).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality)
        (out / f"{i}.jpg").write_bytes(buf.getvalue())
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return len(rows) / seconds


def run_job(root: Path, rows: list[dict], tag: str, workers: int, variants: int, quality: int,
            max_side: int) -> tuple[float, dict]:
    """(b)/(c) the job exactly as the container runs it; returns (variants/s wall, summary)."""
    from sku_jobs.sm_env import JobEnv

    manifests = root / f"manifests-{tag}"
    manifests.mkdir()
    with (manifests / "augment_inputs.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "sha256", "sku_id", "output_dir"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "output_dir": f"aug-{tag}/{row['sku_id']}"})
    env = JobEnv(
        hyperparameters={"variants_per_image": variants, "workers": workers, "jpeg_quality": quality,
                         "max_side": max_side, "log_every_seconds": 3600},
        channels={"images": root, "manifests": manifests},
        model_dir=root / f"model-{tag}", output_data_dir=root / f"out-{tag}" / "data",
        output_dir=root / f"out-{tag}", checkpoint_dir=root / f"ckpt-{tag}",
        hosts=["algo-1"], current_host="algo-1", num_gpus=0, num_cpus=os.cpu_count() or 1,
    )
    start = time.perf_counter()
    summary = aug().run(env)
    seconds = time.perf_counter() - start
    made = summary["variants_written"]
    if made != len(rows) * variants:
        raise SystemExit(f"job {tag} wrote {made} variants, expected {len(rows) * variants}")
    shutil.rmtree(root / f"aug-{tag}")
    return made / seconds, summary


def _cpu_loop(n: int) -> float:
    """A fixed PIL warp + encode loop; returns its own duration (process start-up excluded)."""
    img = Image.frombytes("RGB", (512, 512), random.Random(0).randbytes(512 * 512 * 3))
    start = time.perf_counter()
    for i in range(n):
        out = img.transform((460, 400), Image.Transform.AFFINE, (0.95, 0.3, 3 + i % 7, -0.3, 0.95, 4),
                            Image.Resampling.BILINEAR)
        out.save(io.BytesIO(), "JPEG", quality=90)
    return time.perf_counter() - start


def parallel_ceiling(n: int = 300) -> float:
    """What 2 processes can gain on this machine at all (shared caches, SMT, other tenants)."""
    import multiprocessing

    solo = _cpu_loop(n)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pair = pool.map(_cpu_loop, [n, n])
    return 2 * solo / max(pair)


def stage_breakdown(root: Path, rows: list[dict], variants: int, quality: int, max_side: int) -> dict:
    """Where the job's time goes, ms per output variant (decode is shared by the N variants)."""
    A = aug()
    out = root / "breakdown"
    out.mkdir(exist_ok=True)
    t = dict.fromkeys(("read+verify", "decode", "warp", "colour", "encode", "hash+write"), 0.0)
    clock = time.perf_counter
    for i, row in enumerate(rows):
        t0 = clock()
        data = (root / row["path"]).read_bytes()
        hashlib.sha256(data).hexdigest()
        t1 = clock()
        src = Image.open(io.BytesIO(data))
        src.load()
        means = ImageStat.Stat(src.reduce(max(1, min(src.size) // 64))).mean
        fill = tuple(round(m) for m in means)
        arr = np.asarray(src)  # once per source, as the job does
        t2 = clock()
        t["read+verify"] += t1 - t0
        t["decode"] += t2 - t1
        for k in range(1, variants + 1):
            p = A.draw_params(A.variant_rng(row["sha256"], k, 0))
            t0 = clock()
            warped = A.warp(arr, p, src.size, max_side, fill)
            t1 = clock()
            coloured = Image.fromarray(A.apply_colour(warped, p, means), "RGB")
            t2 = clock()
            jpeg = A.encode_jpeg(coloured, quality)
            t3 = clock()
            hashlib.sha256(jpeg).hexdigest()
            A.write_atomic(out / f"{i}_{k}.jpg", jpeg)
            t4 = clock()
            t["warp"] += t1 - t0
            t["colour"] += t2 - t1
            t["encode"] += t3 - t2
            t["hash+write"] += t4 - t3
    shutil.rmtree(out)
    n = len(rows) * variants
    return {k: 1000 * v / n for k, v in t.items()}


def _psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR over the central half (where every pipeline samples real pixels, not fill)."""
    w, h = a.size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    ha, hb = a.crop(box).tobytes(), b.crop(box).tobytes()
    se = sum((x - y) ** 2 for x, y in zip(ha, hb, strict=True))
    return 99.0 if se == 0 else 10 * math.log10(255**2 * len(ha) / se)


def compare_libraries(root: Path, rows: list[dict], variants: int, quality: int, max_side: int) -> dict:
    """(d) PIL-only renderer vs torchvision.transforms.v2 functional ops on PIL, same params."""
    A = aug()
    t0 = time.perf_counter()
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    torch_import_s = time.perf_counter() - t0
    torch.set_num_threads(1)  # one core per worker, as in the job
    bilinear = InterpolationMode.BILINEAR

    def torchvision_render(src: Image.Image, p: dict, means, fill) -> Image.Image:
        w0, h0 = src.size
        left, top, cw, ch = (round(p["crop"][0] * w0), round(p["crop"][1] * h0),
                             round(p["crop"][2] * w0), round(p["crop"][3] * h0))
        ow, oh = A.output_size(p, w0, h0, max_side)
        x = F.resized_crop(src, top, left, ch, cw, [oh, ow], interpolation=bilinear, antialias=True)
        x = F.rotate(x, p["angle"], interpolation=bilinear, fill=list(fill))
        if p["hflip"]:
            x = F.horizontal_flip(x)
        if p["perspective"]:
            o = p["perspective"]
            start = [[o[0] * ow, o[1] * oh], [(1 - o[2]) * ow, o[3] * oh],
                     [(1 - o[4]) * ow, (1 - o[5]) * oh], [o[6] * ow, (1 - o[7]) * oh]]
            end = [[0, 0], [ow, 0], [ow, oh], [0, oh]]
            x = F.perspective(x, start, end, interpolation=bilinear, fill=list(fill))
        # torchvision has no per-channel gain; a PIL point table is the cheapest stand-in
        lut = [min(255, round(v * g)) for g in p["white_balance"] for v in range(256)]
        x = x.point(lut)
        x = F.adjust_brightness(x, p["brightness"])
        x = F.adjust_contrast(x, p["contrast"])
        x = F.adjust_saturation(x, p["saturation"])
        if p["blur_sigma"]:
            k = 2 * math.ceil(3 * p["blur_sigma"]) + 1
            x = F.gaussian_blur(x, [k, k], [p["blur_sigma"]] * 2)
        return x

    def reference(src: Image.Image, p: dict, means, fill) -> Image.Image:
        """One bicubic resampling pass, unclipped colour maths, Pillow's GaussianBlur."""
        w0, h0 = src.size
        size = A.output_size(p, w0, h0, max_side)
        persp = p["perspective"] is not None
        method = Image.Transform.PERSPECTIVE if persp else Image.Transform.AFFINE
        out = src.transform(size, method, A.transform_data(A.source_quad(p, w0, h0), size, persp),
                            Image.Resampling.BICUBIC, fillcolor=fill)
        out = out.convert("RGB", A.colour_matrix(p, means))
        return out.filter(ImageFilter.GaussianBlur(p["blur_sigma"])) if p["blur_sigma"] else out

    arrays: dict[int, np.ndarray] = {}

    def job_render(src, p, means, fill):  # the source's array is made once per source, as in the job
        arr = arrays.get(id(src))
        if arr is None:
            arr = arrays[id(src)] = np.asarray(src)
        return A.render_variant(arr, p, src.size, max_side, means, fill)

    def pil_render(src: Image.Image, p: dict, means, fill) -> Image.Image:
        """The job's previous renderer, Pillow only: one bilinear PIL ``transform`` (from an
        antialiased ``resize`` of the quad's box when the source has > 1.15 pixels per output
        pixel), the blur as "resample down by sqrt(3) sigma, warp back up", one colour matrix."""
        w0, h0 = src.size
        size = A.output_size(p, w0, h0, max_side)
        quad = A.source_quad(p, w0, h0)
        step = p["crop"][2] * w0 / size[0] * (math.sqrt(3) * p["blur_sigma"] if p["blur_sigma"] else 1.0)
        img = src
        if step >= 1.15:
            xs, ys = [q[0] for q in quad], [q[1] for q in quad]
            box = (max(0.0, math.floor(min(xs)) - 2.0), max(0.0, math.floor(min(ys)) - 2.0),
                   min(float(w0), math.ceil(max(xs)) + 2.0), min(float(h0), math.ceil(max(ys)) + 2.0))
            bw, bh = box[2] - box[0], box[3] - box[1]
            iw, ih = max(1, round(bw / step)), max(1, round(bh / step))
            img = src.resize((iw, ih), Image.Resampling.BILINEAR, box=box)
            quad = [((x - box[0]) * iw / bw, (y - box[1]) * ih / bh) for x, y in quad]
        persp = p["perspective"] is not None
        method = Image.Transform.PERSPECTIVE if persp else Image.Transform.AFFINE
        out = img.transform(size, method, A.transform_data(quad, size, persp), Image.Resampling.BILINEAR,
                            fillcolor=fill)
        return out.convert("RGB", A.colour_matrix(p, means))

    jobs = []
    for row in rows:
        data = (root / row["path"]).read_bytes()
        src = Image.open(io.BytesIO(data)).convert("RGB")
        means = ImageStat.Stat(src.reduce(max(1, min(src.size) // 64))).mean
        fill = tuple(round(m) for m in means)
        for k in range(1, variants + 1):
            p = A.draw_params(A.variant_rng(row["sha256"], k, 0))
            w0, h0 = src.size  # pixel-aligned crop, so both pipelines cut the very same pixels
            p["crop"] = [round(p["crop"][0] * w0) / w0, round(p["crop"][1] * h0) / h0,
                         round(p["crop"][2] * w0) / w0, round(p["crop"][3] * h0) / h0]
            jobs.append((src, p, means, fill))

    result: dict = {"torch_import_s": torch_import_s, "variants": len(jobs)}
    for name, render in (("opencv", job_render), ("pil", pil_render), ("torchvision", torchvision_render)):
        render(*jobs[0])  # warm-up (lazy imports, kernel caches)
        t_render = t_encode = 0.0
        for job in jobs:
            t0 = time.perf_counter()
            out = render(*job)
            t1 = time.perf_counter()
            A.encode_jpeg(out, quality)
            t_encode += time.perf_counter() - t1
            t_render += t1 - t0
        n = len(jobs)
        # Quality: the full pipeline, and geometry alone (colour identity, no blur), vs reference.
        sample = jobs[:: max(1, n // 40)]
        full = [_psnr(render(*j), reference(*j)) for j in sample]
        geo = []
        for src, p, means, fill in sample:
            q = {**p, "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "white_balance": [1.0] * 3,
                 "blur_sigma": None}
            geo.append(_psnr(render(src, q, means, fill), reference(src, q, means, fill)))
        result[name] = {"render_ms": 1000 * t_render / n, "encode_ms": 1000 * t_encode / n,
                        "psnr_full_db": sum(full) / len(full), "psnr_geometry_db": sum(geo) / len(geo)}
    return result


# --------------------------------------------------------------------------- report


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import PIL

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "pillow": PIL.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="K source images (default 200)")
    ap.add_argument("--variants", type=int, default=4, help="variants per image (default 4)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--max-side", type=int, default=None,
                    help="variants' longer side (default: the job's default for training at 224 px, "
                         "sku_contracts.files.variant_max_side(224) = 342)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=2, help="best of R runs per measurement (default 2)")
    ap.add_argument("--compare-images", type=int, default=50, help="sources for the library comparison")
    ap.add_argument("--skip-torchvision", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.max_side is None:
        from sku_contracts.files import variant_max_side

        args.max_side = variant_max_side(224)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="augment-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        info = machine()
        load_start = os.getloadavg()[0]
        print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, Pillow {info['pillow']}")
        t0 = time.perf_counter()
        rows = make_dataset(work, args.images, args.size, args.quality, seed=1234)
        kb = sum((work / r["path"]).stat().st_size for r in rows) / len(rows) / 1024
        print(f"data: {len(rows)} JPEGs {args.size}x{args.size} q{args.quality}, mean {kb:.0f} KiB "
              f"(generated in {time.perf_counter() - t0:.1f}s), {args.variants} variants each")
        print(f"variants: longer side <= {args.max_side} px (the job's max_side)")

        floor = max(measure_floor(work, rows, args.quality) for _ in range(args.repeats))
        one = max((run_job(work, rows, f"w1r{r}", 1, args.variants, args.quality, args.max_side)
                   for r in range(args.repeats)), key=lambda t: t[0])
        two = max((run_job(work, rows, f"w2r{r}", 2, args.variants, args.quality, args.max_side)
                   for r in range(args.repeats)), key=lambda t: t[0])
        stages = stage_breakdown(work, rows[: args.compare_images], args.variants, args.quality, args.max_side)
        ceiling = parallel_ceiling()
        pct = 100 * one[0] / floor
        speedup = two[0] / one[0]
        figures = {"machine": info, "images": len(rows), "variants": args.variants, "mean_kib": kb,
                   "floor_ips": floor, "job1_ips": one[0], "job2_ips": two[0], "pct_of_floor": pct,
                   "speedup": speedup, "parallel_ceiling": ceiling, "stages_ms": stages, "loadavg_start": load_start}

        if not args.skip_torchvision:
            try:
                cmp_rows = rows[: args.compare_images]
                figures["libraries"] = compare_libraries(work, cmp_rows, args.variants, args.quality, args.max_side)
            except ImportError as exc:
                print(f"(library comparison skipped: {exc})")

        ok_pct, ok_speed = pct >= TARGET_FLOOR_PCT, speedup >= TARGET_SPEEDUP
        print()
        print(f"{'measurement':52s} {'images/s':>10s} {'ms/image':>9s}  vs target")
        print("-" * 90)
        print(f"{'(a) floor: read+decode+encode+write, 1 process':52s} {floor:10.1f} {1000 / floor:9.2f}")
        print(f"{'(b) augmentation job, 1 process (output variants)':52s} {one[0]:10.1f} {1000 / one[0]:9.2f}"
              f"  {pct:5.1f}% of floor (>= {TARGET_FLOOR_PCT:.0f}%): {'PASS' if ok_pct else 'FAIL'}")
        print(f"{'(c) augmentation job, 2 processes':52s} {two[0]:10.1f} {1000 / two[0]:9.2f}"
              f"  {speedup:5.2f}x vs 1 process (>= {TARGET_SPEEDUP}x): {'PASS' if ok_speed else 'FAIL'}")
        print(f"{'    machine ceiling: a pure PIL loop, 2 vs 1 process':52s} {'':10s} {'':9s}  {ceiling:5.2f}x")
        print()
        print("where the job's time goes (1 process, ms per output variant; the floor is "
              f"{1000 / floor:.2f} ms per image):")
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()) + f"  = {sum(stages.values()):.2f} ms")
        lib = figures.get("libraries")
        if lib:
            print()
            print(f"transform library, {lib['variants']} variants of {min(len(rows), args.compare_images)} sources, "
                  f"1 thread (torch import: {lib['torch_import_s']:.1f}s per process)")
            print(f"{'renderer':34s} {'render ms':>10s} {'encode ms':>10s} {'PSNR geometry':>14s} {'PSNR full':>10s}")
            for name, label in (("opencv", "OpenCV (the job)"), ("pil", "PIL-only (the previous job)"),
                                ("torchvision", "torchvision.transforms.v2 on PIL")):
                r = lib[name]
                print(f"{label:34s} {r['render_ms']:10.2f} {r['encode_ms']:10.2f} "
                      f"{r['psnr_geometry_db']:11.1f} dB {r['psnr_full_db']:7.1f} dB")
            fastest = min(("opencv", "pil", "torchvision"), key=lambda n: lib[n]["render_ms"])
            print(f"fastest: {fastest}; PIL-only {lib['pil']['render_ms'] / lib['opencv']['render_ms']:.2f}x and "
                  f"torchvision {lib['torchvision']['render_ms'] / lib['opencv']['render_ms']:.2f}x the job's time")
        figures["loadavg_end"] = os.getloadavg()[0]
        print(f"\n1-min load average: {load_start:.2f} at start, {figures['loadavg_end']:.2f} at end "
              f"(on {info['cores']} cores; above ~1 the figures are disturbed by other processes)")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        return 0 if (ok_pct and ok_speed) or not args.strict else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # required: the job's spawned workers import this file as __mp_main__
    sys.exit(main())
