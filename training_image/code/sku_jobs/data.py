"""Manifest-driven image dataset, transforms and data loaders for the training job.

The ``manifests`` channel holds ``train.csv`` / ``val.csv`` / ``test.csv`` (header
``path,class_index,sku_id,sha256``; ``path`` relative to the ``images`` channel) and
``classes.json``. Images are decoded with PIL; JPEGs use ``draft()`` so a 12 MP photo is
decoded at 1/2..1/8 scale straight away, which is most of the CPU cost saved.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from sku_contracts.files import SPLIT_COLUMNS as MANIFEST_HEADER  # noqa: E402
from sku_contracts.files import SPLITS  # noqa: F401,E402 - re-exported for the entry points
from sku_jobs.model import IMAGENET_MEAN, IMAGENET_STD

EVAL_RESIZE_RATIO = 0.875  # the usual 256 → 224 centre crop

# What PIL raises for unreadable, truncated or hostile files; anything else is a real bug.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class InputError(ValueError):
    """The job's inputs break the contract (missing file, bad manifest, class mismatch)."""


def channel_dir(env, name: str, required: bool) -> Path | None:
    """The folder of input channel ``name`` (a :class:`sku_jobs.sm_env.JobEnv`), or ``None``
    when an optional one is absent. :raises InputError: a required channel is missing."""
    path = env.channel(name)
    if path is None or not path.exists():
        if required:
            where = f" (expected at {path})" if path else ""
            raise InputError(f"missing input channel {name!r}{where}; set SM_CHANNEL_{name.upper()}")
        return None
    return path


@dataclass(frozen=True)
class Sample:
    """One manifest row."""

    path: str
    class_index: int
    sku_id: str
    sha256: str


