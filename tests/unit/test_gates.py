"""Promotion gates: each gate failing alone, the first run, force_promote, bad evaluations."""

from __future__ import annotations

import copy

import pytest

from sku_retraining.gates import EvaluationError, Thresholds, decide

THRESHOLDS = Thresholds(min_top1=0.80, min_new_sku_top1=0.70, max_old_sku_regression=0.02)


def evaluation(**challenger) -> dict:
    values = {"top1": 0.90, "top5": 0.99, "new_sku_top1": 0.85, "old_sku_top1": 0.91}
    values.update(challenger)
    return {
        "format": "sku-evaluation/v1",
        "num_test_images": 500,
        "new_sku_ids": ["SKU-NEW-1"],
        "challenger": values,
        "champion": {"top1": 0.92, "old_sku_top1": 0.92, "new_sku_top1": None},
    }


def test_all_gates_pass():
    decision = decide(evaluation(), THRESHOLDS)
    assert decision.decision == "promote" and decision.reasons == []
    assert "decision: PROMOTE" in decision.table()


@pytest.mark.parametrize(
    ("challenger", "failing"),
    [
        ({"top1": 0.79}, "overall top-1"),
        ({"new_sku_top1": 0.69}, "new-SKU top-1"),
        ({"old_sku_top1": 0.899}, "old-SKU regression"),
    ],
)
def test_each_gate_failing_alone_rejects(challenger, failing):
    decision = decide(evaluation(**challenger), THRESHOLDS)
    assert decision.decision == "reject"
    assert [g.gate for g in decision.gates if not g.passed] == [failing]
    assert decision.reasons[0].startswith(failing)


def test_regression_at_the_tolerance_passes():
    assert decide(evaluation(old_sku_top1=0.90), THRESHOLDS).promote  # 0.92 - 0.90 = 0.02


def test_first_run_without_champion_or_new_skus():
    doc = evaluation()
    doc["champion"] = None
    doc["new_sku_ids"] = []
    doc["challenger"]["new_sku_top1"] = None
    decision = decide(doc, THRESHOLDS)
    assert decision.promote
    assert "no champion" in decision.table() and "no new SKUs" in decision.table()


def test_force_promote_overrides_and_is_recorded():
    decision = decide(evaluation(top1=0.1), THRESHOLDS, force_promote=True)
    assert decision.promote and decision.forced and decision.decision == "force_promote"
    assert decision.reasons and "overridden by force_promote" in decision.table()
    assert decide(evaluation(), THRESHOLDS, force_promote=True).decision == "promote"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("format"), "format"),
        (lambda d: d.__setitem__("num_test_images", 0), "num_test_images"),
        (lambda d: d["challenger"].pop("top1"), "challenger.top1 is missing"),
        (lambda d: d["challenger"].__setitem__("top1", "0.9"), "challenger.top1 must be a number"),
        (lambda d: d["challenger"].__setitem__("top1", float("nan")), "challenger.top1 must be a number"),
        (lambda d: d["challenger"].__setitem__("new_sku_top1", None), "new_sku_top1 is missing"),
        (lambda d: d["champion"].pop("old_sku_top1"), "champion.old_sku_top1 is missing"),
    ],
)
def test_malformed_evaluation_is_an_error_not_a_promote(mutate, message):
    doc = copy.deepcopy(evaluation())
    mutate(doc)
    with pytest.raises(EvaluationError, match=message):
        decide(doc, THRESHOLDS)
    with pytest.raises(EvaluationError):
        decide(None, THRESHOLDS, force_promote=True)


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="min_top1"):
        Thresholds(min_top1=1.5, min_new_sku_top1=0.5, max_old_sku_regression=0.0)
