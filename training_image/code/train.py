"""Train the SKU classifier (SageMaker training-container entry point).

Follows torchvision's ``references/classification/train.py``: argparse, ``train_one_epoch``,
``evaluate``, checkpoints written by rank 0 and picked up again with ``--resume``.

Runs as one process, under ``torchrun`` (gloo on CPU, NCCL on GPU) or under SageMaker's
mpirun with SMDDP. Options default to the job's hyperparameters (``SM_HPS`` /
``hyperparameters.json``), so ``epochs=3`` as a hyperparameter and ``--epochs 3`` on the
command line both work; the command line wins. Never imports Airflow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from sku_contracts import metrics as metric_lines
from sku_jobs.data import (
    InputError,
    ManifestDataset,
    Sample,
    ShardSampler,
    channel_dir,
    eval_resize,
    eval_transform,
    load_classes,
    make_loader,
    read_manifest,
    select_replay,
    train_transform,
)
from sku_jobs.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    sync_buffers,
    teardown,
    world_from_env,
)
from sku_jobs.model import (
    ARCHS,
    DEFAULT_FREEZE,
    INIT_IMAGENET,
    INIT_RANDOM,
    INIT_WARM_START,
    SkuNet,
    UnsafeArchiveError,
    atomic_torch_save,
    build_model,
    cosine_warmup_lambda,
    count_parameters,
    extract_model_archive,
    freeze_backbone,
    load_backbone_weights,
    model_from_artifact,
    parse_freeze,
    read_artifact,
    resolve_freeze,
    save_model_artifact,
    widen_head,
)
from sku_jobs.sm_env import JobEnv, run_job

CHECKPOINT_RE = re.compile(r"^checkpoint-epoch(\d{4,})\.pt$")
BEST_MODEL_NAME = "best-model.pt"
REFERENCE_BATCH = 256  # --lr is given for this global batch and scaled linearly
SELECT_EPOCH = ("last", "best-val")  # --select-epoch choices
IMPRINT_MAX_PER_CLASS = 64  # images per new class used to initialise its head row
IMPRINT_REFERENCE_IMAGES = 2048  # old-class images for the reference (mean) embedding

_RANK = 0


def log(msg: str, all_ranks: bool = False) -> None:
    """Print from rank 0 (or every rank, prefixed), flushed: the task log is read live."""
    if _RANK == 0 and not all_ranks:
        print(msg, flush=True)
    elif all_ranks:
        print(f"[rank {_RANK}] {msg}", flush=True)


# --------------------------------------------------------------------------- arguments


def str2bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "y", "on"}:
        return True
    if text in {"0", "false", "no", "n", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def amp_mode(value: object) -> str:
    if isinstance(value, bool):
        return "auto" if value else "off"
    text = str(value).strip().lower()
    aliases = {"true": "auto", "1": "auto", "on": "auto", "false": "off", "0": "off", "none": "off",
               "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    text = aliases.get(text, text)
    if text not in {"auto", "bf16", "fp16", "off"}:
        raise argparse.ArgumentTypeError(f"--amp must be auto, bf16, fp16 or off, got {value!r}")
    return text


def optional_int(value: object) -> int | None:
    if value is None or str(value).strip().lower() in {"", "none", "auto"}:
        return None
    return int(value)


def optional_str(value: object) -> str | None:
    if value is None or str(value).strip().lower() in {"", "none"}:
        return None
    return str(value)


def _options(env: JobEnv) -> list[tuple[str, object, object, str]]:
    """(name, type, default, help) for every option; names use hyphens."""
    return [
        ("arch", str, "resnet152", f"backbone, one of {', '.join(ARCHS)}"),
        ("image-size", int, 224, "training / eval crop size in pixels"),
        ("epochs", int, 10, "number of epochs"),
        ("batch-size", int, 64, "images per process (GPU) and step"),
        ("lr", float, 0.1, f"base learning rate for a global batch of {REFERENCE_BATCH} (scaled linearly)"),
        ("momentum", float, 0.9, "SGD momentum"),
        ("weight-decay", float, 1e-4, "weight decay (not applied to biases and norm layers)"),
        ("label-smoothing", float, 0.1, "cross-entropy label smoothing"),
        ("warmup-epochs", float, 1.0, "linear LR warmup epochs, then cosine decay"),
        ("color-jitter", float, 0.0,
         "colour jitter strength of brightness/contrast/saturation (hue: a tenth of it); 0 = off"),
        ("workers", optional_int, None, "data-loader workers per process (default: CPUs per process - 1, max 12)"),
        ("amp", amp_mode, "auto", "auto (bf16 if supported else fp16 + GradScaler; off on CPU), bf16, fp16, off"),
        ("channels-last", str2bool, True, "channels_last memory format on GPU"),
        ("head-hidden", optional_int, None,
         "hidden width of a bottleneck head (Linear-ReLU-Dropout-Linear); 0 = one Linear classifier on the "
         "backbone's features; default: the warm-start model's, else 0"),
        ("dropout", float, 0.0, "dropout before the classifier"),
        ("freeze", str, "auto",
         f"backbone modules to freeze: auto ({','.join(DEFAULT_FREEZE)} when ImageNet weights or a warm-start "
         "model are loaded, nothing at random init), none, or a comma-separated list (obeyed as given)"),
        ("warm-start", str2bool, True, "start from the production model in the 'model' channel if present"),
        ("replay-fraction", float, 1.0, "with warm start: fraction of old SKUs' train images to replay (1 = all)"),
        ("replay-balanced", str2bool, False,
         "with warm start: spend the replay budget as an equal quota per old SKU (else per-SKU fraction)"),
        ("backbone-lr-mult", float, 1.0, "learning rate of the backbone relative to the head's (e.g. 0.1)"),
        ("distill-weight", float, 0.0,
         "with warm start: weight of the distillation loss from the warm-start model on old-SKU logits (0 = off)"),
        ("distill-temperature", float, 2.0, "softmax temperature of the distillation loss"),
        ("select-epoch", str, "last",
         "the epoch whose weights the job outputs: last (the end of the cosine schedule) or best-val (the "
         "highest val top-1; on a small val split that choice is noisy and flatters the model)"),
        ("checkpoint-dir", str, str(env.checkpoint_dir), "where rank 0 writes per-epoch checkpoints"),
        ("resume", str, "auto", "auto (latest checkpoint in --checkpoint-dir), none, or a checkpoint path"),
        ("keep-checkpoints", int, 2, "epoch checkpoints to keep"),
        ("seed", int, 0, "random seed"),
        ("max-steps-per-epoch", optional_int, None, "cap on optimizer steps per epoch (smoke tests)"),
        ("pretrained-weights", optional_str, None, "ImageNet state_dict file for the backbone (else 'weights' channel)"),
        ("print-freq", int, 50, "log every N steps"),
    ]


def parse_args(argv: list[str] | None, env: JobEnv) -> argparse.Namespace:
    """Command line > hyperparameters > built-in defaults; unknown names only warn."""
    hps = env.hyperparameters
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known: set[str] = set()
    for name, typ, default, help_text in _options(env):
        dest = name.replace("-", "_")
        known.update({name, dest})
        for key in (dest, name):
            if key in hps:
                try:
                    default = typ(hps[key])
                except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                    raise InputError(f"hyperparameter {key}={hps[key]!r}: {exc}") from exc
                break
        flags = [f"--{name}"] + ([f"--{dest}"] if dest != name else [])
        kwargs: dict = {"dest": dest, "type": typ, "default": default, "help": help_text}
        if typ is str2bool:
            kwargs.update(nargs="?", const=True)  # "--warm-start" alone means true
        parser.add_argument(*flags, **kwargs)
    args, unknown = parser.parse_known_args(argv)
    for key in sorted(hps):
        if key not in known and not key.startswith("sagemaker_"):
            log(f"WARNING: ignoring unknown hyperparameter {key!r}")
    if unknown:
        log(f"WARNING: ignoring unknown arguments {unknown}")

    if args.arch not in ARCHS:
        raise InputError(f"--arch {args.arch!r} not supported; use one of {', '.join(ARCHS)}")
    for name in ("epochs", "batch_size", "keep_checkpoints"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if args.head_hidden is not None and args.head_hidden < 0:
        raise InputError("--head-hidden must be >= 0 (0: a single classifier on the backbone's features)")
    if not 0.0 <= args.dropout < 1.0:
        raise InputError("--dropout must be within [0, 1)")
    if not 0.0 <= args.color_jitter <= 1.0:
        raise InputError("--color-jitter must be within [0, 1]")
    if args.image_size < 32:
        raise InputError("--image-size must be >= 32")
    if not 0.0 <= args.replay_fraction <= 1.0:
        raise InputError("--replay-fraction must be within [0, 1]")
    if not 0.0 < args.backbone_lr_mult <= 10.0:
        raise InputError("--backbone-lr-mult must be within (0, 10]")
    if args.distill_weight < 0 or args.distill_temperature <= 0:
        raise InputError("--distill-weight must be >= 0 and --distill-temperature > 0")
    if args.lr <= 0:
        raise InputError("--lr must be > 0")
    args.select_epoch = args.select_epoch.strip().lower().replace("_", "-")
    if args.select_epoch not in SELECT_EPOCH:
        raise InputError(f"--select-epoch must be one of {', '.join(SELECT_EPOCH)}, got {args.select_epoch!r}")
    args.freeze = "auto" if args.freeze.strip().lower() == "auto" else ",".join(parse_freeze(args.freeze))
    return args


# --------------------------------------------------------------------------- inputs


def _unpack_model_channel(path: Path) -> Path:
    """The ``model`` channel is the extracted model.tar.gz; accept the archive too."""
    if (path / "model.pt").is_file():
        return path / "model.pt"
    archive = path / "model.tar.gz"
    if archive.is_file():
        out = Path(tempfile.mkdtemp(prefix="warm-start-"))
        try:
            extract_model_archive(archive, out)
        except UnsafeArchiveError as exc:
            raise InputError(str(exc)) from None
        if (out / "model.pt").is_file():
            return out / "model.pt"
    raise InputError(f"input channel 'model' ({path}) has no model.pt (nor a model.tar.gz holding one)")


def _weights_file(args: argparse.Namespace, env: JobEnv) -> Path | None:
    if args.pretrained_weights:
        path = Path(args.pretrained_weights)
        if not path.is_file():
            raise InputError(f"--pretrained-weights {path} does not exist (weights are never downloaded)")
        return path
    channel = channel_dir(env, "weights", required=False)
    if channel is None:
        return None
    if channel.is_file():
        return channel
    files = sorted(p for p in channel.iterdir() if p.suffix in {".pt", ".pth"})
    if len(files) != 1:
        raise InputError(f"input channel 'weights' ({channel}) must hold exactly one .pt/.pth file, found {len(files)}")
    return files[0]


def _read_warm_model(path: Path) -> dict:
    """The warm-start ``model.pt``; an unreadable one is an input error, not a crash."""
    try:
        return read_artifact(path)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise InputError(f"warm-start model {path} cannot be read: {exc}") from exc


class Inputs:
    """Everything the job reads, checked before any process group exists (fast, clear failures)."""

    def __init__(self, args: argparse.Namespace, env: JobEnv) -> None:
        manifests = channel_dir(env, "manifests", required=True)
        self.images = channel_dir(env, "images", required=True)
        self.classes_file = manifests / "classes.json"
        self.classes = load_classes(self.classes_file)
        n = len(self.classes)
        self.train = read_manifest(manifests / "train.csv", n)
        self.val = read_manifest(manifests / "val.csv", n)
        test_csv = manifests / "test.csv"
        self.test = read_manifest(test_csv, n) if test_csv.is_file() else []
        if not self.train:
            raise InputError(f"{manifests / 'train.csv'} has no rows: empty train set, nothing to train on")
        if not self.val:  # a small catalogue may have no val group yet (val groups are drawn by fraction)
            log(f"WARNING: {manifests / 'val.csv'} has no rows: no validation metrics"
                + ("; --select-epoch best-val cannot select, the last epoch is kept"
                   if args.select_epoch == "best-val" else ""))
        model_channel = channel_dir(env, "model", required=False) if args.warm_start else None
        self.warm_model = _unpack_model_channel(model_channel) if model_channel else None
        self.weights = None if self.warm_model else _weights_file(args, env)
        self.backbone_init = (
            INIT_WARM_START if self.warm_model else INIT_IMAGENET if self.weights is not None else INIT_RANDOM
        )
        # Read once here (input errors before any process group); _warm_start takes it over.
        self.warm_artifact = _read_warm_model(self.warm_model) if self.warm_model else None
        if args.head_hidden is None:  # a warm start keeps the champion's head shape
            args.head_hidden = int(self.warm_artifact["head_hidden"]) if self.warm_artifact else 0
        digest = hashlib.sha256()
        for name in ("classes.json", "train.csv", "val.csv"):
            digest.update((manifests / name).read_bytes())
        for key in ("arch", "image_size", "head_hidden", "replay_fraction", "freeze", "epochs",
                    "replay_balanced", "backbone_lr_mult", "distill_weight", "distill_temperature", "select_epoch"):
            digest.update(f"{key}={getattr(args, key)};".encode())
        digest.update(f"warm={self.warm_model is not None}".encode())
        self.fingerprint = digest.hexdigest()[:16]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- checkpoints


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of ``checkpoint-epoch<NNNN>.pt`` files, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_checkpoint(path: Path) -> dict:
    # weights_only=True: the checkpoint holds plain types and tensors only (and may come from S3).
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resume_state(args: argparse.Namespace, inputs: Inputs) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from, newest readable first; None for a fresh start."""
    mode = (args.resume or "auto").strip()
    if mode.lower() in {"none", "false", "off", "no", "0"}:
        return None, None
    if mode.lower() not in {"auto", "true", "latest"}:
        path = Path(mode)
        if not path.is_file():
            raise InputError(f"--resume {path}: no such checkpoint")
        return path, load_checkpoint(path)
    for _epoch, path in reversed(list_checkpoints(Path(args.checkpoint_dir))):
        try:
            state = load_checkpoint(path)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            log(f"WARNING: unreadable checkpoint {path} ({exc}); trying an older one")
            continue
        if state.get("fingerprint") != inputs.fingerprint:
            raise InputError(
                f"{path} was written for different inputs or options (fingerprint {state.get('fingerprint')} "
                f"!= {inputs.fingerprint}); give this job its own checkpoint dir or pass --resume none"
            )
        return path, state
    return None, None


