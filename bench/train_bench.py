"""Training-job throughput: model step images/s and data-loader images/s.

CPU (default): resnet18 @ 64 px, batch 32, forward + backward + SGD step, and the loader
(``ManifestDataset`` + train transforms) on generated JPEGs with all CPU cores::

    .venv/bin/python bench/train_bench.py

GPU (what ``bench/gpu_train.sh`` runs): resnet152 @ 224 px, 12,000 classes, AMP bf16 +
channels_last on synthetic tensors, the loader on large generated JPEGs, and optionally a
short end-to-end ``train.py`` run (``--e2e-steps``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training_image" / "code"))
sys.path.insert(0, str(REPO / "plugins"))

from sku_jobs.data import (  # noqa: E402 - needs the path above
    ManifestDataset,
    Sample,
    eval_resize,
    make_loader,
    train_transform,
)
from sku_jobs.model import build_model, count_parameters  # noqa: E402


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def bench_model(args: argparse.Namespace, amp: str, channels_last: bool, batch_size: int) -> dict:
    """Images/s of forward + backward + optimizer step on synthetic tensors (default freezing)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.arch, args.num_classes, args.head_hidden).to(device)
    total, trainable = count_parameters(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if device.type == "cuda" else None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (batch_size,), device=device)
    model.train()

    def step() -> None:
        with torch.amp.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {
        "what": f"{args.arch} train step @{args.image_size}px b{batch_size} {amp if dtype else 'fp32'}"
        + (" channels_last" if channels_last else ""),
        "images_per_sec": args.steps * batch_size / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "params_total": total,
        "params_trainable": trainable,
        "peak_gib": round(peak, 2),
    }


