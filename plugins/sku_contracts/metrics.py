"""The metric lines ``train.py`` prints and the regexes that read them back.

Torch- and Airflow-free on purpose: the Airflow side imports it to build the SageMaker
``MetricDefinitions`` (CloudWatch) and to parse the local backend's log with the very same
regexes, so the two can never drift apart.

Per epoch (one line, fixed key order)::

    METRIC epoch=3 train_loss=1.2345 val_loss=0.9876 val_top1=0.8123 val_top5=0.9712 lr=0.012500 images_per_sec=812.3

Once at the end, for the best model on the test split::

    METRIC final best_epoch=3 best_val_top1=0.8123 test_top1=0.8050 test_top5=0.9688
"""

from __future__ import annotations

import re

METRIC_PREFIX = "METRIC"

# Numbers are printed with fixed decimals (never exponent notation) so these stay simple.
_NUM = r"([0-9]+(?:\.[0-9]+)?)"
# Not anchored at the line start: under mpirun (SMDDP) SageMaker prefixes every line with
# ``[1,mpirank:0,algo-1]<stdout>:``.
_EPOCH = rf"{METRIC_PREFIX} epoch=[0-9]+.*"
_FINAL = rf"{METRIC_PREFIX} final.*"

# Each key is matched after a space so that ``val_top1`` never matches ``best_val_top1``.
METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": "epoch", "Regex": rf"{METRIC_PREFIX} epoch=([0-9]+) "},
    {"Name": "train:loss", "Regex": rf"{_EPOCH} train_loss={_NUM}"},
    {"Name": "validation:loss", "Regex": rf"{_EPOCH} val_loss={_NUM}"},
    {"Name": "validation:top1", "Regex": rf"{_EPOCH} val_top1={_NUM}"},
    {"Name": "validation:top5", "Regex": rf"{_EPOCH} val_top5={_NUM}"},
    {"Name": "train:lr", "Regex": rf"{_EPOCH} lr={_NUM}"},
    {"Name": "train:images_per_sec", "Regex": rf"{_EPOCH} images_per_sec={_NUM}"},
    {"Name": "best:validation:top1", "Regex": rf"{_FINAL} best_val_top1={_NUM}"},
    {"Name": "test:top1", "Regex": rf"{_FINAL} test_top1={_NUM}"},
    {"Name": "test:top5", "Regex": rf"{_FINAL} test_top5={_NUM}"},
]

EPOCH_KEYS = ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_sec")
FINAL_KEYS = ("best_epoch", "best_val_top1", "test_top1", "test_top5")


def _fmt(value: float, decimals: int) -> str:
    # A NaN/inf loss prints as "nan"/"inf": the regexes then simply do not match that line.
    return f"{float(value):.{decimals}f}"


def format_epoch_line(
    epoch: int,
    train_loss: float,
    val_loss: float,
    val_top1: float,
    val_top5: float,
    lr: float,
    images_per_sec: float,
) -> str:
    """The one per-epoch line that ``METRIC_DEFINITIONS`` match."""
    return (
        f"{METRIC_PREFIX} epoch={int(epoch)} train_loss={_fmt(train_loss, 4)} val_loss={_fmt(val_loss, 4)} "
        f"val_top1={_fmt(val_top1, 4)} val_top5={_fmt(val_top5, 4)} lr={_fmt(lr, 6)} "
        f"images_per_sec={_fmt(images_per_sec, 1)}"
    )


def format_final_line(best_epoch: int, best_val_top1: float, test_top1: float, test_top5: float) -> str:
    """The end-of-job line (best epoch and its test-split accuracy)."""
    return (
        f"{METRIC_PREFIX} final best_epoch={int(best_epoch)} best_val_top1={_fmt(best_val_top1, 4)} "
        f"test_top1={_fmt(test_top1, 4)} test_top5={_fmt(test_top5, 4)}"
    )


def _parse(definitions: list[dict[str, str]], text: str) -> dict[str, list[float]]:
    """Apply ``definitions`` to a log, line by line, as CloudWatch would."""
    compiled = [(d["Name"], re.compile(d["Regex"])) for d in definitions]
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        if METRIC_PREFIX not in line:
            continue
        for name, rx in compiled:
            m = rx.search(line)
            if m:
                found.setdefault(name, []).append(float(m.group(1)))
    return found


def parse_metric_lines(text: str) -> dict[str, list[float]]:
    """Apply ``METRIC_DEFINITIONS`` to a log, line by line, as CloudWatch would."""
    return _parse(METRIC_DEFINITIONS, text)


# --------------------------------------------------------------------------- evaluation job
#
# ``evaluate.py`` prints one line once the challenger (and the champion, if any) are scored::
#
#     METRIC evaluation challenger_top1=0.8123 challenger_top5=0.9650 challenger_macro_accuracy=0.8011
#       challenger_new_sku_top1=0.7400 challenger_old_sku_top1=0.8200 champion_top1=0.8250
#       champion_old_sku_top1=0.8250 old_sku_top1_delta=-0.0050 top1_delta_on_known=-0.0040
#
# (one line, wrapped here). A value that does not exist (no champion, no new SKUs) prints as
# ``n/a``, which the regexes do not match, so CloudWatch / the local backend record nothing.