def clear_checkpoints(directory: Path) -> None:
    """Fresh start: old epoch checkpoints would otherwise look like the latest ones."""
    for _epoch, path in list_checkpoints(directory):
        path.unlink(missing_ok=True)
    (directory / BEST_MODEL_NAME).unlink(missing_ok=True)


def prune_checkpoints(directory: Path, keep: int) -> None:
    for _epoch, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- train / eval


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _report_bad(paths: list[str], seen: set[str]) -> None:
    for p in paths:
        if p not in seen:
            seen.add(p)
            log(f"WARNING: skipping undecodable image {p}", all_ranks=True)


def _progress_line(progress: dict | None, epoch: int, epochs: int, step: int, steps: int, rate: float,
                   loss: float) -> str:
    """The ``PROGRESS`` line (format: ``sku_contracts.metrics``); ETA over all remaining epochs."""
    progress = progress or {}
    best = progress.get("best") or {}
    eta = metric_lines.eta_seconds(elapsed=time.perf_counter() - progress.get("start", time.perf_counter()),
                                   done_steps=progress.get("done_steps", 0),
                                   total_steps=progress.get("total_steps", 0))
    return metric_lines.format_progress_line(
        epoch=epoch, epochs=epochs, step=step, steps=steps, images_per_sec=rate, loss=loss, eta_seconds=eta,
        best_val_top1=best.get("val_top1"), best_epoch=best.get("epoch"))


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loader,
    info: DistInfo,
    epoch: int,
    args: argparse.Namespace,
    amp_dtype: torch.dtype | None,
    bad_paths: set[str],
    progress: dict | None = None,
) -> dict[str, float]:
    """One pass over the (sharded) train set; returns global loss and throughput.

    ``progress`` (``start``, ``done_steps``, ``total_steps``, ``best``): the job's progress so far,
    for the ``PROGRESS`` line a person reads (epoch k/N, img/s, ETA, best val top-1); updated here.
    """
    model.train()
    device = info.device
    channels_last = device.type == "cuda" and args.channels_last
    steps = len(loader) if not args.max_steps_per_epoch else min(len(loader), args.max_steps_per_epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        _report_bad(batch.failed, bad_paths)
        images, targets = batch.images, batch.targets
        empty = len(batch) == 0
        if empty:
            # Every file of this batch failed to decode. Take a zero-weighted step anyway so
            # this rank still joins DDP's gradient all-reduce and the ranks stay in lockstep.
            images = torch.zeros(1, 3, args.image_size, args.image_size)
            targets = torch.zeros(1, dtype=torch.long)
        images = _to_device(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        with torch.amp.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
            loss = (criterion(output, targets, images) if getattr(criterion, "needs_inputs", False)
                    else criterion(output, targets))
        if empty:
            loss = loss * 0.0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if not empty:
            loss_sum += loss.detach().double() * len(targets)
            seen += len(targets)
        if progress is not None:
            progress["done_steps"] += 1
        if args.print_freq and (step % args.print_freq == 0 or step + 1 == steps):
            # Throughput of this rank times the ranks (shards are equal): the job's img/s.
            rate = seen * info.world_size / max(time.perf_counter() - start, 1e-9)
            log(_progress_line(progress, epoch, args.epochs, step + 1, steps, rate, loss.item()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    totals = all_reduce_sum(torch.stack([loss_sum.cpu(), torch.tensor(float(seen), dtype=torch.float64)]), info)
    images_total = float(totals[1])
    return {
        "loss": float(totals[0]) / max(1.0, images_total),
        "images": images_total,
        "seconds": seconds,
        "images_per_sec": images_total / max(seconds, 1e-9),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    info: DistInfo,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    bad_paths: set[str],
) -> dict[str, float]:
    """Loss / top-1 / top-5 over the whole split (each rank a disjoint shard, sums all-reduced).

    Runs the unwrapped module: no DDP collectives per batch, so unequal shards are fine.
    """
    model.eval()
    device = info.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for batch in loader:
        _report_bad(batch.failed, bad_paths)
        if len(batch) == 0:
            continue
        images = _to_device(batch.images, device, channels_last)
        targets = batch.targets.to(device, non_blocking=True)
        with torch.amp.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        output = output.float()
        k = min(5, output.shape[1])
        correct = output.topk(k, dim=1).indices.eq(targets[:, None])
        sums[0] += F.cross_entropy(output, targets, reduction="sum").double()
        sums[1] += correct[:, 0].sum()
        sums[2] += correct.any(dim=1).sum()
        sums[3] += len(targets)
    sums = all_reduce_sum(sums.cpu(), info)
    n = max(1.0, float(sums[3]))
    return {"loss": float(sums[0]) / n, "top1": float(sums[1]) / n, "top5": float(sums[2]) / n,
            "count": float(sums[3])}


@torch.no_grad()
def class_mean_embeddings(
    model: SkuNet,
    images_root: Path,
    samples: list[Sample],
    class_ids: list[int],
    args: argparse.Namespace,
    info: DistInfo,
    workers: int,
    amp_dtype: torch.dtype | None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Mean penultimate embedding of each new class's train images, and of old-class images.

    At most ``IMPRINT_MAX_PER_CLASS`` images per new class and ``IMPRINT_REFERENCE_IMAGES``
    old-class images (a deterministic hash-ordered sample) are embedded, with eval transforms.
    """
    rows = {c: i for i, c in enumerate(class_ids)}
    ref_row = len(class_ids)
    picked: dict[int, list[Sample]] = {}
    for s in samples:
        if s.class_index in rows and len(picked.setdefault(s.class_index, [])) < IMPRINT_MAX_PER_CLASS:
            picked[s.class_index].append(s)
    old = [s for s in samples if s.class_index not in rows]
    old = sorted(old, key=lambda s: hashlib.sha256(f"{args.seed}:{s.sha256 or s.path}".encode()).digest())
    subset = [s for items in picked.values() for s in items] + old[:IMPRINT_REFERENCE_IMAGES]
    dataset = ManifestDataset(images_root, subset, eval_transform(args.image_size), eval_resize(args.image_size))
    loader = make_loader(dataset, args.batch_size, sampler=ShardSampler(len(dataset), info.rank, info.world_size),
                         workers=workers, pin_memory=info.device.type == "cuda")
    hidden = model.classifier.in_features
    sums = torch.zeros(len(class_ids) + 1, hidden + 1, dtype=torch.float64)  # last column: count
    model.eval()
    for batch in loader:
        if len(batch) == 0:
            continue
        with torch.amp.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            emb = model.embed(batch.images.to(info.device, non_blocking=True))
        idx = torch.tensor([rows.get(int(t), ref_row) for t in batch.targets])
        vals = torch.cat([emb.double().cpu(), torch.ones(len(idx), 1, dtype=torch.float64)], dim=1)
        sums.index_add_(0, idx, vals)
    sums = all_reduce_sum(sums, info)
    means = {i: (sums[i, :hidden] / sums[i, hidden]).float() for i in range(ref_row + 1) if sums[i, hidden] > 0}
    return {c: means[i] for c, i in rows.items() if i in means}, means.get(ref_row)


# --------------------------------------------------------------------------- main


def _param_groups(model: SkuNet, weight_decay: float, lr: float, backbone_lr_mult: float = 1.0) -> list[dict]:
    """Decay / no-decay groups for the head and for the backbone (at ``lr * backbone_lr_mult``)."""
    groups = []
    for part, part_lr in ((model.head, lr), (model.backbone, lr * backbone_lr_mult)):
        decay, no_decay = [], []
        for p in part.parameters():
            if p.requires_grad:
                # Biases and norm scales are 1-d; decaying them only hurts.
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups += [{"params": decay, "weight_decay": weight_decay, "lr": part_lr},
                   {"params": no_decay, "weight_decay": 0.0, "lr": part_lr}]
    return [g for g in groups if g["params"]]


class DistillationLoss(nn.Module):
    """Cross-entropy plus ``weight`` x T^2 x KL(teacher || student) over the teacher's classes.

    The teacher is the warm-start model as loaded (before its head was widened): on every
    image of the batch (replayed old-SKU images and new ones alike, as in "learning without
    forgetting"), the student's old-class logits are pulled towards the champion's, which
    keeps what it knew about the old SKUs while the new rows learn. Called with the batch's
    images (``needs_inputs``), the teacher runs under ``no_grad`` in eval mode.
    """

    needs_inputs = True

    def __init__(self, base: nn.Module, teacher: nn.Module, weight: float, temperature: float) -> None:
        super().__init__()
        self.base = base
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weight = float(weight)
        self.temperature = float(temperature)

    def forward(self, output: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        loss = self.base(output, targets)
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        old = teacher_logits.shape[1]
        t = self.temperature
        kd = F.kl_div(F.log_softmax(output[:, :old].float() / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                      reduction="batchmean", log_target=True)
        return loss + self.weight * t * t * kd


def _default_workers(info: DistInfo) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(12, cpus // max(1, info.local_world_size) - 1))


def _write_json(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _warm_start(
    args: argparse.Namespace, inputs: Inputs, info: DistInfo, workers: int, amp_dtype: torch.dtype | None,
    freeze: tuple[str, ...],
) -> tuple[SkuNet, int, SkuNet | None]:
    """Load the production model and widen its head to the new class count.

    Returns (model, old class count, the model as loaded when distillation is on, else None).
    """
    art, inputs.warm_artifact = inputs.warm_artifact, None  # its tensors are not kept for the whole run
    old_n = int(art["num_classes"])
    if art["arch"] != args.arch or int(art["head_hidden"]) != args.head_hidden:
        raise InputError(
            f"warm-start model {inputs.warm_model} is {art['arch']} with head_hidden={art['head_hidden']}, "
            f"but this job trains {args.arch} with head_hidden={args.head_hidden}"
        )
    if old_n > inputs.num_classes:
        raise InputError(
            f"warm-start model has {old_n} classes but classes.json only {inputs.num_classes}: "
            "class indices are stable and never removed (num_classes mismatch)"
        )
    for i, (old, new) in enumerate(zip(art["classes"], inputs.classes, strict=False)):
        if old != new:
            raise InputError(f"class index {i} is {old!r} in the warm-start model but {new!r} in classes.json")
    model = model_from_artifact(art, freeze).to(info.device)
    # The champion as loaded, before its head grows: the distillation teacher.
    teacher = model_from_artifact(art).to(info.device).eval() if args.distill_weight > 0 else None
    new_ids = list(range(old_n, inputs.num_classes))
    embeddings, reference = {}, None
    if new_ids:
        embeddings, reference = class_mean_embeddings(
            model, inputs.images, inputs.train, new_ids, args, info, workers, amp_dtype
        )
    # Same seed on every rank: the random fallback rows must agree before DDP starts.
    widen_head(model, inputs.num_classes, embeddings, torch.Generator().manual_seed(args.seed), reference)
    freeze_backbone(model, freeze)
    log(
        f"Warm start from {inputs.warm_model}: {old_n} -> {inputs.num_classes} classes "
        f"({len(new_ids)} new: {len(embeddings)} initialised from train-image embeddings, "
        f"{len(new_ids) - len(embeddings)} random)"
    )
    return model, old_n, teacher


def main(argv: list[str] | None = None) -> None:
    global _RANK
    env = JobEnv.from_environment()
    _RANK = world_from_env()[0]
    args = parse_args(argv, env)
    inputs = Inputs(args, env)  # validate before any process group: fail fast, one clear reason
    info = init_distributed()
    _RANK = info.rank
    try:
        run_training(args, env, inputs, info)
    finally:
        teardown()


def run_training(args: argparse.Namespace, env: JobEnv, inputs: Inputs, info: DistInfo) -> None:
    device = info.device
    use_cuda = device.type == "cuda"
    amp_dtype = resolve_amp(args.amp, device)
    workers = args.workers if args.workers is not None else _default_workers(info)
    channels_last = use_cuda and args.channels_last
    if use_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ckpt_dir = Path(args.checkpoint_dir)
    log(
        f"torch {torch.__version__} | backend {info.backend or 'single-process'} | world {info.world_size} | "
        f"device {device} | amp {amp_dtype or 'off'} | workers {workers} | fingerprint {inputs.fingerprint}"
    )

    resume_path, state = find_resume_state(args, inputs)
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            clear_checkpoints(ckpt_dir)
    barrier(info)  # nobody may read the checkpoint dir while rank 0 clears it

    torch.manual_seed(args.seed)  # identical init on every rank
    # The freeze policy follows the weights actually loaded (a resumed run has the same inputs).
    freeze, freeze_line = resolve_freeze(args.freeze, inputs.backbone_init)
    log(f"Freeze policy: {freeze_line}")
    old_num_classes: int | None = None
    teacher: SkuNet | None = None
    if state is not None:
        model = build_model(args.arch, inputs.num_classes, args.head_hidden, args.dropout, freeze)
        model.load_state_dict(state["model"])
        old_num_classes = state.get("old_num_classes")
    elif inputs.warm_model is not None:
        model, old_num_classes, teacher = _warm_start(args, inputs, info, workers, amp_dtype, freeze)
    else:
        model = build_model(args.arch, inputs.num_classes, args.head_hidden, args.dropout, freeze)
        if inputs.weights is not None:
            missing = load_backbone_weights(model, inputs.weights)
            log(f"Backbone initialised from {inputs.weights}" + (f" ({len(missing)} keys missing)" if missing else ""))
        else:
            log("No pretrained weights given: backbone starts from random init")
    total, trainable = count_parameters(model)
    log(
        f"PARAMS total={total:,} trainable={trainable:,} frozen={total - trainable:,} "
        f"(arch={args.arch} num_classes={inputs.num_classes} head_hidden={args.head_hidden} "
        f"frozen={','.join(freeze) or 'none'})"
    )

    train_samples = inputs.train
    if old_num_classes is not None:
        train_samples = select_replay(inputs.train, old_num_classes, args.replay_fraction, args.seed,
                                      balanced=args.replay_balanced)
        new_count = sum(1 for s in inputs.train if s.class_index >= old_num_classes)
        log(
            f"Replay: {len(train_samples)} train images = {new_count} of new SKUs + "
            f"{len(train_samples) - new_count} of {len(inputs.train) - new_count} old at fraction {args.replay_fraction}"
            f" ({'an equal quota per old SKU' if args.replay_balanced else 'per old SKU'})"
        )
        if not train_samples:
            raise InputError("empty train set after replay selection (no new SKUs and --replay-fraction 0)")

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    unwrapped: SkuNet = model
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    torch.manual_seed(args.seed + info.rank)  # different augmentations per rank

    global_batch = args.batch_size * info.world_size
    lr = args.lr * global_batch / REFERENCE_BATCH
    optimizer = torch.optim.SGD(_param_groups(unwrapped, args.weight_decay, lr, args.backbone_lr_mult),
                                lr=lr, momentum=args.momentum)
    criterion: nn.Module = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if teacher is None and state is not None and old_num_classes and args.distill_weight > 0 and inputs.warm_model:
        teacher = model_from_artifact(read_artifact(inputs.warm_model)).to(device).eval()  # resumed run
    if teacher is not None:
        criterion = DistillationLoss(criterion, teacher, args.distill_weight, args.distill_temperature)
        log(f"Distillation from the warm-start model on its {old_num_classes} classes: "
            f"weight {args.distill_weight}, temperature {args.distill_temperature}")
    if args.backbone_lr_mult != 1.0:
        log(f"Backbone learning rate: {args.backbone_lr_mult} x the head's")
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    size = args.image_size
    pin = use_cuda
    train_set = ManifestDataset(inputs.images, train_samples, train_transform(size, args.color_jitter), eval_resize(size))
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed)
    train_loader = make_loader(train_set, args.batch_size, sampler=sampler, workers=workers, pin_memory=pin,
                               drop_last=len(sampler) >= args.batch_size)

    def eval_loader(samples: list[Sample]):
        ds = ManifestDataset(inputs.images, samples, eval_transform(size), eval_resize(size))
        return make_loader(ds, args.batch_size, sampler=ShardSampler(len(ds), info.rank, info.world_size),
                           workers=workers, pin_memory=pin)

    val_loader = eval_loader(inputs.val)
    steps_per_epoch = len(train_loader)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_warmup_lambda(round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch)
    )
    log("Epoch selection: " + ("the last epoch's weights are the job's model" if args.select_epoch == "last"
                               else "the epoch with the highest val top-1 is the job's model"))
    log(
        f"Data: train {len(train_set)} (steps/epoch {steps_per_epoch}), val {len(inputs.val)}, "
        f"test {len(inputs.test)} | global batch {global_batch} | lr {lr:.6f} (base {args.lr} per {REFERENCE_BATCH})"
    )

    start_epoch, best, history = 1, {"epoch": 0, "val_top1": -1.0}, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best, history = dict(state["best"]), list(state["history"])
        if "torch_rng" in state and info.world_size == 1:
            # The augmentations and dropout of the epochs to come draw from where the
            # interrupted run left off: one process loading in-process (--workers 0) resumes to
            # the very weights of an uninterrupted run (tests/reliability/job_faults.py). Several
            # ranks keep their seed+rank streams (only rank 0's state is saved).
            torch.set_rng_state(state["torch_rng"])
        log(f"Resumed from checkpoint {resume_path} (epoch {state['epoch']} completed); "
            f"continuing at epoch {start_epoch}/{args.epochs}")

    bad_paths: set[str] = set()
    best_state: dict[str, torch.Tensor] | None = None
    progress = {"start": time.perf_counter(), "done_steps": 0, "best": best,
                "total_steps": steps_per_epoch * max(0, args.epochs - start_epoch + 1)}
    for epoch in range(start_epoch, args.epochs + 1):
        sampler.set_epoch(epoch)
        tr = train_one_epoch(model, criterion, optimizer, scheduler, scaler, train_loader, info, epoch, args,
                             amp_dtype, bad_paths, progress)
        sync_buffers(unwrapped, info)  # validate (and save) rank 0's model on every rank
        ev = evaluate(unwrapped, val_loader, info, amp_dtype, channels_last, bad_paths)
        record = {
            "epoch": epoch, "train_loss": tr["loss"], "val_loss": ev["loss"], "val_top1": ev["top1"],
            "val_top5": ev["top5"], "lr": optimizer.param_groups[0]["lr"], "images_per_sec": tr["images_per_sec"],
            "train_images": tr["images"], "seconds": tr["seconds"],
        }
        history.append(record)
        log(metric_lines.format_epoch_line(epoch, tr["loss"], ev["loss"], ev["top1"], ev["top5"],
                                           record["lr"], tr["images_per_sec"]))
        # Identical on all ranks (all-reduced). Without val rows, or selecting the last epoch, every
        # epoch "improves": the last is kept.
        improved = args.select_epoch == "last" or not inputs.val or ev["top1"] > best["val_top1"]
        if inputs.val and ev["top1"] > progress["best"]["val_top1"]:  # the PROGRESS line's "best val"
            progress["best"] = {"epoch": epoch, "val_top1": ev["top1"]}
        if improved:
            best = {"epoch": epoch, "val_top1": ev["top1"], "val_top5": ev["top5"], "val_loss": ev["loss"]}
            # Every rank holds the same weights; a CPU copy saves reading the file back later.
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in unwrapped.state_dict().items()}
        if info.is_main:
            if improved:
                save_model_artifact(unwrapped, ckpt_dir / BEST_MODEL_NAME, image_size=size, classes=inputs.classes,
                                    extra={"best": best, "old_num_classes": old_num_classes})
            atomic_torch_save(
                {
                    "epoch": epoch, "model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "best": best,
                    "history": history, "args": {k: v for k, v in vars(args).items()},
                    "fingerprint": inputs.fingerprint, "old_num_classes": old_num_classes,
                    "num_classes": inputs.num_classes, "torch_version": str(torch.__version__),
                    "torch_rng": torch.get_rng_state(),  # rank 0's: restored by a one-process run
                },
                ckpt_dir / f"checkpoint-epoch{epoch:04d}.pt",
            )
            prune_checkpoints(ckpt_dir, args.keep_checkpoints)
        barrier(info)

    # Best model: from memory if this run found it, else from the checkpoint dir (after a resume).
    if best_state is None:
        best_state = read_artifact(ckpt_dir / BEST_MODEL_NAME)["state_dict"]
    unwrapped.load_state_dict(best_state)
    test = None
    if inputs.test:
        ev = evaluate(unwrapped, eval_loader(inputs.test), info, amp_dtype, channels_last, bad_paths)
        test = {"top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"], "count": ev["count"]}
        log(metric_lines.format_final_line(best["epoch"], best["val_top1"], test["top1"], test["top5"]))
    if info.is_main:
        write_outputs(env, ckpt_dir, inputs, args, info, history, best, test, total, trainable, bad_paths)
    barrier(info)
    log(f"Done: best epoch {best['epoch']} val_top1 {best['val_top1']:.4f}; model in {env.model_dir}")


def write_outputs(env, ckpt_dir, inputs, args, info, history, best, test, total, trainable, bad_paths) -> None:
    """Rank 0: model.pt + classes.json + metrics.json to SM_MODEL_DIR, training_metrics.json to output data."""
    env.model_dir.mkdir(parents=True, exist_ok=True)
    tmp = env.model_dir / f"model.pt.tmp.{os.getpid()}"
    shutil.copyfile(ckpt_dir / BEST_MODEL_NAME, tmp)
    os.replace(tmp, env.model_dir / "model.pt")
    shutil.copyfile(inputs.classes_file, env.model_dir / "classes.json")
    doc = {
        "arch": args.arch, "image_size": args.image_size, "head_hidden": args.head_hidden,
        "num_classes": inputs.num_classes, "history": history, "best": best, "test": test,
        "params": {"total": total, "trainable": trainable}, "world_size": info.world_size,
        "global_batch": args.batch_size * info.world_size, "skipped_images": sorted(bad_paths),
        "torch_version": str(torch.__version__),
        "final_val_top1": history[-1]["val_top1"] if history else None,
        # What this run cost and how it started (warm-start recipes are compared on these).
        "compute": {
            "train_seconds": sum(r["seconds"] for r in history),
            "train_images": sum(r["train_images"] for r in history),
            "epochs": len(history),
            "backbone_init": inputs.backbone_init,
            "frozen": list(resolve_freeze(args.freeze, inputs.backbone_init)[0]),
            "replay_fraction": args.replay_fraction, "replay_balanced": args.replay_balanced,
            "backbone_lr_mult": args.backbone_lr_mult, "distill_weight": args.distill_weight,
        },
        "select_epoch": args.select_epoch,
    }
    if not all(math.isfinite(r["train_loss"]) for r in history):
        doc["warning"] = "non-finite train loss in some epochs"
    _write_json(env.model_dir / "metrics.json", doc)
    _write_json(env.output_data_dir / "training_metrics.json", doc)


if __name__ == "__main__":
    sys.exit(run_job(main))