def read_json_input(path: Path) -> object:
    """A JSON file of the ``manifests`` channel. :raises InputError: missing or not JSON."""
    if not path.is_file():
        raise InputError(f"missing manifest file: {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from exc


def load_classes(path: Path) -> list[str]:
    """Read ``classes.json`` and check ``num_classes == len(classes)``."""
    doc = read_json_input(path)
    classes = doc.get("classes") if isinstance(doc, dict) else None
    num = doc.get("num_classes") if isinstance(doc, dict) else None
    if not isinstance(classes, list) or not isinstance(num, int):
        raise InputError(f'{path}: expected {{"num_classes": N, "classes": [...]}}')
    if num != len(classes):
        raise InputError(f"{path}: num_classes={num} but {len(classes)} class names listed")
    if num < 1:
        raise InputError(f"{path}: no classes")
    return [str(c) for c in classes]


def read_manifest(path: Path, num_classes: int) -> list[Sample]:
    """Read a split CSV; every ``class_index`` must be in ``[0, num_classes)``."""
    if not path.is_file():
        raise InputError(f"missing manifest file: {path}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = tuple(reader.fieldnames or ())
        if header[: len(MANIFEST_HEADER)] != MANIFEST_HEADER:
            raise InputError(f"{path}: header {','.join(header)!r}, expected {','.join(MANIFEST_HEADER)!r}")
        out: list[Sample] = []
        for lineno, row in enumerate(reader, start=2):
            try:
                idx = int(row["class_index"])
            except (TypeError, ValueError) as exc:
                raise InputError(f"{path}:{lineno}: bad class_index {row['class_index']!r}") from exc
            if not 0 <= idx < num_classes:
                raise InputError(
                    f"{path}:{lineno}: class_index {idx} outside [0, {num_classes}) "
                    "(num_classes mismatch between classes.json and the manifests)"
                )
            rel = row["path"] or ""
            if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                raise InputError(f"{path}:{lineno}: path {rel!r} must be relative to the images channel")
            out.append(Sample(rel, idx, row.get("sku_id") or "", row.get("sha256") or ""))
    return out


def _unit_hash(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def select_replay(
    samples: Sequence[Sample], old_num_classes: int, fraction: float, seed: int = 0, balanced: bool = False
) -> list[Sample]:
    """New classes' samples plus a deterministic ``fraction`` of the old classes' samples.

    Per class, images are ranked by a seeded hash of their content hash (path if absent), so
    the same images are replayed every time for the same inputs and a class never drops to
    zero images. ``fraction >= 1`` keeps everything.

    ``balanced=False`` takes ``fraction`` of each old class (big classes stay big);
    ``balanced=True`` spends the same budget (``fraction`` of all old images) as an equal
    quota per old class, so every old class is rehearsed alike (a class smaller than the
    quota gives all it has).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"replay fraction must be within [0, 1], got {fraction}")
    if fraction >= 1.0:
        return list(samples)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_class[s.class_index].append(i)
    old_classes = [c for c in by_class if c < old_num_classes]
    n_old = sum(len(by_class[c]) for c in old_classes)
    quota = max(1, math.ceil(fraction * n_old / len(old_classes))) if old_classes else 0
    keep: set[int] = set()
    for cls, idxs in by_class.items():
        if cls >= old_num_classes:
            keep.update(idxs)
        elif fraction > 0.0:
            k = min(len(idxs), quota) if balanced else max(1, math.ceil(fraction * len(idxs)))
            ranked = sorted(idxs, key=lambda i: _unit_hash(samples[i].sha256 or samples[i].path, seed))
            keep.update(ranked[:k])
    return [s for i, s in enumerate(samples) if i in keep]


def train_transform(image_size: int, color_jitter: float = 0.0) -> transforms.Compose:
    """Random crop + flip (+ colour jitter of brightness/contrast/saturation ``color_jitter``
    and hue ``color_jitter / 10`` when > 0), ImageNet-normalised.

    Jitter is off by default: on the real grocery photos trained from random init, 0.2 cost
    ~10 points of held-out top-1 (bench/README.md); lighting variation reaches training
    through the augmentation job's variants instead."""
    jitter = (
        [transforms.ColorJitter(color_jitter, color_jitter, color_jitter, min(0.5, color_jitter / 10))]
        if color_jitter > 0
        else []
    )
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
            transforms.RandomHorizontalFlip(),
            *jitter,
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_resize(image_size: int) -> int:
    return int(round(image_size / EVAL_RESIZE_RATIO))


def eval_transform(image_size: int) -> transforms.Compose:
    """Resize the short side then centre-crop, ImageNet-normalised."""
    return transforms.Compose(
        [
            transforms.Resize(eval_resize(image_size), antialias=True),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def decode_image(path: Path, draft_size: int | None) -> Image.Image:
    """Open upright (EXIF orientation applied, as registration measured it) as RGB; JPEGs are
    decoded at the smallest DCT scale still >= ``draft_size``."""
    with Image.open(path) as img:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))  # square: the same whichever way up
        return ImageOps.exif_transpose(img).convert("RGB")


class ManifestDataset(Dataset):
    """Items are ``(image_tensor, class_index)`` or ``(None, path)`` for an undecodable file.

    The sentinel lets :func:`collate_skip_bad` drop the file and report it, instead of one
    bad image killing an epoch of a multi-node job.
    """

    def __init__(
        self,
        root: Path,
        samples: Sequence[Sample],
        transform,
        draft_size: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [s.class_index for s in self.samples]

    def __getitem__(self, i: int):
        s = self.samples[i]
        path = self.root / s.path
        try:
            img = decode_image(path, self.draft_size)
        except DECODE_ERRORS:
            return None, str(path)
        return self.transform(img), s.class_index


@dataclass
class Batch:
    """A collated batch; ``failed`` lists the paths dropped from it."""

    images: torch.Tensor
    targets: torch.Tensor
    failed: list[str]

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return Batch(self.images.pin_memory(), self.targets.pin_memory(), self.failed)

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def collate_skip_bad(items: list) -> Batch:
    """Stack the good items; keep the paths of the sentinels for logging."""
    good = [(x, y) for x, y in items if x is not None]
    failed = [y for x, y in items if x is None]
    if good:
        images = torch.stack([x for x, _ in good])
        targets = torch.tensor([y for _, y in good], dtype=torch.long)
    else:
        images = torch.empty(0)
        targets = torch.empty(0, dtype=torch.long)
    return Batch(images, targets, failed)


class ShardSampler(Sampler[int]):
    """Strided, unpadded shard ``rank::world_size`` for evaluation.

    ``DistributedSampler`` pads with repeated samples, which would bias val/test metrics;
    here every sample is seen exactly once across ranks and the sums are all-reduced.
    """

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    sampler: Sampler | None = None,
    workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    prefetch_factor: int = 4,
) -> DataLoader:
    """DataLoader with the skip-bad collate; persistent workers + prefetch when workers > 0."""
    kwargs: dict = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_skip_bad,
        **kwargs,
    )
