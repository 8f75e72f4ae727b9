"""Evaluation metrics on hand-made predictions, checked against a hand computation.

Eight classes A..H; the champion knows A..F (indices 0-5); G and H are new in this run. Their
SKU ids are not in index order, so a tie broken by position instead of by name shows.
Eleven test images, one of them undecodable (row 5). Per row: true class, the challenger's
top-5, the champion's top-5 (rows 6-8 are classes the champion does not know: whatever it
"predicts" there must not count).
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import numpy as np
import pytest

from sku_contracts import metrics
from sku_jobs.evaluation import (
    ModelScores,
    build_evaluation,
    dumps_evaluation,
    example_rows,
    metric_values,
    model_metrics,
    pair_example_row,
)

A, B, C, D, E, F, G, H = range(8)
CLASSES = ["apple", "milk", "bread", "eggs", "flour", "juice", "cheese", "tea"]  # index A..H
#        true  challenger top-5     champion top-5
ROWS = [
    (A, [A, B, C, D, E], [A, B, C, D, E]),  # 0  chal ok            champ ok
    (A, [B, A, C, D, E], [B, C, D, E, F]),  # 1  chal A->B, top5 ok champ A->B, top5 miss
    (B, [B, A, C, D, E], [A, C, D, E, F]),  # 2  chal ok            champ B->A, top5 miss
    (B, [C, D, E, F, G], [B, A, C, D, E]),  # 3  chal B->C, miss    champ ok
    (C, [B, A, D, E, F], [C, A, B, D, E]),  # 4  chal C->B, miss    champ ok
    (C, [C, A, B, D, E], [C, A, B, D, E]),  # 5  undecodable: counts for nobody
    (G, [G, A, B, C, D], [A, B, C, D, E]),  # 6  chal ok            (champion: unknown class)
    (G, [B, G, A, C, D], [A, B, C, D, E]),  # 7  chal G->B, top5 ok (champion: unknown class)
    (H, [H, A, B, C, D], [A, B, C, D, E]),  # 8  chal ok            (champion: unknown class)
    (F, [F, A, B, C, D], [F, A, B, C, D]),  # 9  chal ok            champ ok
    (A, [B, C, D, E, F], [A, B, C, D, E]),  # 10 chal A->B, miss    champ ok
]
DECODED = [i != 5 for i in range(len(ROWS))]
NEW = ["tea", "cheese"]  # H and G, unsorted on purpose


def _targets() -> np.ndarray:
    return np.array([r[0] for r in ROWS])


def _challenger() -> ModelScores:
    return ModelScores(8, [r[1] for r in ROWS], info={"arch": "resnet18"})


def _champion() -> ModelScores:
    return ModelScores(6, [r[2] for r in ROWS])


def _doc(**overrides) -> dict:
    kwargs = dict(
        targets=_targets(), decoded=DECODED, classes=CLASSES, challenger=_challenger(), champion=_champion(),
        new_sku_ids=NEW, test_manifest_sha256="0" * 64, snapshot_id="ds-1", worst_n=4, pairs_n=20,
    )
    kwargs.update(overrides)
    return build_evaluation(**kwargs)


def test_challenger_metrics_match_hand_computation():
    chal = _doc()["challenger"]
    assert (chal["num_images"], chal["num_skipped"], chal["num_classes"]) == (10, 1, 8)
    assert chal["top1"] == pytest.approx(5 / 10)  # rows 0 2 6 8 9
    assert chal["top5"] == pytest.approx(7 / 10)  # + rows 1 7; misses 3 4 10
    assert chal["per_sku"] == {
        "apple": {"n": 3, "correct": 1, "accuracy": pytest.approx(1 / 3)},  # A
        "milk": {"n": 2, "correct": 1, "accuracy": 0.5},  # B
        "bread": {"n": 1, "correct": 0, "accuracy": 0.0},  # C: its second image (row 5) was unreadable
        "juice": {"n": 1, "correct": 1, "accuracy": 1.0},  # F
        "cheese": {"n": 2, "correct": 1, "accuracy": 0.5},  # G
        "tea": {"n": 1, "correct": 1, "accuracy": 1.0},  # H
    }  # D and E have no test image: not in per_sku and not in the macro mean
    assert chal["macro_accuracy"] == pytest.approx((1 / 3 + 0.5 + 0 + 1 + 0.5 + 1) / 6)
    assert chal["new_sku_top1"] == pytest.approx(2 / 3)  # rows 6 7 8
    assert chal["old_sku_top1"] == pytest.approx(3 / 7)  # rows 0 1 2 3 4 9 10
    # Lowest accuracy first; milk (B) and cheese (G) tie at 0.5 and are ordered by SKU id.
    assert chal["worst_skus"] == [
        {"sku_id": "bread", "accuracy": 0.0, "n": 1},
        {"sku_id": "apple", "accuracy": pytest.approx(1 / 3), "n": 3},
        {"sku_id": "cheese", "accuracy": 0.5, "n": 2},
        {"sku_id": "milk", "accuracy": 0.5, "n": 2},
    ]
    # Most frequent first, ties by (true, predicted) SKU id.
    assert chal["confused_pairs"] == [
        {"true": "apple", "predicted": "milk", "count": 2},  # A->B, rows 1 and 10
        {"true": "bread", "predicted": "milk", "count": 1},  # C->B
        {"true": "cheese", "predicted": "milk", "count": 1},  # G->B
        {"true": "milk", "predicted": "bread", "count": 1},  # B->C
    ]
    assert chal["model"] == {"arch": "resnet18"}


def test_champion_is_scored_on_the_classes_it_knows_only():
    doc = _doc()
    champ = doc["champion"]
    # Rows 0 1 2 3 4 9 10; row 5 (class C, known) is its one skipped image; rows 6-8 are new SKUs.
    assert (champ["num_images"], champ["num_skipped"], champ["num_classes"]) == (7, 1, 6)
    assert champ["top1"] == pytest.approx(5 / 7)  # misses rows 1 and 2
    assert champ["top5"] == pytest.approx(5 / 7)
    assert champ["old_sku_top1"] == pytest.approx(5 / 7)
    assert champ["new_sku_top1"] is None
    assert set(champ["per_sku"]) == {"apple", "milk", "bread", "juice"}  # A B C F
    assert champ["per_sku"]["apple"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert champ["macro_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1 + 1) / 4)
    assert [w["sku_id"] for w in champ["worst_skus"]] == ["milk", "apple", "bread", "juice"]
    assert champ["confused_pairs"] == [{"true": "apple", "predicted": "milk", "count": 1},
                                       {"true": "milk", "predicted": "apple", "count": 1}]
    comp = doc["comparison"]
    assert comp["num_known_images"] == 7
    assert comp["challenger_top1_on_known"] == pytest.approx(3 / 7)
    assert comp["challenger_top5_on_known"] == pytest.approx(4 / 7)
    assert comp["top1_delta_on_known"] == pytest.approx(3 / 7 - 5 / 7)
    assert comp["top5_delta_on_known"] == pytest.approx(4 / 7 - 5 / 7)
    assert comp["old_sku_top1_delta"] == pytest.approx(3 / 7 - 5 / 7)


def test_document_header_and_first_run():
    doc = _doc(champion=None)
    assert doc["format"] == "sku-evaluation/v1"
    assert (doc["num_test_images"], doc["num_classes"], doc["snapshot_id"]) == (11, 8, "ds-1")
    assert doc["new_sku_ids"] == ["cheese", "tea"]
    assert doc["champion"] is None and doc["comparison"] is None
    # No new SKUs: new_sku_top1 is null and every image is an old SKU's.
    chal = _doc(new_sku_ids=[])["challenger"]
    assert chal["new_sku_top1"] is None and chal["old_sku_top1"] == pytest.approx(5 / 10)


def test_top5_with_fewer_than_five_classes_is_top_k():
    targets = np.array([0, 1, 2])
    scores = ModelScores(3, [[1, 2, 0], [0, 2, 1], [2, 0, 1]])
    m = model_metrics(targets, scores, np.ones(3, bool), ["x", "y", "z"], [])
    assert m["top5_k"] == 3 and m["top5"] == 1.0 and m["top1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="topk must be"):
        ModelScores(3, [[1, 2], [0, 2], [2, 0]])  # k must be min(5, 3) = 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"champion": ModelScores(9, [r[1] for r in ROWS])}, "champion has 9 classes, more than"),
        ({"classes": CLASSES[:7]}, "challenger has 8 classes, classes.json 7"),
        ({"targets": np.array([r[0] for r in ROWS[:-1]] + [8])}, "class index is outside"),
        ({"challenger": ModelScores(8, [[9, 0, 1, 2, 3]] + [r[1] for r in ROWS[1:]])}, "predicted class outside"),
    ],
)
def test_inconsistent_inputs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        _doc(**overrides)


# --------------------------------------------------------------------------- serialisation


def test_evaluation_json_is_deterministic_and_rounded():
    text = dumps_evaluation(_doc())
    assert text == dumps_evaluation(_doc())
    parsed = json.loads(text)
    assert parsed["challenger"]["per_sku"]["apple"]["accuracy"] == 0.333333  # 6 decimals
    assert parsed["comparison"]["top1_delta_on_known"] == -0.285714
    assert list(parsed) == sorted(parsed) and list(parsed["challenger"]) == sorted(parsed["challenger"])
    assert text.endswith("}\n") and "e-" not in text

    # The row order of the manifest does not change a byte (ties are broken by name, not position).
    order = list(range(len(ROWS)))
    random.Random(3).shuffle(order)
    shuffled = _doc(
        targets=_targets()[order], decoded=np.array(DECODED)[order],
        challenger=ModelScores(8, np.array([r[1] for r in ROWS])[order], info={"arch": "resnet18"}),
        champion=ModelScores(6, np.array([r[2] for r in ROWS])[order]),
    )
    assert dumps_evaluation(shuffled) == text


def test_serialisation_normalises_negative_zero_and_refuses_nan():
    assert dumps_evaluation({"a": -1e-9, "b": np.float32(0.5), "c": np.int64(3)}) == \
        '{\n  "a": 0.0,\n  "b": 0.5,\n  "c": 3\n}\n'
    with pytest.raises(ValueError, match="non-finite"):
        dumps_evaluation({"a": float("nan")})


# --------------------------------------------------------------------------- metric line


def test_metric_line_round_trips_through_the_regexes():
    doc = _doc()
    line = metrics.format_evaluation_line(metric_values(doc))
    assert line.startswith("METRIC evaluation challenger_top1=0.5000 challenger_top5=0.7000 ")
    assert "old_sku_top1_delta=-0.2857" in line
    found = metrics.parse_evaluation_metric_lines("[1,mpirank:0,algo-1]<stdout>:" + line)
    assert found == {
        "evaluation:challenger:top1": [0.5],
        "evaluation:challenger:top5": [0.7],
        "evaluation:challenger:macro_accuracy": [0.5556],
        "evaluation:challenger:new_sku_top1": [0.6667],
        "evaluation:challenger:old_sku_top1": [0.4286],
        "evaluation:champion:top1": [0.7143],
        "evaluation:champion:old_sku_top1": [0.7143],
        "evaluation:old_sku_top1_delta": [-0.2857],
        "evaluation:top1_delta_on_known": [-0.2857],
    }
    # No champion: its values print as n/a and are not recorded at all.
    first = metrics.format_evaluation_line(metric_values(_doc(champion=None)))
    assert "champion_top1=n/a" in first
    assert set(metrics.parse_evaluation_metric_lines(first)) == {
        "evaluation:challenger:top1", "evaluation:challenger:top5", "evaluation:challenger:macro_accuracy",
        "evaluation:challenger:new_sku_top1", "evaluation:challenger:old_sku_top1",
    }
    # The training job's lines and the evaluation regexes do not see each other.
    assert metrics.parse_evaluation_metric_lines(metrics.format_final_line(3, 0.8, 0.7, 0.9)) == {}
    assert metrics.parse_metric_lines(line) == {}


def test_metrics_module_stays_torch_free():
    """The Airflow side loads metrics.py by path, without torch."""
    tree = ast.parse(Path(metrics.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "re"}, imported


# --------------------------------------------------------------------------- report examples


def test_example_rows_prefer_misclassified_images():
    targets = np.array([0, 0, 1, 0, 0, 0])
    predicted = np.array([0, 1, 1, 2, 0, 1])
    usable = np.array([True, True, True, True, True, False])  # row 5 unreadable
    assert example_rows(targets, predicted, usable, 0, 3) == [1, 3, 0]
    assert example_rows(targets, predicted, usable, 0, 10) == [1, 3, 0, 4]
    assert example_rows(targets, predicted, usable, 0, 0) == []
    assert pair_example_row(targets, predicted, usable, 0, 2) == 3
    assert pair_example_row(targets, predicted, usable, 0, 1) == 1
    assert pair_example_row(targets, predicted, usable, 1, 0) is None
