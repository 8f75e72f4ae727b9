"""Model quality on real photos, through the real code (issue #10).

    .venv/bin/python bench/quality_bench.py                 # ~20 min on 2 CPU cores
    .venv/bin/python bench/quality_bench.py --epochs 2 --smoke   # a few minutes: does it run

The photos are ``shared/data/grocery`` (grocery-m1: 60 SKUs, grocery-m2: 21 new SKUs), in our
batch contract. Steps:

1. **Other occasions, stand-in.** The photos of a product were shot in runs (the same bin, the
   same light). Per SKU they are clustered into *scenes* (average-linkage on a 8x8 colour
   thumbnail, ~8 photos a scene), and whole scenes holding ~20% of each SKU's photos are held
   out: never registered, never trained on. Their top-1 is the "group-held-out" estimate.
2. **Registration and split**: the rest is registered month by month by the catalogue code
   (``register_batch`` with ``image_check.inspect_image`` on every file) on a private PostgreSQL
   (the local stack's ``PostgresServer``), each image's scene given as its manifest ``group``,
   and exported with ``export_manifests``: the DAG's own train/val/test.
3. **Training** with ``train.py`` (one process, CPU) and **evaluation** with ``evaluate.py``
   (the pipeline's month-2 estimate, exactly as the DAG computes it) and the job code's loaders
   and model (every other score): month 1 from random init (nothing frozen, the policy now) and
   frozen conv1..layer3 (the old behaviour); month 2 as a full retrain and as warm starts from
   the month-1 model with the levers (replay, backbone LR, distillation, fewer epochs).
4. **Reference**: a plain torchvision loop (resnet18, same size, epochs, batch, LR) on the
   same photos with a per-image random split, as a person would train it by hand.

Compute is counted in training FLOPs (torch's ``FlopCounterMode`` on one train step of each
configuration, times the images each run saw, plus the teacher's forward for distillation),
so the share does not depend on what else the machine runs; wall time is printed next to it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for sub in ("plugins", "devtools", "training_image/code"):
    sys.path.insert(0, str(REPO / sub))

DATA = REPO.parent / "shared" / "data" / "grocery"
BATCHES = ("grocery-m1", "grocery-m2")
TRAIN_PY = REPO / "training_image" / "code" / "train.py"
EVALUATE_PY = REPO / "training_image" / "code" / "evaluate.py"

# Month-2 warm-start recipes: (name, hyperparameters). Epochs are set from the compute budget.
RECIPES = {
    "warm: replay all, frozen conv1-layer3": {"replay_fraction": 1.0},
    "warm: balanced replay 0.3": {"replay_fraction": 0.3, "replay_balanced": True},
    "warm: balanced replay 0.3, backbone LR x0.1": {"replay_fraction": 0.3, "replay_balanced": True,
                                                    "backbone_lr_mult": 0.1, "freeze": "none"},
    "warm: balanced replay 0.3, distillation": {"replay_fraction": 0.3, "replay_balanced": True,
                                                "distill_weight": 1.0},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- scenes / hold-out


def scenes_of(paths: list[Path], per_scene: int = 8) -> list[int]:
    """Scene index per photo: Ward linkage on a normalised 8x8 colour thumbnail."""
    import numpy as np
    from PIL import Image
    from scipy.cluster.hierarchy import fcluster, linkage

    if len(paths) < 2:
        return [0] * len(paths)
    feats = []
    for p in paths:
        with Image.open(p) as im:
            im.draft("RGB", (64, 64))
            v = np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float64).ravel()
        v = v - v.mean()
        feats.append(v / (np.linalg.norm(v) or 1.0))
    z = linkage(np.stack(feats), method="ward")  # unit vectors: Euclidean ~ cosine
    k = max(2, round(len(paths) / per_scene))
    return [int(c) - 1 for c in fcluster(z, t=k, criterion="maxclust")]


def plan_holdout(batch_dir: Path, fraction: float) -> tuple[dict[str, str], dict[str, str]]:
    """(``<sku>/<file>`` -> capture-run group for the photos kept, ``<sku>/<file>`` -> sku held out).

    Whole scenes (~8 photos) are held out; the photos kept are labelled with finer runs
    (~4 photos, the same clustering within what is kept), given as the manifest's ``group``.
    """
    kept, held = {}, {}
    for sku_dir in sorted((batch_dir / "images").iterdir()):
        files = sorted(sku_dir.iterdir())
        scene = scenes_of(files)
        by_scene = defaultdict(list)
        for f, s in zip(files, scene, strict=True):
            by_scene[s].append(f)
        order = sorted(by_scene, key=lambda s: hashlib.sha256(f"{sku_dir.name}:{s}".encode()).hexdigest())
        n_held, target, keep = 0, fraction * len(files), []
        for s in order:
            rels = [f"{sku_dir.name}/{f.name}" for f in by_scene[s]]
            if n_held < target and n_held + len(rels) <= 1.5 * target and s != order[-1]:
                held.update(dict.fromkeys(rels, sku_dir.name))
                n_held += len(rels)
            else:
                keep += by_scene[s]
        keep.sort()
        for f, run in zip(keep, scenes_of(keep, per_scene=4), strict=True):
            kept[f"{sku_dir.name}/{f.name}"] = f"run-{run:03d}"
    return kept, held


# --------------------------------------------------------------------------- catalogue


def register(conn, batch_dir: Path, kept: dict[str, str], with_groups: bool):
    """Register the kept photos of one batch with the catalogue code (images inspected as intake does)."""
    from sku_retraining.catalogue.registration import StagedImage, register_batch
    from sku_retraining.config import SplitConfig
    from sku_retraining.image_check import inspect_image
    from sku_retraining.manifest import parse_manifest

    doc = json.loads((batch_dir / "manifest.json").read_text())
    if with_groups:
        doc["images"] = [{"path": rel, "group": grp} for rel, grp in sorted(kept.items())]
    manifest = parse_manifest(doc["batch_id"], json.dumps(doc).encode())
    staged = []
    for rel in sorted(kept):
        data = (batch_dir / "images" / rel).read_bytes()
        facts = inspect_image(data)
        sku = rel.split("/")[0]
        staged.append(StagedImage(f"incoming/{doc['batch_id']}/images/{rel}", sku, facts.sha256, facts.n_bytes,
                                  facts.width, facts.height, phash=facts.phash))
    return register_batch(conn, manifest, staged, split=SplitConfig())


def export(conn, out: Path, new_sku_ids: list[str]) -> dict:
    from sku_retraining.catalogue.export import export_manifests

    out.mkdir(parents=True, exist_ok=True)
    ctx = json.dumps({"batch_ids": [], "new_sku_ids": new_sku_ids, "snapshot_id": out.name}).encode()
    return export_manifests(conn, out, extra_files={"evaluation_context.json": ctx}).counts


def write_rows(path: Path, rows: list[tuple[str, int, str, str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "class_index", "sku_id", "sha256"])
        w.writerows(rows)


def read_rows(path: Path) -> list[tuple[str, int, str, str]]:
    with path.open(newline="") as fh:
        return [(r["path"], int(r["class_index"]), r["sku_id"], r["sha256"]) for r in csv.DictReader(fh)]


# --------------------------------------------------------------------------- jobs


def job_env(job: Path, channels: dict[str, Path], hps: dict, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(
        SAGEMAKER_BASE_DIR=str(job), SM_ML_ROOT=str(job), SM_CHANNELS=json.dumps(sorted(channels)), SM_MODEL_DIR=str(job / "model"),
        SM_OUTPUT_DIR=str(job / "output"), SM_OUTPUT_DATA_DIR=str(job / "output" / "data"),
        SM_CHECKPOINT_DIR=str(job / "checkpoints"), SM_HPS=json.dumps(hps), OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("training_image/code", "plugins")),
    )
    env.update({f"SM_CHANNEL_{k.upper()}": str(v) for k, v in channels.items()})
    return env


def run_job(script: Path, job: Path, channels: dict[str, Path], hps: dict, threads: int) -> tuple[str, float]:
    job.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], env=job_env(job, channels, hps, threads), cwd=REPO,
                          capture_output=True, text=True)
    (job / "stdout.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed ({job}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - started


def train(name: str, work: Path, manifests: Path, images: Path, hps: dict, threads: int,
          model: Path | None = None) -> dict:
    channels = {"manifests": manifests, "images": images} | ({"model": model} if model else {})
    log(f"train {name}: {json.dumps(hps, sort_keys=True)}")
    done = work / name / "bench-run.json"  # --work kept: a finished run with the same inputs is reused
    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(TRAIN_PY.parent.rglob("*.py")))).hexdigest()
    key = {"hps": hps, "channels": {k: str(v) for k, v in channels.items()}, "code": code}
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        out, wall = (work / name / "stdout.log").read_text(), json.loads(done.read_text())["wall"]
        log("  reused from the work folder")
    else:
        out, wall = run_job(TRAIN_PY, work / name, channels, hps, threads)
        done.write_text(json.dumps({"key": key, "wall": wall}))
    metrics = json.loads((work / name / "model" / "metrics.json").read_text())
    policy = next((ln.split("Freeze policy: ", 1)[1] for ln in out.splitlines() if "Freeze policy: " in ln), "?")
    log(f"  done in {wall:.0f} s; {policy}; val top-1 of the kept epoch ({metrics['best']['epoch']}) {metrics['best']['val_top1']:.3f}")
    return {"dir": work / name / "model", "metrics": metrics, "wall": wall, "policy": policy}


# --------------------------------------------------------------------------- evaluation / compute


def predict(model_dir: Path, images: Path, rows, threads: int):
    """Top-1 predictions with the job code's eval loader and model."""
    import torch

    from sku_jobs.data import ManifestDataset, Sample, eval_resize, eval_transform, make_loader
    from sku_jobs.model import load_model_artifact

    torch.set_num_threads(threads)
    model, meta = load_model_artifact(Path(model_dir) / "model.pt")
    size = meta["image_size"]
    ds = ManifestDataset(images, [Sample(*r) for r in rows], eval_transform(size), eval_resize(size))
    preds = []
    with torch.no_grad():
        for batch in make_loader(ds, 64, workers=0):
            preds += model(batch.images).argmax(1).tolist()
    return preds


