"""Evaluate the challenger against the champion on the test split (SageMaker training-container entry point).

Channels: ``challenger`` (the new model: ``model.tar.gz`` or its extracted files), ``champion``
(optional, the production model; absent on the first run), ``manifests`` (``test.csv``,
``classes.json``, ``evaluation_context.json``) and ``images`` (the image root).

Writes ``evaluation.json`` (deterministic) and ``report.html`` with ``plots/`` and ``examples/``
into ``SM_OUTPUT_DATA_DIR`` and prints one ``METRIC evaluation ...`` line
(``sku_contracts.metrics.EVALUATION_METRIC_DEFINITIONS``). One process: CPU or a single GPU.
Options default to the job's hyperparameters; the command line wins. Never imports Airflow.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sku_contracts import metrics as metric_lines
from sku_contracts.files import EVALUATION_CONTEXT_FILE as CONTEXT_FILE  # noqa: E402
from sku_contracts.files import EVALUATION_FILE  # noqa: E402
from sku_jobs.data import (
    InputError,
    ManifestDataset,
    Sample,
    channel_dir,
    eval_resize,
    eval_transform,
    load_classes,
    make_loader,
    read_json_input,
    read_manifest,
)
from sku_jobs.evaluation import (
    TOP_K,
    ModelScores,
    build_evaluation,
    canonical,
    dumps_evaluation,
    example_rows,
    metric_values,
    pair_example_row,
)
from sku_jobs.model import SkuNet, UnsafeArchiveError, extract_model_archive, load_model_artifact
from sku_jobs.report import EXAMPLES_DIR, PLOTS_DIR, Example, write_report
from sku_jobs.sm_env import JobEnv, run_job


def log(msg: str) -> None:
    print(msg, flush=True)  # flushed: the Airflow task log is read live


# --------------------------------------------------------------------------- arguments


def optional_int(value: object) -> int | None:
    if value is None or str(value).strip().lower() in {"", "none", "auto"}:
        return None
    return int(value)


OPTIONS: list[tuple[str, object, object, str]] = [
    ("batch-size", int, 64, "images per inference batch"),
    ("workers", optional_int, None, "data-loader workers (default: min(4, CPUs - 1))"),
    ("worst-skus", int, 20, "how many lowest-accuracy SKUs evaluation.json and the report list"),
    ("confused-pairs", int, 20, "how many most frequent (true, predicted) confusions to list"),
    ("examples-per-sku", int, 3, "example test images per worst SKU in the report"),
    # The export writes evaluation_context.json before its content address is known, so the
    # operator may pass the snapshot id this way; the context file's own value wins.
    ("snapshot-id", str, None, "dataset snapshot id, when evaluation_context.json has none"),
]


def parse_args(argv: list[str] | None, env: JobEnv) -> argparse.Namespace:
    """Command line > hyperparameters (hyphens or underscores) > defaults."""
    hps = env.hyperparameters
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known: set[str] = set()
    for name, typ, default, help_text in OPTIONS:
        dest = name.replace("-", "_")
        known.update({name, dest})
        for key in (dest, name):
            if key in hps:
                try:
                    default = typ(hps[key])
                except (TypeError, ValueError) as exc:
                    raise InputError(f"hyperparameter {key}={hps[key]!r}: {exc}") from exc
                break
        flags = [f"--{name}"] + ([f"--{dest}"] if dest != name else [])
        parser.add_argument(*flags, dest=dest, type=typ, default=default, help=help_text)
    args, unknown = parser.parse_known_args(argv)
    for key in sorted(hps):
        if key not in known and not key.startswith("sagemaker_"):
            log(f"WARNING: ignoring unknown hyperparameter {key!r}")
    if unknown:
        log(f"WARNING: ignoring unknown arguments {unknown}")
    if args.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    for name in ("worst_skus", "confused_pairs", "examples_per_sku"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0")
    if args.workers is not None and args.workers < 0:
        raise InputError("--workers must be >= 0")
    return args


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus - 1))


# --------------------------------------------------------------------------- inputs


def locate_model(channel: str, path: Path, workdir: Path) -> Path:
    """``model.pt`` of a channel holding it, or holding the ``model.tar.gz`` SageMaker downloads."""
    if path.is_file():  # SM_CHANNEL_<NAME> pointing straight at the file
        if path.name.endswith((".tar.gz", ".tgz")):
            archive = path
        else:
            return path
    elif (path / "model.pt").is_file():
        return path / "model.pt"
    else:
        archive = path / "model.tar.gz"
    if archive.is_file():
        out = workdir / channel
        try:
            extract_model_archive(archive, out)
        except (UnsafeArchiveError, tarfile.TarError) as exc:
            raise InputError(f"input channel {channel!r}: cannot extract {archive}: {exc}") from None
        if (out / "model.pt").is_file():
            return out / "model.pt"
    raise InputError(f"input channel {channel!r} ({path}) has no model.pt (nor a model.tar.gz holding one)")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A model in eval mode plus what the document says about it."""

    name: str
    model: SkuNet
    classes: list[str]
    image_size: int
    info: dict

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


