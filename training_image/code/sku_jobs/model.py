"""The SKU classifier: a torchvision ResNet backbone plus a small fully connected head.

Also: parameter counting, the freeze policy (which backbone layers stay fixed, decided by
the weights actually loaded), the model artefact (``model.pt``) format, and widening the
head for new SKUs on warm start.
"""

from __future__ import annotations

import math
import os
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
DEFAULT_FREEZE = ("conv1", "bn1", "layer1", "layer2", "layer3")
#: Where the backbone's starting weights came from (see :func:`resolve_freeze`).
INIT_RANDOM, INIT_IMAGENET, INIT_WARM_START = "random", "imagenet", "warm_start"
_INIT_WORDS = {
    INIT_RANDOM: "random init",
    INIT_IMAGENET: "loaded from ImageNet weights",
    INIT_WARM_START: "loaded from the warm-start model",
}
from sku_contracts.files import MODEL_FORMAT as ARTIFACT_FORMAT  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SkuNet(nn.Module):
    """ResNet backbone (``fc`` = Identity) → head.

    The head is ``Dropout → Linear(num_classes)`` (``head_hidden=0``: torchvision's own single
    classifier on the pooled features) or, with ``head_hidden > 0``, a bottleneck
    ``Linear → ReLU → Dropout → Linear(num_classes)`` (fewer head parameters for a very large
    catalogue: 2048→576→12,000 is 8M instead of 24.6M).
    """

    def __init__(self, arch: str, num_classes: int, head_hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unsupported arch {arch!r}; expected one of {', '.join(ARCHS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if head_hidden < 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"head_hidden must be >= 0 and dropout within [0, 1), got {head_hidden}, {dropout}")
        # weights=None always: nothing may download at run time; ImageNet weights come from a file.
        backbone = getattr(torchvision.models, arch)(weights=None)
        feat = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.arch = arch
        self.feature_dim = feat
        self.head_hidden = head_hidden
        self.dropout = dropout
        self.backbone = backbone
        if head_hidden:
            self.head = nn.Sequential(
                nn.Linear(feat, head_hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(head_hidden, num_classes),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat, num_classes))
        self.frozen: tuple[str, ...] = ()

    @property
    def classifier(self) -> nn.Linear:
        """The last Linear (one row per class)."""
        return self.head[-1]

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding: what the classifier reads (the hidden activations, or the
        backbone's pooled features when the head is a single classifier)."""
        return self.head[:-1](self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> SkuNet:
        """Like ``nn.Module.train`` but frozen backbone parts stay in eval mode (BN stats frozen)."""
        super().train(mode)
        for name in self.frozen:
            getattr(self.backbone, name).eval()
        return self


def build_model(
    arch: str = "resnet152",
    num_classes: int = 1000,
    head_hidden: int = 0,
    dropout: float = 0.0,
    freeze: Iterable[str] = (),
) -> SkuNet:
    """Build the classifier (random init) and freeze ``freeze`` backbone children (none by
    default: random layers that never train would stay random; see :func:`resolve_freeze`)."""
    model = SkuNet(arch, num_classes, head_hidden=head_hidden, dropout=dropout)
    freeze_backbone(model, freeze)
    return model


def parse_freeze(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"conv1,bn1,layer1"`` → ("conv1", "bn1", "layer1"); "" / "none" → ()."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = tuple(s.strip() for s in items if s and s.strip())
    return () if names in {("none",), ("None",)} else names


def resolve_freeze(spec: str | Iterable[str] | None, init: str) -> tuple[tuple[str, ...], str]:
    """The backbone layers to freeze for the weights actually loaded, and a log line saying so.

    ``spec`` is the ``freeze`` setting: ``"auto"`` (the default) freezes :data:`DEFAULT_FREEZE`
    when the backbone was *loaded* (``init`` is ImageNet weights or the warm-start model) and
    nothing at random init, where frozen layers would stay random filters for good (the
    cause of issue #10's 60%). ``"none"`` / ``""`` freezes nothing; a comma list freezes
    exactly those layers, whatever was loaded (asked for explicitly, so it is obeyed, with a
    warning in the line at random init).
    """
    if init not in _INIT_WORDS:
        raise ValueError(f"unknown backbone init {init!r}; expected one of {', '.join(_INIT_WORDS)}")
    text = spec.strip().lower() if isinstance(spec, str) else None
    if text == "auto" or spec is None:
        names = DEFAULT_FREEZE if init != INIT_RANDOM else ()
        how = "freeze=auto"
    else:
        names = parse_freeze(spec)
        how = f"freeze={','.join(names) or 'none'}"
    where = _INIT_WORDS[init]
    if not names:
        line = f"nothing frozen: {where} ({how})"
    else:
        line = f"frozen: {','.join(names)} ({where}; {how})"
        if init == INIT_RANDOM:
            line += " - WARNING: these layers stay at random init for the whole run"
    return names, line


def freeze_backbone(model: SkuNet, names: Iterable[str]) -> None:
    """Stop gradients for the named backbone children and keep them in eval mode."""
    names = parse_freeze(names)
    children = dict(model.backbone.named_children())
    unknown = [n for n in names if n not in children]
    if unknown:
        raise ValueError(
            f"cannot freeze unknown backbone module(s) {unknown}; known: {', '.join(children)}"
        )
    for p in model.parameters():
        p.requires_grad_(True)
    for n in names:
        for p in children[n].parameters():
            p.requires_grad_(False)
    model.frozen = names
    model.train(model.training)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; works on the ``meta`` device too."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def load_backbone_weights(model: SkuNet, path: str | os.PathLike) -> list[str]:
    """Load an ImageNet torchvision state_dict into the backbone (its ``fc`` is dropped).

    Returns the backbone keys the file did not provide (should be none). Raises when the
    file does not fit the architecture, rather than silently training from scratch.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} unexpected keys for {model.arch}, e.g. {unexpected[:3]}")
    if len(missing) > 0.5 * len(model.backbone.state_dict()):
        raise ValueError(f"{path}: does not look like {model.arch} weights ({len(missing)} keys missing)")
    return list(missing)


# --------------------------------------------------------------------------- artefact


def artifact_dict(
    model: SkuNet,
    *,
    image_size: int,
    classes: list[str],
    extra: Mapping[str, object] | None = None,
) -> dict:
    """The ``model.pt`` content (plain types + CPU tensors, loadable with weights_only=True)."""
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    out = {
        "format": ARTIFACT_FORMAT,
        "arch": model.arch,
        "image_size": int(image_size),
        "head_hidden": int(model.head_hidden),
        "dropout": float(model.dropout),
        "num_classes": int(model.num_classes),
        "classes": [str(c) for c in classes],
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
        "state_dict": state,
    }
    if extra:
        out.update(dict(extra))
    return out


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file then ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_model_artifact(
    model: SkuNet,
    path: str | os.PathLike,
    *,
    image_size: int,
    classes: list[str],
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write ``model.pt`` (see :func:`artifact_dict`) atomically."""
    return atomic_torch_save(artifact_dict(model, image_size=image_size, classes=classes, extra=extra), path)


def read_artifact(path: str | os.PathLike) -> dict:
    """Load a ``model.pt`` dict (CPU tensors) and check its format."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"model artefact not found: {path}")
    art = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(art, dict) or art.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: not a {ARTIFACT_FORMAT} artefact")
    return art


def model_from_artifact(art: Mapping, freeze: Iterable[str] = ()) -> SkuNet:
    """Rebuild the model a ``model.pt`` dict describes and load its weights."""
    model = SkuNet(art["arch"], int(art["num_classes"]), int(art["head_hidden"]), float(art.get("dropout", 0.2)))
    model.load_state_dict(art["state_dict"])
    freeze_backbone(model, freeze)
    return model


def load_model_artifact(path: str | os.PathLike, freeze: Iterable[str] = ()) -> tuple[SkuNet, dict]:
    """(model in eval mode, artefact metadata without the state_dict)."""
    art = read_artifact(path)
    model = model_from_artifact(art, freeze).eval()
    meta = {k: v for k, v in art.items() if k != "state_dict"}
    return model, meta


class UnsafeArchiveError(ValueError):
    """A member of a model archive would land outside the target folder, or is not a plain file/dir."""


def extract_model_archive(archive: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Extract a ``model.tar.gz`` into ``out``, refusing absolute paths, "..", links out and devices.

    The archive comes from S3, so it is untrusted input. Python >= 3.11.4 has tarfile's
    ``data`` filter (raises ``tarfile.FilterError``); older ones get the same checks by hand.
    """
    archive, out = Path(archive), Path(out)
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(out, filter="data")  # strips a leading "/"; refuses "..", links out, devices
        # One exception type for callers, naming the member (FilterError: Python >= 3.11.4).
        except getattr(tarfile, "FilterError", ()) as exc:
            raise UnsafeArchiveError(f"{archive}: unsafe member in archive: {exc}") from None
        except TypeError:  # Python < 3.11.4 has no filter: check the names ourselves
            if any(m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir())
                   for m in tar.getmembers()):
                raise UnsafeArchiveError(f"{archive}: unsafe member in archive") from None
            tar.extractall(out)  # noqa: S202 - members checked above
    return out


# --------------------------------------------------------------------------- warm start


@torch.no_grad()
def widen_head(
    model: SkuNet,
    num_classes: int,
    class_embeddings: Mapping[int, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    reference: torch.Tensor | None = None,
) -> list[int]:
    """Grow the classifier to ``num_classes`` rows, keeping the existing rows untouched.

    Class indices are stable across months, so row ``i`` keeps meaning class ``i``. A new
    class with a mean penultimate embedding gets that direction ("weight imprinting"),
    normalised and scaled to the mean norm of the old rows; a new class without one gets a
    small random row. Returns the new class indices.

    ``reference`` is the mean embedding of old-class images. Without it the bias is the mean
    old bias. With it the direction is taken relative to it (``emb - reference``) and the
    bias set so that at the reference a new class scores the mean old logit: the embeddings
    are post-ReLU, all positive, so raw class means point almost the same way and an
    uncentred imprinted row would win for every image, old classes included.
    """
    old = model.classifier
    old_n = old.out_features
    if num_classes < old_n:
        raise ValueError(f"cannot shrink the head from {old_n} to {num_classes} classes (indices are stable)")
    if num_classes == old_n:
        return []
    new = nn.Linear(old.in_features, num_classes, bias=True).to(device=old.weight.device, dtype=old.weight.dtype)
    w, b = new.weight, new.bias
    w[:old_n] = old.weight
    b[:old_n] = old.bias
    mean_norm = old.weight.norm(dim=1).mean()
    ref = torch.zeros_like(old.weight[0]) if reference is None else reference.to(w.device, w.dtype)
    mean_logit_at_ref = (old.weight @ ref + old.bias).mean()
    new_ids = list(range(old_n, num_classes))
    rand = torch.randn(len(new_ids), old.in_features, generator=generator) * 0.01
    for j, cls in enumerate(new_ids):
        emb = (class_embeddings or {}).get(cls)
        direction = None if emb is None else emb.to(w.device, w.dtype) - ref
        if direction is not None and torch.isfinite(direction).all() and float(direction.norm()) > 0:
            w[cls] = direction / direction.norm() * mean_norm
        else:
            w[cls] = rand[j].to(w.device, w.dtype)
        b[cls] = mean_logit_at_ref - w[cls] @ ref
    new.weight.requires_grad_(old.weight.requires_grad)
    new.bias.requires_grad_(old.bias.requires_grad)
    model.head[-1] = new
    return new_ids


def cosine_warmup_lambda(warmup_steps: int, total_steps: int, min_factor: float = 0.0):
    """LR multiplier per optimizer step: linear warmup then cosine decay to ``min_factor``."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
