"""Tag values keep SageMaker's pattern, and the validator checks it (issue #8, point 3).

SageMaker's tag values must match ``[\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*`` (botocore's model, a Java
regex): no commas. The request validator reads ``\\p{...}`` classes with the ``regex`` package
instead of skipping them, and a run of several batches tags its jobs with space-separated ids.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import botocore.session
import pytest
import regex

from sku_retraining.config import load_config
from sku_retraining.jobs.naming import job_name
from sku_retraining.jobs.request import RequestValidationError, validate_request
from sku_retraining.jobs.specs import run_tags
from sku_retraining.operators.training import SkuTrainingOperator

TAG_VALUE_MAX = 256
RUN_ID = "scheduled__2026-12-01T03:00:00+00:00"
SNAPSHOT = {"s3_uri": "s3://sku-retraining-data/datasets/ds-0123456789abcdef/", "num_classes": 12,
            "snapshot_id": "ds-0123456789abcdef"}


def _tag_value_pattern() -> str:
    model = botocore.session.get_session().get_service_model("sagemaker")
    tag = model.operation_model("CreateTrainingJob").input_shape.members["Tags"].member
    return tag.members["Value"].metadata["pattern"]


def _context(batch_ids, run_id=RUN_ID) -> dict:
    ti = SimpleNamespace(dag_id="sku_retraining", task_id="train_model", try_number=1)
    return {"ti": ti, "run_id": run_id, "params": {"batch_ids": batch_ids}}


def _training_request(batch_ids, run_id=RUN_ID) -> dict:
    cfg = load_config(environ={"SKU_RETRAINING_JOB_BACKEND": "sagemaker"})
    operator = SkuTrainingOperator(task_id="train_model", snapshot=SNAPSHOT, production=None)
    return operator.build_request(_context(batch_ids, run_id), cfg, job_name("train", "sku_retraining", run_id))


def test_the_model_pattern_forbids_commas():
    pattern = regex.compile(_tag_value_pattern())
    assert pattern.fullmatch("2026-11-a 2026-11-b") and pattern.fullmatch("Ünïcode +:/=@")
    assert not pattern.fullmatch("2026-11-a,2026-11-b")


def test_a_run_of_two_batches_builds_a_valid_request():
    request = _training_request(["2026-11-a", "2026-11-b"])
    validate_request(request)
    tags = {t["Key"]: t["Value"] for t in request["Tags"]}
    assert tags["batch_ids"] == "2026-11-a 2026-11-b"
    pattern = regex.compile(_tag_value_pattern())
    assert all(pattern.fullmatch(t["Value"]) and len(t["Value"]) <= TAG_VALUE_MAX for t in request["Tags"])


def test_the_validator_checks_unicode_property_patterns():
    request = _training_request(["2026-11-a"])
    bad = copy.deepcopy(request)
    bad["Tags"].append({"Key": "batch_ids_old", "Value": "2026-11-a,2026-11-b"})
    with pytest.raises(RequestValidationError, match=r"Tags\[\d+\]\.Value: '2026-11-a,2026-11-b' does not match"):
        validate_request(bad)
    bad = copy.deepcopy(request)
    bad["Tags"].append({"Key": "bad,key", "Value": "x"})
    with pytest.raises(RequestValidationError, match=r"Tags\[\d+\]\.Key"):
        validate_request(bad)


def test_long_batch_lists_keep_whole_ids_within_256_characters():
    from sku_retraining.jobs.specs import batch_ids_tag

    ids = [f"2026-11-batch-{i:03d}" for i in range(40)]
    value = batch_ids_tag(ids)
    assert len(value) <= TAG_VALUE_MAX and regex.compile(_tag_value_pattern()).fullmatch(value)
    kept = value.split(" ")[:-2]
    assert kept == ids[:len(kept)] and value.endswith(f"+{len(ids) - len(kept)} more")


def test_any_run_id_becomes_a_valid_tag_value():
    from sku_retraining.jobs.specs import safe_tag_value

    assert safe_tag_value("manual__2026-12-01T03:00:00+00:00") == "manual__2026-12-01T03:00:00+00:00"
    assert safe_tag_value("rerun, #2 (fix)") == "rerun_ _2 _fix_"
    tags = run_tags(_context(["b1"], run_id="rerun, #2"))
    assert tags["run_id"] == "rerun_ _2"