def load(channel: str, path: Path, workdir: Path) -> LoadedModel:
    model_file = locate_model(channel, path, workdir)
    try:
        model, meta = load_model_artifact(model_file)
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        raise InputError(f"input channel {channel!r}: cannot load {model_file}: {exc}") from exc
    info = {"arch": meta["arch"], "image_size": int(meta["image_size"]), "sha256": sha256_file(model_file)}
    return LoadedModel(channel, model, [str(c) for c in meta["classes"]], int(meta["image_size"]), info)


def read_context(path: Path) -> tuple[list[str], str | None]:
    """(new_sku_ids, snapshot_id) from ``evaluation_context.json``."""
    doc = read_json_input(path)
    new_ids = doc.get("new_sku_ids") if isinstance(doc, dict) else None
    if not isinstance(new_ids, list) or not all(isinstance(s, str) for s in new_ids):
        raise InputError(f'{path}: expected {{"new_sku_ids": [sku ids], "snapshot_id": "..."}}')
    snapshot = doc.get("snapshot_id")
    return new_ids, None if snapshot is None else str(snapshot)


def read_test_manifest(path: Path, classes: list[str]) -> list[Sample]:
    samples = read_manifest(path, len(classes))  # checks the header and every class index
    if not samples:
        raise InputError(f"{path} has no rows: empty test set, nothing to evaluate")
    for lineno, s in enumerate(samples, start=2):
        if s.sku_id and s.sku_id != classes[s.class_index]:
            raise InputError(
                f"{path}:{lineno}: sku_id {s.sku_id!r} but class_index {s.class_index} is "
                f"{classes[s.class_index]!r} in classes.json"
            )
    return samples


def check_models(classes: list[str], challenger: LoadedModel, champion: LoadedModel | None) -> None:
    """Class indices are stable: the challenger has exactly classes.json, the champion a prefix of it."""
    if challenger.num_classes != len(classes):
        raise InputError(
            f"challenger model has {challenger.num_classes} classes but classes.json has {len(classes)} "
            "(num_classes mismatch: was it trained on this snapshot?)"
        )
    for i, (a, b) in enumerate(zip(challenger.classes, classes, strict=True)):
        if a != b:
            raise InputError(f"class index {i} is {a!r} in the challenger model but {b!r} in classes.json")
    if champion is None:
        return
    if champion.num_classes > challenger.num_classes:
        raise InputError(
            f"champion model has {champion.num_classes} classes, more than the challenger's "
            f"{challenger.num_classes}: class indices are stable and never removed, so the challenger "
            "must know every class the champion knows (num_classes mismatch)"
        )
    for i, (a, b) in enumerate(zip(champion.classes, classes, strict=False)):
        if a != b:
            raise InputError(f"class index {i} is {a!r} in the champion model but {b!r} in classes.json")


# --------------------------------------------------------------------------- inference


class IndexedDataset(Dataset):
    """``ManifestDataset`` items with the row number as target, so predictions map back to rows."""

    def __init__(self, base: ManifestDataset, rows: np.ndarray) -> None:
        self.base = base
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        x, y = self.base[row]
        return (x, row) if x is not None else (None, y)