EVALUATION_KEYS = (
    "challenger_top1",
    "challenger_top5",
    "challenger_macro_accuracy",
    "challenger_new_sku_top1",
    "challenger_old_sku_top1",
    "champion_top1",
    "champion_old_sku_top1",
    "old_sku_top1_delta",
    "top1_delta_on_known",
)
_SIGNED = r"(-?[0-9]+(?:\.[0-9]+)?)"  # deltas are negative when the challenger is worse
_EVALUATION = rf"{METRIC_PREFIX} evaluation.*"

# As above, each key is matched after a space: ``challenger_top1`` never matches inside
# ``champion_top1`` or ``challenger_old_sku_top1``.
EVALUATION_METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": "evaluation:challenger:top1", "Regex": rf"{_EVALUATION} challenger_top1={_NUM}"},
    {"Name": "evaluation:challenger:top5", "Regex": rf"{_EVALUATION} challenger_top5={_NUM}"},
    {"Name": "evaluation:challenger:macro_accuracy", "Regex": rf"{_EVALUATION} challenger_macro_accuracy={_NUM}"},
    {"Name": "evaluation:challenger:new_sku_top1", "Regex": rf"{_EVALUATION} challenger_new_sku_top1={_NUM}"},
    {"Name": "evaluation:challenger:old_sku_top1", "Regex": rf"{_EVALUATION} challenger_old_sku_top1={_NUM}"},
    {"Name": "evaluation:champion:top1", "Regex": rf"{_EVALUATION} champion_top1={_NUM}"},
    {"Name": "evaluation:champion:old_sku_top1", "Regex": rf"{_EVALUATION} champion_old_sku_top1={_NUM}"},
    {"Name": "evaluation:old_sku_top1_delta", "Regex": rf"{_EVALUATION} old_sku_top1_delta={_SIGNED}"},
    {"Name": "evaluation:top1_delta_on_known", "Regex": rf"{_EVALUATION} top1_delta_on_known={_SIGNED}"},
]


def format_evaluation_line(values: dict[str, float | None]) -> str:
    """The evaluation job's metric line: ``EVALUATION_KEYS`` in order, 4 decimals, ``n/a`` for None."""
    parts = []
    for key in EVALUATION_KEYS:
        value = values.get(key)
        parts.append(f"{key}={'n/a' if value is None else _fmt(value, 4)}")
    return f"{METRIC_PREFIX} evaluation " + " ".join(parts)


def parse_evaluation_metric_lines(text: str) -> dict[str, list[float]]:
    """Apply ``EVALUATION_METRIC_DEFINITIONS`` to a log, line by line, as CloudWatch would."""
    return _parse(EVALUATION_METRIC_DEFINITIONS, text)


# --------------------------------------------------------------------------- progress line
#
# For the person watching the task log (not for CloudWatch): ``train.py`` prints, every
# ``--print-freq`` steps and at the end of every epoch::
#
#     PROGRESS epoch 3/10 step 120/450 (27%) | 812.3 img/s | loss 1.2345 | ETA 1h02m | best val top-1 0.8123 (epoch 2)
#
# It never contains ``METRIC``, so the metric regexes above can never read it.

PROGRESS_PREFIX = "PROGRESS"
PROGRESS_RE = re.compile(
    rf"{PROGRESS_PREFIX} epoch (?P<epoch>[0-9]+)/(?P<epochs>[0-9]+) step (?P<step>[0-9]+)/(?P<steps>[0-9]+) "
    r"\((?P<percent>[0-9]+)%\) \| (?P<images_per_sec>[0-9]+\.[0-9]) img/s \| loss (?P<loss>\S+) \| "
    r"ETA (?P<eta>\S+) \| best val top-1 (?P<best>[0-9]+\.[0-9]{4} \(epoch [0-9]+\)|-)"
)


def format_duration(seconds: float | None) -> str:
    """``45s``, ``12m05s``, ``3h07m``, ``2d04h``; ``?`` when unknown (no step timed yet)."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_progress_line(
    *,
    epoch: int,
    epochs: int,
    step: int,
    steps: int,
    images_per_sec: float,
    loss: float,
    eta_seconds: float | None,
    best_val_top1: float | None,
    best_epoch: int | None,
) -> str:
    """The human-readable progress line (see above); ``best_val_top1`` ``None``: no epoch validated yet.

    ``step`` counts completed steps of ``epoch`` (``step == steps``: the epoch's training is done).
    """
    percent = int(100 * step / steps) if steps else 100
    best = "-" if best_val_top1 is None or best_val_top1 < 0 else f"{best_val_top1:.4f} (epoch {int(best_epoch or 0)})"
    return (
        f"{PROGRESS_PREFIX} epoch {int(epoch)}/{int(epochs)} step {int(step)}/{int(steps)} ({percent}%) | "
        f"{_fmt(images_per_sec, 1)} img/s | loss {_fmt(loss, 4)} | ETA {format_duration(eta_seconds)} | "
        f"best val top-1 {best}"
    )


def eta_seconds(*, elapsed: float, done_steps: int, total_steps: int) -> float | None:
    """Remaining time at the rate so far (``None`` before the first step is done)."""
    if done_steps <= 0 or elapsed <= 0:
        return None
    return elapsed / done_steps * max(0, total_steps - done_steps)