def top1(rows, preds, keep=lambda r: True) -> float | None:
    pairs = [(r[1], p) for r, p in zip(rows, preds, strict=True) if keep(r)]
    return sum(t == p for t, p in pairs) / len(pairs) if pairs else None


def scores(model_dir: Path, images: Path, rows, n_old: int, threads: int) -> dict:
    preds = predict(model_dir, images, rows, threads)
    return {"top1": top1(rows, preds), "old": top1(rows, preds, lambda r: r[1] < n_old),
            "new": top1(rows, preds, lambda r: r[1] >= n_old)}


def train_flops_per_image(arch: str, num_classes: int, size: int, frozen: tuple[str, ...],
                          teacher_classes: int | None, head_hidden: int = 0) -> float:
    """FLOPs of one training step per image (forward + backward of what trains), + teacher forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sku_jobs.model import build_model

    model = build_model(arch, num_classes, head_hidden, 0.0, frozen).train()
    x = torch.randn(2, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    flops = counter.get_total_flops() / 2
    if teacher_classes:
        teacher = build_model(arch, teacher_classes, head_hidden).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            teacher(x)
        flops += counter.get_total_flops() / 2
    return flops


def compute_of(run: dict, arch: str, size: int, num_classes: int, teacher_classes: int | None) -> float:
    c = run["metrics"]["compute"]
    per = train_flops_per_image(arch, num_classes, size, tuple(c["frozen"]),
                                teacher_classes if c.get("distill_weight") else None,
                                int(run["metrics"].get("head_hidden") or 0))
    return per * c["train_images"]


# --------------------------------------------------------------------------- hand-trained reference


def hand_reference(images: Path, rows, holdout_rows, num_classes: int, args, seed: int = 0, splits=None) -> dict:
    """A plain torchvision training loop, per-image random 80/10/10 split (or ``splits``: (train,
    val, test) rows), same arch/size/epochs/batch/LR."""
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms as T

    torch.manual_seed(seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(seed)
    rows = sorted(rows)
    rng.shuffle(rows)
    n = len(rows)
    train_rows, val_rows, test_rows = splits or (rows[: int(0.8 * n)], rows[int(0.8 * n): int(0.9 * n)],
                                                 rows[int(0.9 * n):])
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(args.image_size, scale=(0.25, 1.0)), T.RandomHorizontalFlip(),
                          T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(round(args.image_size / 0.875)), T.CenterCrop(args.image_size), T.ToTensor(), norm])

    class DS(torch.utils.data.Dataset):
        def __init__(self, items, tf):
            self.items, self.tf = items, tf

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            with Image.open(images / self.items[i][0]) as im:
                im.draft("RGB", (self.tf_size, self.tf_size))
                return self.tf(im.convert("RGB")), self.items[i][1]

        tf_size = round(args.image_size / 0.875)

    model = torchvision.models.resnet18(num_classes=num_classes)
    loader = torch.utils.data.DataLoader(DS(train_rows, train_tf), batch_size=args.batch_size, shuffle=True,
                                         num_workers=1, drop_last=True, persistent_workers=True)
    lr = args.lr * args.batch_size / 256
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=args.epochs * len(loader),
                                                pct_start=1 / args.epochs, anneal_strategy="cos")

    def evaluate(items):
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(DS(items, eval_tf), batch_size=64, num_workers=0):
                correct += (model(x).argmax(1) == y).sum().item()
        return correct / len(items)

    started = time.perf_counter()
    best, best_state = -1.0, None
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(val_rows)
        log(f"  hand reference epoch {epoch + 1}/{args.epochs}: val top-1 {acc:.3f}")
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"test": evaluate(test_rows), "holdout": evaluate(holdout_rows), "wall": time.perf_counter() - started,
            "train_images": len(train_rows) * args.epochs}


# --------------------------------------------------------------------------- main


def prepare(args, work: Path):
    """Steps 1-2: hold out whole scenes, register both months on a private PostgreSQL, export.

    Returns (month-1 manifests, month-2 manifests, the images root, held-out rows, class names,
    the month-1 class count, month-2 test rows, split counts of month 1 and 2).
    """
    import psycopg

    from sku_dev.local_stack import PostgresServer, reachable_data_dir
    from sku_retraining.catalogue.migrations import apply_migrations

    fsx = work / "fsx"
    # 1. scenes and hold-out
    plans = {}
    for batch in BATCHES:
        src = args.data / batch
        (fsx / "incoming" / batch).mkdir(parents=True, exist_ok=True)
        link = fsx / "incoming" / batch / "images"
        if not link.exists():
            link.symlink_to(src / "images", target_is_directory=True)
        kept, held = plan_holdout(src, args.holdout)
        if args.smoke:
            skus = sorted({r.split("/")[0] for r in kept})[:8]
            kept = {r: g for r, g in kept.items() if r.split("/")[0] in skus}
            held = {r: s for r, s in held.items() if s in skus}
        plans[batch] = (kept, held)
        log(f"{batch}: {len(kept)} photos kept in {len(set(kept.values()))} scene labels, "
            f"{len(held)} held out (whole scenes)")

    scratch = work / "pg"
    data_dir = reachable_data_dir(scratch / "pgdata", key=str(scratch))
    server = PostgresServer(data_dir, fsync=False)
    server.start()
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            apply_migrations(conn)
            # 2. month 1: register, export
            r1 = register(conn, args.data / BATCHES[0], plans[BATCHES[0]][0], with_groups=True)
            m1 = work / "manifests-m1"
            counts1 = export(conn, m1, sorted(r1.new_skus))
            log(f"month 1 registered: {r1.n_images} images, {r1.n_groups} groups, splits {counts1}")
            # 2b. month 2
            r2 = register(conn, args.data / BATCHES[1], plans[BATCHES[1]][0], with_groups=True)
            m2 = work / "manifests-m2"
            counts2 = export(conn, m2, sorted(r2.new_skus))
            log(f"month 2 registered: {r2.n_images} images, {r2.n_groups} groups, splits {counts2}")
    finally:
        server.stop()
        if data_dir.parent != scratch:  # a /var/tmp fallback folder of its own
            shutil.rmtree(data_dir.parent, ignore_errors=True)

    classes = json.loads((m2 / "classes.json").read_text())["classes"]
    index = {c: i for i, c in enumerate(classes)}
    n_old = len(json.loads((m1 / "classes.json").read_text())["classes"])
    holdout_rows = [(f"incoming/{b}/images/{rel}", index[sku], sku, "") for b in BATCHES
                    for rel, sku in sorted(plans[b][1].items()) if sku in index]
    test2 = read_rows(m2 / "test.csv")
    return m1, m2, fsx, holdout_rows, classes, n_old, test2, counts1, counts2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of a full (re)train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.2, help="per 256 images, as the DAG's learning_rate")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of each SKU's photos held out")
    parser.add_argument("--budget", type=float, default=0.25, help="warm start: compute budget vs a full retrain")
    parser.add_argument("--recipes", default="all", help="comma-separated recipe numbers (1-based) or 'all'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2,
                        help="seeds of the month-2 full retrain and of the hand reference (means compared)")
    parser.add_argument("--skip-frozen", action="store_true", help="skip the frozen month-1 run")
    parser.add_argument("--skip-hand", action="store_true", help="skip the hand-trained reference")
    parser.add_argument("--smoke", action="store_true", help="a few SKUs only (does it run)")
    parser.add_argument("--work", type=Path, help="keep the work folder here")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="quality-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "args": {k: str(v) for k, v in vars(args).items()}}
    base_hps = {"arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size, "lr": args.lr,
                "workers": 1, "amp": "off", "print_freq": 0, "seed": 0, "keep_checkpoints": 1}

    m1, m2, fsx, holdout_rows, classes, n_old, test2, counts1, counts2 = prepare(args, work)
    E = args.epochs
    runs: dict[str, dict] = {}

    # 3. month 1 (the warm start's parent), nothing frozen (policy) and frozen (old behaviour)
    runs["m1"] = train("m1", work, m1, fsx, base_hps | {"epochs": E}, args.threads)
    if not args.skip_frozen:
        runs["m1-frozen"] = train("m1-frozen", work, m1, fsx,
                                  base_hps | {"epochs": E, "freeze": "conv1,bn1,layer1,layer2,layer3"}, args.threads)
    # month 2 full retrain
    runs["full"] = train("full", work, m2, fsx, base_hps | {"epochs": E, "warm_start": False}, args.threads)
    full_flops = compute_of(runs["full"], args.arch, args.image_size, len(classes), None)
    for seed in range(1, args.seeds):  # the same full retrain from other seeds: run-to-run spread
        runs[f"full-s{seed}"] = train(f"full-s{seed}", work, m2, fsx,
                                      base_hps | {"epochs": E, "warm_start": False, "seed": seed}, args.threads)

    # warm starts within the budget
    chosen = list(RECIPES) if args.recipes == "all" else [list(RECIPES)[int(i) - 1] for i in args.recipes.split(",")]
    train2 = read_rows(m2 / "train.csv")
    for name in chosen:
        hps = base_hps | RECIPES[name]
        # images per epoch after replay, and the per-image cost of this configuration
        from sku_jobs.data import Sample, select_replay
        from sku_jobs.model import resolve_freeze

        picked = select_replay([Sample(*r) for r in train2], n_old, hps.get("replay_fraction", 1.0), 0,
                               balanced=hps.get("replay_balanced", False))
        frozen, _ = resolve_freeze(hps.get("freeze", "auto"), "warm_start")
        per = train_flops_per_image(args.arch, len(classes), args.image_size, frozen,
                                    n_old if hps.get("distill_weight") else None,
                                    int(runs["m1"]["metrics"].get("head_hidden") or 0))
        epochs = max(1, int(args.budget * full_flops / (per * len(picked))))
        runs[name] = train(name.replace(":", "").replace(" ", "_").replace(",", ""), work, m2, fsx,
                           hps | {"epochs": epochs}, args.threads, model=runs["m1"]["dir"])

    # 4. evaluation: the DAG's evaluate.py for the month-2 full retrain (its in-pipeline estimate)
    ev_dir = work / "evaluate-full"
    run_job(EVALUATE_PY, ev_dir, {"challenger": runs["full"]["dir"], "manifests": m2, "images": fsx},
            {"workers": 0}, args.threads)
    evaluation = json.loads(next((ev_dir / "output" / "data").rglob("evaluation.json")).read_text())
    table = []
    for key, run in runs.items():
        month2 = key not in ("m1", "m1-frozen")
        test_rows = test2 if month2 else read_rows(m1 / "test.csv")
        hold = holdout_rows if month2 else [r for r in holdout_rows if r[1] < n_old]
        s_test = scores(run["dir"], fsx, test_rows, n_old, args.threads)
        s_hold = scores(run["dir"], fsx, hold, n_old, args.threads)
        flops = compute_of(run, args.arch, args.image_size, len(classes) if month2 else n_old,
                           n_old if month2 else None)
        table.append({"run": key, "compute": flops / full_flops, "wall": run["wall"], "test": s_test,
                      "holdout": s_hold, "policy": run["policy"], "epochs": run["metrics"]["compute"]["epochs"]})
    hand = None
    if not args.skip_hand:
        all_rows = read_rows(m2 / "train.csv") + read_rows(m2 / "val.csv") + test2
        log("hand-trained reference (plain torchvision loop)")
        hands = [hand_reference(fsx, [(p, c, s, h) for p, c, s, h in all_rows], holdout_rows, len(classes), args,
                                seed=seed) for seed in range(args.seeds)]
        hand = {k: sum(h[k] for h in hands) / len(hands) for k in ("test", "holdout", "wall")} | {"seeds": hands}

    # 5. the table
    def pct(v):
        return "  -  " if v is None else f"{100 * v:5.1f}"

    print()
    print(f"Quality on real photos: {args.arch} @ {args.image_size} px, full = {E} epochs, batch {args.batch_size}, "
          f"lr {args.lr}/256; held out: {len(holdout_rows)} photos (whole scenes); "
          f"month-2 test split: {len(test2)} photos")
    head = (f"{'run':<46} {'compute':>7} {'wall s':>6}   {'test top-1 (in-pipeline)':>24}   "
            f"{'held-out top-1 (other scenes)':>29}")
    print(head)
    print(f"{'':<46} {'':>7} {'':>6}   {'all':>6} {'old':>6} {'new':>6}      {'all':>6} {'old':>6} {'new':>6}  frozen")
    print("-" * (len(head) + 20))
    for row in table:
        t, h = row["test"], row["holdout"]
        label = {"m1": "month 1, nothing frozen (policy: random init)",
                 "m1-frozen": "month 1, conv1-layer3 frozen at random init",
                 "full": "month 2 full retrain"}.get(row["run"], row["run"]).replace(
                     "full-s", "month 2 full retrain, seed ") + f" ({row['epochs']} ep)"
        frozen = "none" if row["policy"].startswith("nothing") else row["policy"].split(" ")[1]
        print(f"{label:<46} {100 * row['compute']:6.1f}% {row['wall']:6.0f}   {pct(t['top1'])} {pct(t['old'])} "
              f"{pct(t['new'])}      {pct(h['top1'])} {pct(h['old'])} {pct(h['new'])}  {frozen}")
    if hand:
        for seed, one in enumerate(hand["seeds"]):
            print(f"{f'hand-trained reference, per-image split, seed {seed}':<46} {'':>7} {one['wall']:6.0f}   "
                  f"{pct(one['test'])} {'':>6} {'':>6}      {pct(one['holdout'])}")
    chal = evaluation.get("challenger", {})
    print(f"evaluate.py on the month-2 full retrain (the DAG's number): top-1 {pct(chal.get('top1'))}, "
          f"old {pct(chal.get('old_sku_top1'))}, new {pct(chal.get('new_sku_top1'))}")
    fulls = [r for r in table if r["run"] == "full" or r["run"].startswith("full-s")]
    full = {"holdout": {k: sum(r["holdout"][k] for r in fulls) / len(fulls) for k in ("top1", "old")}}
    print(f"month-2 full retrain, mean of {len(fulls)} seed(s): held-out top-1 {pct(full['holdout']['top1'])}, "
          f"old {pct(full['holdout']['old'])}" + (f"; hand reference mean {pct(hand['holdout'])}" if hand else ""))
    for row in table:
        if row["run"].startswith("warm"):
            ratio = row["holdout"]["top1"] / full["holdout"]["top1"]
            d_old = row["holdout"]["old"] - full["holdout"]["old"]
            print(f"  {row['run']}: {100 * row['compute']:.0f}% compute, held-out top-1 {100 * ratio:.1f}% of the "
                  f"full retrain's, old-SKU {100 * d_old:+.1f} points"
                  + (f"; {100 * row['holdout']['top1'] / hand['holdout']:.0f}% of the hand reference" if hand else ""))
    if hand:
        print(f"  month-2 full retrain: {100 * full['holdout']['top1'] / hand['holdout']:.0f}% of the hand reference "
              f"(held-out top-1, means over seeds)")
    print(f"total {time.perf_counter() - t_start:.0f} s; 1-min load average {load_start:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at the end (2 cores: above ~2 other work shared the machine); "
          f"work folder {work}")
    results.update(table=table, hand=hand, evaluation_challenger=chal, counts={"m1": counts1, "m2": counts2})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