@dataclass
class Scoring:
    """One model's outputs being filled in, row by row."""

    model: LoadedModel
    rows: np.ndarray  # bool (N,): rows this model must score
    topk: np.ndarray
    confidence: np.ndarray
    scored: np.ndarray

    @classmethod
    def new(cls, model: LoadedModel, rows: np.ndarray) -> Scoring:
        n = len(rows)
        k = min(TOP_K, model.num_classes)
        return cls(model, rows, np.full((n, k), -1, dtype=np.int64), np.zeros(n), np.zeros(n, dtype=bool))


@torch.inference_mode()
def score(
    scorings: list[Scoring], samples: list[Sample], images: Path, args: argparse.Namespace, workers: int,
    device: torch.device,
) -> list[str]:
    """Run the models (same image size) over the union of their rows; returns undecodable paths."""
    size = scorings[0].model.image_size
    wanted = np.logical_or.reduce([s.rows for s in scorings])
    rows = np.flatnonzero(wanted)
    base = ManifestDataset(images, samples, eval_transform(size), eval_resize(size))
    loader = make_loader(IndexedDataset(base, rows), args.batch_size, workers=workers,
                         pin_memory=device.type == "cuda")
    names = " + ".join(s.model.name for s in scorings)
    log(f"Scoring {len(rows)} test images with {names} at {size} px on {device} ({workers} workers)")
    for s in scorings:
        s.model.model.to(device).eval()
    failed: list[str] = []
    done, start, next_report = 0, time.perf_counter(), 0.1
    for batch in loader:
        for path in batch.failed:
            log(f"WARNING: skipping undecodable test image {path}")
        failed.extend(batch.failed)
        done += len(batch) + len(batch.failed)
        if len(batch):
            x = batch.images.to(device, non_blocking=True)
            idx = batch.targets.numpy()
            for s in scorings:
                sel = s.rows[idx]
                if not sel.any():
                    continue
                inputs = x if sel.all() else x[torch.from_numpy(sel).to(device)]
                logits = s.model.model(inputs).float()
                k = s.topk.shape[1]
                top = logits.topk(k, dim=1).indices.cpu().numpy()
                conf = torch.softmax(logits, dim=1).amax(dim=1).cpu().numpy()
                where = idx[sel]
                s.topk[where] = top
                s.confidence[where] = conf
                s.scored[where] = True
        if done >= next_report * len(rows):  # about every 10 %: the task log shows progress
            rate = done / max(time.perf_counter() - start, 1e-9)
            log(f"  {done}/{len(rows)} images ({rate:.1f} images/s)")
            next_report = math.floor(10 * done / len(rows)) / 10 + 0.1
    return failed


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        log("evaluate.py runs as one process; this extra rank has nothing to do")
        return
    env = JobEnv.from_environment()
    args = parse_args(argv, env)
    manifests = channel_dir(env, "manifests", required=True)
    images = channel_dir(env, "images", required=True)
    challenger_dir = channel_dir(env, "challenger", required=True)
    champion_dir = channel_dir(env, "champion", required=False)
    classes = load_classes(manifests / "classes.json")
    test_csv = manifests / "test.csv"
    samples = read_test_manifest(test_csv, classes)
    new_ids, snapshot_id = read_context(manifests / CONTEXT_FILE)
    snapshot_id = snapshot_id or args.snapshot_id or None
    unknown_new = sorted(set(new_ids) - set(classes))
    if unknown_new:
        log(f"WARNING: {len(unknown_new)} new SKU(s) are not in classes.json, e.g. {unknown_new[:5]}")

    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        challenger = load("challenger", challenger_dir, Path(tmp))
        champion = load("champion", champion_dir, Path(tmp)) if champion_dir else None
    check_models(classes, challenger, champion)
    for m in (challenger, champion):
        if m is not None:
            log(f"{m.name}: {m.info['arch']} {m.image_size} px, {m.num_classes} classes, sha256 {m.info['sha256'][:12]}")
    if champion is None:
        log("No champion channel: the challenger is evaluated alone (first model)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # Same models + same images → same evaluation.json: no autotuned, non-deterministic kernels.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    workers = args.workers if args.workers is not None else default_workers()
    targets = np.array([s.class_index for s in samples], dtype=np.int64)
    n = len(samples)
    chal = Scoring.new(challenger, np.ones(n, dtype=bool))
    champ = Scoring.new(champion, targets < champion.num_classes) if champion else None
    # One decode pass serves both models when they read the same image size.
    if champ is None:
        passes = [[chal]]
    elif champion.image_size == challenger.image_size:
        passes = [[chal, champ]]
    else:
        passes = [[chal], [champ]]
    failed: set[str] = set()
    for group in passes:
        failed.update(score(group, samples, images, args, workers, device))
    decoded = chal.scored.copy()
    if champ is not None:
        # An image only one pass could read (a flaky file system) is left out for both models,
        # so both are compared on exactly the same images.
        decoded &= champ.scored | ~champ.rows
    if not decoded.any():
        raise InputError(f"none of the {n} test images could be decoded (images channel {images})")

    def scores(s: Scoring) -> ModelScores:
        return ModelScores(s.model.num_classes, s.topk, s.confidence, s.model.info)

    doc = build_evaluation(
        targets=targets, decoded=decoded, classes=classes, challenger=scores(chal),
        champion=scores(champ) if champ else None, new_sku_ids=new_ids,
        test_manifest_sha256=sha256_file(test_csv), snapshot_id=snapshot_id,
        worst_n=args.worst_skus, pairs_n=args.confused_pairs,
    )
    out = env.output_data_dir
    out.mkdir(parents=True, exist_ok=True)
    text = dumps_evaluation(doc)
    tmp_file = out / f"{EVALUATION_FILE}.tmp.{os.getpid()}"
    tmp_file.write_text(text)
    os.replace(tmp_file, out / EVALUATION_FILE)
    rounded = canonical(doc)

    # Report: thumbnails of the worst SKUs' test images (misclassified first) and of each confusion.
    for sub in (PLOTS_DIR, EXAMPLES_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)  # a rerun into the same folder leaves no stale files
    index = {c: i for i, c in enumerate(classes)}

    def example(row: int) -> Example:
        return Example(images / samples[row].path, classes[targets[row]], classes[chal.topk[row, 0]],
                       float(chal.confidence[row]))

    worst_examples = {
        w["sku_id"]: [example(r) for r in example_rows(targets, chal.topk[:, 0], decoded, index[w["sku_id"]],
                                                       args.examples_per_sku)]
        for w in rounded["challenger"]["worst_skus"]
    }
    pair_examples = {}
    for p in rounded["challenger"]["confused_pairs"]:
        row = pair_example_row(targets, chal.topk[:, 0], decoded, index[p["true"]], index[p["predicted"]])
        if row is not None:
            pair_examples[(p["true"], p["predicted"])] = example(row)
    report = write_report(out, rounded, worst_examples=worst_examples, pair_examples=pair_examples,
                          skipped_paths=sorted(os.path.relpath(p, images) for p in failed))

    summarise(rounded)
    log(metric_lines.format_evaluation_line(metric_values(doc)))
    log(f"Wrote {out / EVALUATION_FILE} and {report}")


def summarise(doc: dict) -> None:
    """A few human-readable lines for the task log."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    chal, champ, comp = doc["challenger"], doc["champion"], doc["comparison"]
    log(f"Evaluation: {doc['num_test_images']} test images, {doc['num_classes']} SKUs "
        f"({len(doc['new_sku_ids'])} new), snapshot {doc['snapshot_id'] or 'n/a'}, "
        f"{chal['num_skipped']} unreadable")
    log(f"  challenger: top-1 {pct(chal['top1'])}  top-{chal['top5_k']} {pct(chal['top5'])}  "
        f"macro {pct(chal['macro_accuracy'])}  new-SKU top-1 {pct(chal['new_sku_top1'])}  "
        f"old-SKU top-1 {pct(chal['old_sku_top1'])}  ({chal['num_images']} images)")
    if champ:
        log(f"  champion:   top-1 {pct(champ['top1'])}  old-SKU top-1 {pct(champ['old_sku_top1'])}  "
            f"({champ['num_images']} images of its {champ['num_classes']} SKUs)")
        delta = comp["old_sku_top1_delta"]
        log(f"  old-SKU top-1 change: {'n/a' if delta is None else f'{100 * delta:+.2f} pp'}")
    if chal["worst_skus"]:
        worst = ", ".join(f"{w['sku_id']} {pct(w['accuracy'])}" for w in chal["worst_skus"][:5])
        log(f"  worst SKUs: {worst}")


if __name__ == "__main__":
    sys.exit(run_job(main))
