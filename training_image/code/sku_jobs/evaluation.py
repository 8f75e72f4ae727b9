"""Challenger / champion metrics and the ``evaluation.json`` document (numpy only, no torch).

The inference in ``evaluate.py`` reduces each model to its top-k class indices per test image;
everything here is computed from those integers, so it is exact, fast on 12,000 SKUs, and
testable on hand-made predictions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sku_contracts.files import EVALUATION_FORMAT  # noqa: E402

DECIMALS = 6
TOP_K = 5


@dataclass
class ModelScores:
    """One model's predictions on the test manifest; row ``i`` is test image ``i``.

    Rows the model did not score (image undecodable, or a class the model does not know)
    may hold anything: :func:`build_evaluation` decides which rows count.
    """

    num_classes: int
    topk: np.ndarray  # (N, min(5, num_classes)) class indices, best first
    confidence: np.ndarray | None = None  # (N,) softmax probability of the top-1 class (report only)
    info: dict = field(default_factory=dict)  # arch, image_size, sha256: copied to the document

    def __post_init__(self) -> None:
        self.topk = np.asarray(self.topk, dtype=np.int64)
        if self.topk.ndim != 2 or self.topk.shape[1] < min(TOP_K, self.num_classes):
            raise ValueError(f"topk must be (N, >= {min(TOP_K, self.num_classes)}), got {self.topk.shape}")
        if self.confidence is not None:
            self.confidence = np.asarray(self.confidence, dtype=np.float64)

    @property
    def top1(self) -> np.ndarray:
        return self.topk[:, 0]


def _rate(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if hits.size else None


def model_metrics(
    targets: np.ndarray,
    scores: ModelScores,
    scored: np.ndarray,
    classes: Sequence[str],
    new_sku_ids: Iterable[str],
    *,
    num_skipped: int = 0,
    worst_n: int = 20,
    pairs_n: int = 20,
) -> dict:
    """MODEL_METRICS of ``evaluation.json`` for the rows where ``scored`` is true."""
    targets = np.asarray(targets, dtype=np.int64)
    scored = np.asarray(scored, dtype=bool)
    t = targets[scored]
    k = min(TOP_K, scores.num_classes)
    p = scores.topk[scored, :k]
    if p.size and (p.min() < 0 or p.max() >= scores.num_classes):
        raise ValueError(f"predicted class outside [0, {scores.num_classes})")
    hit1 = p[:, 0] == t if len(t) else np.zeros(0, dtype=bool)
    hit5 = (p == t[:, None]).any(axis=1) if len(t) else np.zeros(0, dtype=bool)

    num = len(classes)
    counts = np.bincount(t, minlength=num)
    correct = np.bincount(t[hit1], minlength=num)
    per_sku = {
        classes[c]: {"n": int(counts[c]), "correct": int(correct[c]), "accuracy": int(correct[c]) / int(counts[c])}
        for c in np.flatnonzero(counts)
    }
    new_set = set(new_sku_ids)
    is_new_class = np.array([c in new_set for c in classes], dtype=bool)
    is_new = is_new_class[t]

    # Equal fractions give equal floats (division is correctly rounded), so ties are real ties.
    worst = sorted(per_sku.items(), key=lambda kv: (kv[1]["accuracy"], kv[0]))[:worst_n]
    wrong = ~hit1
    pairs: list[dict] = []
    if wrong.any():
        uniq, cnt = np.unique(np.stack([t[wrong], p[wrong, 0]], axis=1), axis=0, return_counts=True)
        pairs = [{"true": classes[a], "predicted": classes[b], "count": int(c)} for (a, b), c in zip(uniq, cnt, strict=True)]
        pairs.sort(key=lambda d: (-d["count"], d["true"], d["predicted"]))
    return {
        "num_classes": int(scores.num_classes),
        "num_images": len(t),
        "num_skipped": int(num_skipped),
        "top1": _rate(hit1),
        "top5": _rate(hit5),
        "top5_k": k,
        "macro_accuracy": float(np.mean([v["accuracy"] for v in per_sku.values()])) if per_sku else None,
        "new_sku_top1": _rate(hit1[is_new]),
        "old_sku_top1": _rate(hit1[~is_new]),
        "per_sku": per_sku,
        "worst_skus": [{"sku_id": s, "accuracy": v["accuracy"], "n": v["n"]} for s, v in worst],
        "confused_pairs": pairs[:pairs_n],
        "model": dict(scores.info),
    }


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def build_evaluation(
    *,
    targets: Sequence[int] | np.ndarray,
    decoded: Sequence[bool] | np.ndarray,
    classes: Sequence[str],
    challenger: ModelScores,
    champion: ModelScores | None,
    new_sku_ids: Iterable[str],
    test_manifest_sha256: str,
    snapshot_id: str | None,
    worst_n: int = 20,
    pairs_n: int = 20,
) -> dict:
    """The ``evaluation.json`` document (unrounded; :func:`dumps_evaluation` rounds).

    The champion is scored only on the decoded images of classes it knows (index below its
    ``num_classes``): class indices are stable, so those are the old SKUs.
    """
    targets = np.asarray(targets, dtype=np.int64)
    decoded = np.asarray(decoded, dtype=bool)
    n = len(targets)
    if decoded.shape != (n,) or challenger.topk.shape[0] != n:
        raise ValueError("targets, decoded and the challenger's predictions must have one row per test image")
    if challenger.num_classes != len(classes):
        raise ValueError(f"challenger has {challenger.num_classes} classes, classes.json {len(classes)}")
    if n and (targets.min() < 0 or targets.max() >= len(classes)):
        raise ValueError(f"a class index is outside [0, {len(classes)})")
    new_ids = sorted(set(new_sku_ids))
    common = {"classes": classes, "new_sku_ids": new_ids, "worst_n": worst_n, "pairs_n": pairs_n}
    doc: dict = {
        "format": EVALUATION_FORMAT,
        "test_manifest_sha256": test_manifest_sha256,
        "num_test_images": n,
        "num_classes": len(classes),
        "snapshot_id": snapshot_id,
        "new_sku_ids": new_ids,
        "challenger": model_metrics(targets, challenger, decoded, num_skipped=int((~decoded).sum()), **common),
        "champion": None,
        "comparison": None,
    }
    if champion is None:
        return doc
    if champion.topk.shape[0] != n:
        raise ValueError("the champion's predictions must have one row per test image")
    if champion.num_classes > challenger.num_classes:
        raise ValueError(
            f"champion has {champion.num_classes} classes, more than the challenger's {challenger.num_classes}"
        )
    known = targets < champion.num_classes
    champ = model_metrics(targets, champion, decoded & known, num_skipped=int((~decoded & known).sum()), **common)
    on_known = decoded & known
    chal_known = model_metrics(targets, challenger, on_known, **common)
    chal = doc["challenger"]
    doc["champion"] = champ
    doc["comparison"] = {
        "num_known_images": int(on_known.sum()),
        "challenger_top1_on_known": chal_known["top1"],
        "challenger_top5_on_known": chal_known["top5"],
        "challenger_macro_accuracy_on_known": chal_known["macro_accuracy"],
        "top1_delta_on_known": _delta(chal_known["top1"], champ["top1"]),
        "top5_delta_on_known": _delta(chal_known["top5"], champ["top5"]),
        "macro_accuracy_delta_on_known": _delta(chal_known["macro_accuracy"], champ["macro_accuracy"]),
        "old_sku_top1_delta": _delta(chal["old_sku_top1"], champ["old_sku_top1"]),
    }
    return doc


def canonical(obj: object, decimals: int = DECIMALS) -> object:
    """Plain JSON types with floats rounded: the same inputs give the same bytes."""
    if isinstance(obj, Mapping):
        return {str(k): canonical(v, decimals) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [canonical(v, decimals) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value} in the evaluation")
        return round(value, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot serialise {type(obj).__name__} in evaluation.json")


def dumps_evaluation(doc: Mapping) -> str:
    """``evaluation.json`` text: rounded floats, sorted keys, no timestamps, trailing newline."""
    return json.dumps(canonical(doc), sort_keys=True, indent=2, allow_nan=False) + "\n"


def metric_values(doc: Mapping) -> dict[str, float | None]:
    """The numbers of the ``METRIC evaluation`` line (``sku_contracts.metrics.EVALUATION_KEYS``)."""
    chal, champ, comp = doc["challenger"], doc.get("champion") or {}, doc.get("comparison") or {}
    return {
        "challenger_top1": chal["top1"],
        "challenger_top5": chal["top5"],
        "challenger_macro_accuracy": chal["macro_accuracy"],
        "challenger_new_sku_top1": chal["new_sku_top1"],
        "challenger_old_sku_top1": chal["old_sku_top1"],
        "champion_top1": champ.get("top1"),
        "champion_old_sku_top1": champ.get("old_sku_top1"),
        "old_sku_top1_delta": comp.get("old_sku_top1_delta"),
        "top1_delta_on_known": comp.get("top1_delta_on_known"),
    }


def example_rows(
    targets: np.ndarray, predicted: np.ndarray, usable: np.ndarray, class_index: int, limit: int
) -> list[int]:
    """Up to ``limit`` test rows of one class for the report: misclassified first, manifest order."""
    rows = np.flatnonzero(usable & (targets == class_index))
    wrong = [int(i) for i in rows if predicted[i] != class_index]
    right = [int(i) for i in rows if predicted[i] == class_index]
    return (wrong + right)[: max(0, limit)]


def pair_example_row(targets: np.ndarray, predicted: np.ndarray, usable: np.ndarray, true: int, pred: int) -> int | None:
    """The first test row of class ``true`` predicted as ``pred`` (for the confused-pairs table)."""
    rows = np.flatnonzero(usable & (targets == true) & (predicted == pred))
    return int(rows[0]) if rows.size else None