def _write_jpeg(job: tuple[str, int, int, int]) -> int:
    """A product-photo-like JPEG: gradient, a few shapes, mild noise (compresses like a photo)."""
    from PIL import Image, ImageDraw, ImageFilter

    path, width, height, seed = job
    rng = random.Random(seed)
    base = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(base)
    for _ in range(6):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(width // 8, width // 2), y0 + rng.randrange(height // 8, height // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    noise = Image.effect_noise((width, height), 40).convert("RGB")
    img = Image.blend(base.filter(ImageFilter.GaussianBlur(2)), noise, 0.12)
    img.save(path, quality=90)
    return os.path.getsize(path)


def make_jpegs(root: Path, count: int, width: int, height: int, classes: int = 10) -> list[Sample]:
    """Generate ``count`` JPEGs under ``root`` (in parallel) and return manifest samples."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / f"c{i % classes:03d}_{i:05d}.jpg"), width, height, i) for i in range(count)]
    with ProcessPoolExecutor(max_workers=_cpus()) as pool:
        sizes = list(pool.map(_write_jpeg, jobs, chunksize=16))
    print(f"generated {count} JPEGs {width}x{height}, mean {sum(sizes) / len(sizes) / 1024:.0f} KiB", flush=True)
    return [Sample(Path(p).name, i % classes, f"SKU-{i % classes:03d}", "") for i, (p, *_rest) in enumerate(jobs)]


def bench_loader(root: Path, samples: list[Sample], image_size: int, batch_size: int, workers: int,
                 draft: bool, passes: int) -> dict:
    """Images/s of the training DataLoader (decode + train transforms + collate), after warm-up."""
    ds = ManifestDataset(root, samples, train_transform(image_size), eval_resize(image_size) if draft else None)
    loader = make_loader(ds, batch_size, sampler=torch.utils.data.RandomSampler(ds), workers=workers,
                         drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    n, start = 0, time.perf_counter()
    for batch in it:
        n += len(batch)
    for _ in range(passes - 1):
        for batch in loader:
            n += len(batch)
    seconds = time.perf_counter() - start
    return {
        "what": f"loader @{image_size}px b{batch_size} workers={workers} draft={'on' if draft else 'off'}",
        "images_per_sec": n / seconds,
        "per_worker": n / seconds / max(1, workers),
    }


def run_train_e2e(root: Path, samples: list[Sample], args: argparse.Namespace, workers: int) -> dict:
    """A short real ``train.py`` run (torchrun, 1 process) on the generated images."""
    job = Path(tempfile.mkdtemp(prefix="e2e-job-"))
    manifests = job / "manifests"
    manifests.mkdir()
    classes = sorted({s.sku_id for s in samples})
    (manifests / "classes.json").write_text(json.dumps({"num_classes": len(classes), "classes": classes}))
    val = samples[: max(args.batch_size, len(samples) // 10)]
    for name, rows in (("train.csv", samples), ("val.csv", val), ("test.csv", val)):
        with (manifests / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "class_index", "sku_id", "sha256"])
            w.writerows([s.path, s.class_index, s.sku_id, ""] for s in rows)
    env = dict(os.environ)
    env.update(SAGEMAKER_BASE_DIR=str(job), SM_CHANNELS='["images","manifests"]', SM_CHANNEL_IMAGES=str(root),
               SM_CHANNEL_MANIFESTS=str(manifests), SM_MODEL_DIR=str(job / "model"), SM_OUTPUT_DIR=str(job / "out"),
               SM_OUTPUT_DATA_DIR=str(job / "out" / "data"), SM_HPS="{}",
               PYTHONUNBUFFERED="1")
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun) if torchrun.exists() else sys.executable, *([] if torchrun.exists() else ["-m", "torch.distributed.run"]),
           "--standalone", "--nproc_per_node", "1", str(REPO / "training_image" / "code" / "train.py"),
           "--arch", args.arch, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--epochs", "2", "--max-steps-per-epoch", str(args.e2e_steps), "--workers", str(workers),
           "--amp", args.amp, "--print-freq", "10"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.e2e_timeout)
    seconds = time.perf_counter() - start
    print(proc.stdout[-4000:], proc.stderr[-3000:] if proc.returncode else "", sep="\n", flush=True)
    shutil.rmtree(job, ignore_errors=True)
    metric = [ln for ln in proc.stdout.splitlines() if ln.startswith("METRIC epoch=")]
    ips = float(metric[-1].rsplit("images_per_sec=", 1)[1]) if metric else float("nan")
    return {"what": f"train.py e2e {args.arch} @{args.image_size}px b{args.batch_size} "
                    f"{args.e2e_steps} steps/epoch (rc={proc.returncode}, {seconds:.0f}s)",
            "images_per_sec": ips, "returncode": proc.returncode}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--extra-batch-sizes", default="", help="comma-separated batch sizes also measured")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--head-hidden", type=int, default=576)
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fp32-baseline", action="store_true", help="also measure without AMP / channels_last")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", default="",
                   help="comma-separated torch intra-op thread counts to measure on CPU (default: 1 and all cores)")
    p.add_argument("--loader-images", type=int, default=256, help="0 skips the loader benchmark")
    p.add_argument("--loader-size", default="320x240", help="generated JPEG WIDTHxHEIGHT")
    p.add_argument("--loader-batch-size", type=int, default=0, help="default: --batch-size")
    p.add_argument("--loader-workers", type=int, default=0, help="0 = all CPU cores")
    p.add_argument("--loader-passes", type=int, default=2)
    p.add_argument("--no-draft-baseline", action="store_true", help="also measure the loader without draft()")
    p.add_argument("--e2e-steps", type=int, default=0, help="run train.py for 2 epochs of N steps (0 = skip)")
    p.add_argument("--e2e-timeout", type=int, default=240)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cpus = _cpus()
    print(f"torch {torch.__version__} | device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f" | CPUs {cpus} | torch threads {torch.get_num_threads()}", flush=True)

    rows: list[dict] = []
    # On CPU, one thread vs all cores: on a shared or busy host the all-cores number collapses
    # (OpenMP threads wait on each other), which one thread per process avoids.
    threads = [0] if args.device == "cuda" else [int(t) for t in (args.threads or f"1,{cpus}").split(",")]
    for n in threads:
        if n:
            torch.set_num_threads(n)
        for bs in [args.batch_size] + [int(b) for b in args.extra_batch_sizes.split(",") if b.strip()]:
            rows.append(bench_model(args, args.amp, args.channels_last, bs))
            if n:
                rows[-1]["what"] += f" threads={n}"
            print(rows[-1], flush=True)
    if args.fp32_baseline and (args.amp != "off" or args.channels_last):
        rows.append(bench_model(args, "off", False, args.batch_size))
        print(rows[-1], flush=True)
    if args.device == "cuda":
        torch.cuda.empty_cache()

    if args.loader_images or args.e2e_steps:
        width, height = (int(v) for v in args.loader_size.lower().split("x"))
        workers = args.loader_workers or cpus
        with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
            root = Path(tmp)
            samples = make_jpegs(root, max(args.loader_images, args.batch_size * 4), width, height)
            lbs = args.loader_batch_size or args.batch_size
            if args.loader_images:
                rows.append(bench_loader(root, samples, args.image_size, lbs, workers, True, args.loader_passes))
                print(rows[-1], flush=True)
                if args.no_draft_baseline:
                    rows.append(bench_loader(root, samples, args.image_size, lbs, workers, False, args.loader_passes))
                    print(rows[-1], flush=True)
            if args.e2e_steps:
                rows.append(run_train_e2e(root, samples, args, max(1, workers - 1)))

    print()
    print(f"{'measurement':<72} {'images/s':>10}")
    print("-" * 83)
    for r in rows:
        print(f"{r['what']:<72} {r['images_per_sec']:>10.1f}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"torch": str(torch.__version__), "cpus": cpus, "rows": rows}, indent=2))
    return 0 if all(r.get("returncode", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
