"""Promotion gates: decide from ``evaluation.json`` whether the challenger replaces the champion.

Three gates, each a DAG param:

* ``min_top1`` — the challenger's overall top-1 on the test split;
* ``min_new_sku_top1`` — its top-1 on the SKUs new in this run (n/a when there are none);
* ``max_old_sku_regression`` — how much lower its top-1 on the old SKUs may be than the
  champion's on the same images (n/a on the first run, when there is no champion).

A missing or malformed evaluation is an error, never a silent promote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

EVALUATION_FORMAT = "sku-evaluation/v1"


class EvaluationError(ValueError):
    """The evaluation is missing or malformed; the message says what and where."""


@dataclass(frozen=True)
class Thresholds:
    min_top1: float
    min_new_sku_top1: float
    max_old_sku_regression: float

    def __post_init__(self) -> None:
        for name in ("min_top1", "min_new_sku_top1", "max_old_sku_regression"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or math.isnan(value) or not 0 <= value <= 1:
                raise ValueError(f"gate {name} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class GateResult:
    gate: str
    value: float | None
    threshold: str
    passed: bool
    note: str = ""


@dataclass
class Decision:
    promote: bool
    forced: bool
    gates: list[GateResult] = field(default_factory=list)

    @property
    def decision(self) -> str:
        if self.forced:
            return "force_promote"
        return "promote" if self.promote else "reject"

    @property
    def reasons(self) -> list[str]:
        return [f"{g.gate} {_fmt(g.value)} does not meet {g.threshold}" for g in self.gates if not g.passed]

    def table(self) -> str:
        lines = [f"{'gate':<26} {'value':>8}  {'threshold':<18} result", "-" * 64]
        for g in self.gates:
            result = "PASS" if g.passed else "FAIL"
            lines.append(f"{g.gate:<26} {_fmt(g.value):>8}  {g.threshold:<18} {result} {g.note}".rstrip())
        verdict = self.decision.upper()
        if self.forced and self.reasons:
            verdict += " (gates failed, overridden by force_promote)"
        lines.append(f"decision: {verdict}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "promote": self.promote,
            "forced": self.forced,
            "reasons": self.reasons,
            "gates": [g.__dict__ for g in self.gates],
        }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _number(document: dict, path: str, *, optional: bool = False) -> float | None:
    node: Any = document
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            if optional:
                return None
            raise EvaluationError(f"evaluation.json: {path} is missing")
        node = node[part]
    if node is None and optional:
        return None
    if isinstance(node, bool) or not isinstance(node, int | float) or math.isnan(node) or not 0 <= node <= 1:
        raise EvaluationError(f"evaluation.json: {path} must be a number in [0, 1], got {node!r}")
    return float(node)


def decide(evaluation: Any, thresholds: Thresholds, *, force_promote: bool = False) -> Decision:
    """Apply the gates to ``evaluation`` (the parsed evaluation.json)."""
    if not isinstance(evaluation, dict):
        raise EvaluationError(f"evaluation.json must be a JSON object, got {type(evaluation).__name__}")
    if evaluation.get("format") != EVALUATION_FORMAT:
        raise EvaluationError(f"evaluation.json: format {evaluation.get('format')!r} is not {EVALUATION_FORMAT!r}")
    if not evaluation.get("num_test_images"):
        raise EvaluationError("evaluation.json: num_test_images is 0 or missing: the challenger was not tested")

    gates: list[GateResult] = []
    top1 = _number(evaluation, "challenger.top1")
    gates.append(GateResult("overall top-1", top1, f">= {thresholds.min_top1:.4f}", top1 >= thresholds.min_top1))

    new_top1 = _number(evaluation, "challenger.new_sku_top1", optional=True)
    if evaluation.get("new_sku_ids") and new_top1 is None:
        raise EvaluationError("evaluation.json: new SKUs are listed but challenger.new_sku_top1 is missing")
    if new_top1 is None:
        gates.append(GateResult("new-SKU top-1", None, f">= {thresholds.min_new_sku_top1:.4f}", True,
                                "(no new SKUs in this run)"))
    else:
        gates.append(GateResult("new-SKU top-1", new_top1, f">= {thresholds.min_new_sku_top1:.4f}",
                                new_top1 >= thresholds.min_new_sku_top1))

    champion = evaluation.get("champion")
    if champion is None:
        gates.append(GateResult("old-SKU regression", None, f"<= {thresholds.max_old_sku_regression:.4f}", True,
                                "(no champion: first model)"))
    else:
        challenger_old = _number(evaluation, "challenger.old_sku_top1")
        champion_old = _number(evaluation, "champion.old_sku_top1")
        regression = round(champion_old - challenger_old, 6)
        gates.append(GateResult(
            "old-SKU regression", regression, f"<= {thresholds.max_old_sku_regression:.4f}",
            regression <= thresholds.max_old_sku_regression,
            f"(champion {champion_old:.4f} -> challenger {challenger_old:.4f})",
        ))
    passed = all(g.passed for g in gates)
    return Decision(promote=passed or force_promote, forced=force_promote and not passed, gates=gates)
