"""Model promotion against a real PostgreSQL and a moto S3 server.

Versioned (v0001, v0002, numbers never reused), atomic (production.json is untouched by a
failure before it is rewritten), idempotent (a retried task changes nothing), reversible
(rollback to a verified earlier version, and forward again), and rejections recorded.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import psycopg
import pytest

from sku_retraining import promotion as s3p
from sku_retraining.catalogue import models
from sku_retraining.catalogue.migrations import apply_migrations
from sku_retraining.config import load_config
from sku_retraining.tasks import promotion
from sku_retraining.tasks.promotion import RollbackError

BUCKET = "sku-retraining-data"
PREFIX = "models/sku-recognition/"
POINTER = PREFIX + "production.json"


@pytest.fixture
def cfg(catalogue_conn_env, s3_endpoint, fsx_root, pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_migrations(conn)
    return load_config()


def rows(db, query, *args):
    return db.execute(query, args).fetchall()


def db_state(db) -> dict:
    return {
        "versions": rows(db, "SELECT * FROM model_versions ORDER BY model_name, version"),
        "decisions": rows(db, "SELECT * FROM model_decisions ORDER BY model_name, dag_run_id"),
        "history": rows(db, "SELECT * FROM production_history ORDER BY id"),
    }


def s3_objects(s3_client, prefix: str = PREFIX) -> dict[str, tuple[bytes, dict]]:
    """Every key under ``prefix`` with its bytes and user metadata."""
    found = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            got = s3_client.get_object(Bucket=BUCKET, Key=obj["Key"])
            found[obj["Key"]] = (got["Body"].read(), got["Metadata"])
    return found


def pointer_bytes(s3_client) -> bytes:
    return s3_client.get_object(Bucket=BUCKET, Key=POINTER)["Body"].read()


def pointer(s3_client) -> dict:
    return json.loads(pointer_bytes(s3_client))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_outputs(s3_client, tmp_path: Path, tag: str, *, model_size: int = 300_000) -> dict:
    """A training job's model.tar.gz in S3, classes/evaluation bytes and a local report."""
    model = random.Random(tag).randbytes(model_size)
    model_key = f"jobs/train/train-{tag}/output/model.tar.gz"
    s3_client.put_object(Bucket=BUCKET, Key=model_key, Body=model)
    report = tmp_path / f"report-{tag}"
    (report / "plots").mkdir(parents=True, exist_ok=True)
    (report / "examples").mkdir(exist_ok=True)
    (report / "report.html").write_text(f"<html>report {tag}</html>")
    (report / "plots" / "confusion.png").write_bytes(random.Random(tag + "p").randbytes(2000))
    (report / "examples" / "worst-1.jpg").write_bytes(random.Random(tag + "e").randbytes(1500))
    (report / "evaluation.json").write_text("{}")  # the report folder's copy: not published twice
    return {
        "model_tar_uri": f"s3://{BUCKET}/{model_key}",
        "classes_json": json.dumps({"0": "sku-a", "1": f"sku-{tag}"}).encode(),
        "evaluation_json": json.dumps({"format": "sku-evaluation/v1", "challenger": {"top1": 0.91}}).encode(),
        "report_dir": str(report),
    }


LINEAGE = {"batches": ["2025-01"], "jobs": {"training": "train-x"}, "image_uri": "img:1"}
EVALUATION = {"challenger": {"top1": 0.91}}


def promote(cfg, s3_client, tmp_path, run_id: str, **kwargs) -> dict:
    outputs = kwargs.pop("outputs", None) or make_outputs(s3_client, tmp_path, run_id)
    return promotion.promote(run_id=run_id, job_outputs=outputs, lineage={**LINEAGE, "run": run_id},
                             evaluation=EVALUATION, cfg=cfg, **kwargs)


EXPECTED_NAMES = {
    "model.tar.gz", "classes.json", "evaluation.json", "lineage.json",
    "report/report.html", "report/plots/confusion.png", "report/examples/worst-1.jpg",
}


def test_first_promotion_is_v1_and_the_next_run_v2_pointing_back(cfg, db, s3_client, tmp_path):
    outputs = make_outputs(s3_client, tmp_path, "run-1")
    first = promote(cfg, s3_client, tmp_path, "run-1", outputs=outputs)
    assert first["status"] == "promoted" and first["version"] == 1 and first["previous_version"] is None

    p = pointer(s3_client)
    assert p["version"] == 1 and p["previous_version"] is None and p["action"] == "promote"
    assert p["dag_run_id"] == "run-1"
    assert p["s3_prefix"] == f"s3://{BUCKET}/{PREFIX}v0001/"
    assert p["model_uri"] == f"s3://{BUCKET}/{PREFIX}v0001/model.tar.gz"
    assert p["promoted_at"].endswith("Z")
    assert set(p["objects"]) == EXPECTED_NAMES

    # Every object in the table is in S3 with exactly the recorded size, hash and metadata.
    stored = s3_objects(s3_client, PREFIX + "v0001/")
    assert set(stored) == {f"{PREFIX}v0001/{n}" for n in EXPECTED_NAMES}
    for name, entry in p["objects"].items():
        data, metadata = stored[f"{PREFIX}v0001/{name}"]
        assert (len(data), sha(data)) == (entry["size"], entry["sha256"]), name
        assert metadata["sha256"] == entry["sha256"], name
    source = s3_client.get_object(Bucket=BUCKET, Key=outputs["model_tar_uri"][len(f"s3://{BUCKET}/"):])
    assert stored[f"{PREFIX}v0001/model.tar.gz"][0] == source["Body"].read()
    assert stored[f"{PREFIX}v0001/classes.json"][0] == outputs["classes_json"]

    lineage = json.loads(stored[f"{PREFIX}v0001/lineage.json"][0])
    assert lineage["version"] == 1 and lineage["dag_run_id"] == "run-1"
    assert lineage["batches"] == ["2025-01"] and lineage["image_uri"] == "img:1"
    assert lineage["source_model_uri"] == outputs["model_tar_uri"]
    assert lineage["objects"] == {k: v for k, v in p["objects"].items() if k != "lineage.json"}

    second = promote(cfg, s3_client, tmp_path, "run-2")
    assert (second["version"], second["previous_version"]) == (2, 1)
    p2 = pointer(s3_client)
    assert (p2["version"], p2["previous_version"], p2["dag_run_id"]) == (2, 1, "run-2")
    assert rows(db, "SELECT version, dag_run_id, status FROM model_versions ORDER BY version") == [
        (1, "run-1", "promoted"), (2, "run-2", "promoted"),
    ]
    assert rows(db, "SELECT version, previous_version, action, dag_run_id FROM production_history ORDER BY id") == [
        (1, None, "promote", "run-1"), (2, 1, "promote", "run-2"),
    ]
    [(objects,)] = rows(db, "SELECT objects FROM model_versions WHERE version = 2")
    assert objects == p2["objects"]
    # v0001 is untouched by v0002.
    assert s3_objects(s3_client, PREFIX + "v0001/") == stored


def test_promoting_twice_for_one_run_changes_nothing(cfg, db, s3_client, tmp_path):
    promote(cfg, s3_client, tmp_path, "run-1")
    outputs = make_outputs(s3_client, tmp_path, "run-2")
    first = promote(cfg, s3_client, tmp_path, "run-2", outputs=outputs)
    before_s3, before_db = s3_objects(s3_client), db_state(db)

    again = promote(cfg, s3_client, tmp_path, "run-2", outputs=outputs)
    assert again["status"] == "already_promoted"
    assert (again["version"], again["previous_version"]) == (2, 1)  # not "previous = itself"
    assert again["objects"] == first["objects"]
    assert s3_objects(s3_client) == before_s3
    assert db_state(db) == before_db
    assert pointer(s3_client)["previous_version"] == 1


@pytest.mark.parametrize("fault", ["verify", "lineage", "pointer_write"])
def test_a_fault_before_the_pointer_leaves_production_as_it_was(cfg, db, s3_client, tmp_path, fault):
    promote(cfg, s3_client, tmp_path, "run-1")
    production = pointer_bytes(s3_client)
    history = db_state(db)["history"]
    outputs = make_outputs(s3_client, tmp_path, "run-2")

    class Injected(RuntimeError):
        pass

    def boom(*args, **kwargs):
        raise Injected(fault)

    target = {"verify": "verify_objects", "lineage": "build_lineage", "pointer_write": "write_pointer"}[fault]
    # (A context of its own: the fixtures' monkeypatch holds the connection environment.)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(s3p, target, boom)
        with pytest.raises(Injected):
            promote(cfg, s3_client, tmp_path, "run-2", outputs=outputs)

    assert pointer_bytes(s3_client) == production
    assert rows(db, "SELECT version, status, promoted_at, objects FROM model_versions WHERE dag_run_id = 'run-2'") == [
        (2, "staged", None, None),
    ]
    assert db_state(db)["history"] == history

    retried = promote(cfg, s3_client, tmp_path, "run-2", outputs=outputs)
    assert (retried["status"], retried["version"], retried["previous_version"]) == ("promoted", 2, 1)
    assert (pointer(s3_client)["version"], pointer(s3_client)["previous_version"]) == (2, 1)
    # The abandoned try allocated no extra number.
    assert rows(db, "SELECT version FROM model_versions ORDER BY version") == [(1,), (2,)]


def test_a_crash_after_the_pointer_write_is_finished_by_the_retry(cfg, db, s3_client, tmp_path):
    promote(cfg, s3_client, tmp_path, "run-1")
    outputs = make_outputs(s3_client, tmp_path, "run-2")

    def db_down(*args, **kwargs):
        raise psycopg.OperationalError("connection lost")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "mark_promoted", db_down)
        with pytest.raises(psycopg.OperationalError):
            promote(cfg, s3_client, tmp_path, "run-2", outputs=outputs)
    written = pointer_bytes(s3_client)
    assert json.loads(written)["version"] == 2
    assert rows(db, "SELECT status FROM model_versions WHERE version = 2") == [("staged",)]

    retried = promote(cfg, s3_client, tmp_path, "run-2", outputs=outputs)
    assert (retried["version"], retried["previous_version"]) == (2, 1)
    assert pointer_bytes(s3_client) == written  # kept, not rewritten with a new time
    assert rows(db, "SELECT version, previous_version, action FROM production_history ORDER BY id") == [
        (1, None, "promote"), (2, 1, "promote"),
    ]
    [(promoted_at,)] = rows(db, "SELECT promoted_at FROM model_versions WHERE version = 2")
    assert models.iso_utc(promoted_at) == json.loads(written)["promoted_at"]


def test_a_bad_copy_is_caught_before_the_pointer(cfg, db, s3_client, tmp_path, monkeypatch):
    promote(cfg, s3_client, tmp_path, "run-1")
    production = pointer_bytes(s3_client)
    real_copy = s3p.copy_model_archive

    def corrupting_copy(client, source_uri, bucket, key):
        entry, etag = real_copy(client, source_uri, bucket, key)
        # Same size and metadata, different bytes: only the content check can see it.
        data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[100] ^= 0xFF
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data), Metadata={"sha256": entry["sha256"]})
        return entry, etag

    monkeypatch.setattr(s3p, "copy_model_archive", corrupting_copy)
    with pytest.raises(s3p.VerificationError, match=r"model\.tar\.gz: content sha256"):
        promote(cfg, s3_client, tmp_path, "run-2")
    assert pointer_bytes(s3_client) == production


def test_large_archives_are_copied_in_parts_and_verified_by_content(cfg, s3_client, tmp_path, monkeypatch):
    monkeypatch.setattr(s3p, "SINGLE_COPY_LIMIT", 5 * 1024 * 1024)
    monkeypatch.setattr(s3p, "MULTIPART_COPY_CHUNK", 5 * 1024 * 1024)
    outputs = make_outputs(s3_client, tmp_path, "big", model_size=11 * 1024 * 1024)
    result = promote(cfg, s3_client, tmp_path, "run-big", outputs=outputs)
    key = f"{PREFIX}v0001/model.tar.gz"
    copied = s3_client.head_object(Bucket=BUCKET, Key=key)
    assert copied["ETag"].strip('"').endswith("-3")  # really a multipart copy
    data = s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    source = s3_client.get_object(Bucket=BUCKET, Key="jobs/train/train-big/output/model.tar.gz")["Body"].read()
    assert data == source
    assert result["objects"]["model.tar.gz"] == {"size": len(data), "sha256": sha(data)}


def test_outputs_from_the_dag_xcoms_and_an_s3_report(cfg, s3_client, tmp_path):
    local = make_outputs(s3_client, tmp_path, "x")
    s3_client.put_object(Bucket=BUCKET, Key="datasets/snap1/classes.json", Body=local["classes_json"])
    report = "jobs/evaluate/eval-1/report/"
    for name, body in (("evaluation.json", local["evaluation_json"]), ("report.html", b"<html/>"),
                       ("plots/a.png", b"png")):
        s3_client.put_object(Bucket=BUCKET, Key=report + name, Body=body)
    training = {"Training": {
        "TrainingJobName": "train-1", "ModelArtifacts": {"S3ModelArtifacts": local["model_tar_uri"]},
        "AlgorithmSpecification": {"TrainingImage": "123.dkr.ecr/train:1"},
        "FinalMetricDataList": [{"MetricName": "test:top1", "Value": 0.9}],
    }}
    snapshot = {"snapshot_id": "snap1", "s3_uri": f"s3://{BUCKET}/datasets/snap1/", "batch_ids": ["b1", "b2"],
                "files": {"train.csv": "ab" * 32}, "counts": {"train": 10}, "num_classes": 2}
    evaluation_result = {"evaluation": {"challenger": {"top1": 0.9, "new_sku_top1": 0.8}},
                         "evaluation_s3_uri": f"s3://{BUCKET}/{report}evaluation.json",
                         "report_s3_prefix": f"s3://{BUCKET}/{report}", "evaluation_job": "eval-1"}
    outputs = promotion.job_outputs_from_results(training=training, snapshot=snapshot,
                                                 evaluation_result=evaluation_result)
    lineage = promotion.lineage_from_results(training=training, snapshot=snapshot,
                                             evaluation_result=evaluation_result)
    result = promotion.promote(run_id="run-x", job_outputs=outputs, lineage=lineage,
                               evaluation=evaluation_result["evaluation"], cfg=cfg)
    assert set(result["objects"]) == {"model.tar.gz", "classes.json", "evaluation.json", "lineage.json",
                                      "report/report.html", "report/plots/a.png"}
    written = json.loads(s3_client.get_object(Bucket=BUCKET, Key=f"{PREFIX}v0001/lineage.json")["Body"].read())
    assert written["batches"] == ["b1", "b2"]
    assert written["dataset"]["manifest_sha256"] == {"train.csv": "ab" * 32}
    assert written["jobs"] == {"training": "train-1", "evaluation": "eval-1"}
    assert written["image_uri"] == "123.dkr.ecr/train:1"
    assert written["metrics"]["training"] == {"test:top1": 0.9}
    assert written["metrics"]["evaluation"]["new_sku_top1"] == 0.8


def test_rollback_to_the_previous_version_and_forward_again(cfg, db, s3_client, tmp_path):
    promote(cfg, s3_client, tmp_path, "run-1")
    promote(cfg, s3_client, tmp_path, "run-2")
    [(v1_objects,)] = rows(db, "SELECT objects FROM model_versions WHERE version = 1")

    back = promotion.rollback(target_version=None, run_id="rb-1", cfg=cfg)
    assert (back["status"], back["version"], back["previous_version"]) == ("rolled_back", 1, 2)
    p = pointer(s3_client)
    assert (p["version"], p["previous_version"], p["action"], p["dag_run_id"]) == (1, 2, "rollback", "rb-1")
    assert p["s3_prefix"] == f"s3://{BUCKET}/{PREFIX}v0001/" and p["objects"] == v1_objects
    assert promotion.read_production(cfg) == p

    # A retry of the same rollback does not flip production back to v2.
    retry = promotion.rollback(target_version=None, run_id="rb-1", cfg=cfg)
    assert retry["status"] == "noop" and pointer(s3_client) == p

    # Rolling back to what is in production says so and writes nothing.
    before = pointer_bytes(s3_client)
    noop = promotion.rollback(target_version=1, run_id="rb-x", cfg=cfg)
    assert noop["status"] == "noop" and "already in production" in noop["message"]
    assert pointer_bytes(s3_client) == before

    forward = promotion.rollback(target_version=None, run_id="rb-2", cfg=cfg)
    assert (forward["version"], forward["previous_version"]) == (2, 1)
    assert (pointer(s3_client)["version"], pointer(s3_client)["previous_version"]) == (2, 1)
    assert rows(db, "SELECT version, previous_version, action, dag_run_id FROM production_history ORDER BY id") == [
        (1, None, "promote", "run-1"), (2, 1, "promote", "run-2"),
        (1, 2, "rollback", "rb-1"), (2, 1, "rollback", "rb-2"),
    ]

    # The next promotion follows what production is now.
    third = promote(cfg, s3_client, tmp_path, "run-3")
    assert (third["version"], third["previous_version"]) == (3, 2)


def _overwrite(s3_client, key: str, data: bytes, *, keep_metadata: bool) -> None:
    metadata = s3_client.head_object(Bucket=BUCKET, Key=key)["Metadata"] if keep_metadata else {}
    s3_client.put_object(Bucket=BUCKET, Key=key, Body=data, Metadata=metadata)


@pytest.mark.parametrize(
    ("damage", "name", "message"),
    [
        ("delete", "report/plots/confusion.png", "report/plots/confusion.png: missing"),
        ("truncate", "classes.json", "classes.json: size"),
        ("replace_metadata", "evaluation.json", "evaluation.json: sha256 metadata"),
        ("flip_byte", "model.tar.gz", "model.tar.gz: content sha256"),
    ],
)
def test_rollback_refuses_a_damaged_version(cfg, db, s3_client, tmp_path, damage, name, message):
    promote(cfg, s3_client, tmp_path, "run-1")
    promote(cfg, s3_client, tmp_path, "run-2")
    key = f"{PREFIX}v0001/{name}"
    data = s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    if damage == "delete":
        s3_client.delete_object(Bucket=BUCKET, Key=key)
    elif damage == "truncate":
        _overwrite(s3_client, key, data[:-1], keep_metadata=True)
    elif damage == "replace_metadata":
        _overwrite(s3_client, key, data, keep_metadata=False)
    else:
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01
        _overwrite(s3_client, key, bytes(flipped), keep_metadata=True)
    production, history = pointer_bytes(s3_client), db_state(db)["history"]

    with pytest.raises(RollbackError, match="v0001") as raised:
        promotion.rollback(target_version=1, run_id="rb-1", cfg=cfg)
    assert message in str(raised.value)
    assert pointer_bytes(s3_client) == production
    assert db_state(db)["history"] == history


def test_rollback_refusals_say_why(cfg, db, s3_client, tmp_path):
    with pytest.raises(RollbackError, match="no production pointer"):
        promotion.rollback(run_id="rb", cfg=cfg)
    promote(cfg, s3_client, tmp_path, "run-1")
    with pytest.raises(RollbackError, match="no previous version"):
        promotion.rollback(run_id="rb", cfg=cfg)
    with pytest.raises(RollbackError, match="no version 7"):
        promotion.rollback(target_version=7, run_id="rb", cfg=cfg)

    def down(*args, **kwargs):
        raise RuntimeError("down")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(s3p, "write_pointer", down)
        with pytest.raises(RuntimeError, match="down"):
            promote(cfg, s3_client, tmp_path, "run-2")
    with pytest.raises(RollbackError, match=r"v0002 was never promoted \(status staged\)"):
        promotion.rollback(target_version=2, run_id="rb", cfg=cfg)
    assert pointer(s3_client)["version"] == 1


def test_rejection_is_recorded_and_touches_no_s3(cfg, db, s3_client, tmp_path):
    before = s3_objects(s3_client, "")
    gates = [{"gate": "overall top-1", "value": 0.5, "threshold": ">= 0.8000", "passed": False, "note": ""}]
    reasons = ["overall top-1 0.5000 does not meet >= 0.8000"]
    row = promotion.record_rejection(run_id="run-r", reasons=reasons, gates=gates, cfg=cfg)
    assert (row["decision"], row["reasons"], row["gates"], row["version"]) == ("reject", reasons, gates, None)
    state = db_state(db)
    promotion.record_rejection(run_id="run-r", reasons=reasons, gates=gates, cfg=cfg)
    assert db_state(db) == state  # idempotent, updated_at included
    assert s3_objects(s3_client, "") == before
    assert promotion.read_production(cfg) is None
    assert state["versions"] == [] and state["history"] == []

    # A rejected run is not promoted by accident...
    with pytest.raises(s3p.PromotionError, match="was rejected"):
        promote(cfg, s3_client, tmp_path, "run-r")
    assert promotion.read_production(cfg) is None
    # ...but an explicit force_promote decision does, and is recorded with its version.
    forced = {"decision": "force_promote", "reasons": reasons, "gates": gates}
    result = promote(cfg, s3_client, tmp_path, "run-r", decision=forced)
    assert result["version"] == 1
    assert rows(db, "SELECT decision, reasons, version FROM model_decisions WHERE dag_run_id = 'run-r'") == [
        ("force_promote", reasons, 1),
    ]
    with pytest.raises(models.RegistryError, match="already promoted"):
        promotion.record_rejection(run_id="run-r", reasons=reasons, gates=gates, cfg=cfg)


def test_promote_decision_keeps_the_gates_the_branch_recorded(cfg, db, s3_client, tmp_path):
    gates = [{"gate": "overall top-1", "value": 0.95, "threshold": ">= 0.8000", "passed": True, "note": ""}]
    promotion.record_decision(run_id="run-1", decision="promote", reasons=[], gates=gates, cfg=cfg)
    promote(cfg, s3_client, tmp_path, "run-1")
    assert rows(db, "SELECT decision, gates, version FROM model_decisions") == [("promote", gates, 1)]


def test_concurrent_runs_get_distinct_numbers_and_a_run_keeps_its_own(cfg, pg_dsn):
    from concurrent.futures import ThreadPoolExecutor

    def allocate(run_id: str) -> int:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            return models.allocate_version(
                conn, model_name="m", run_id=run_id, s3_prefix_for=lambda v: f"s3://b/m/v{v:04d}/"
            ).version

    runs = [f"run-{i % 6}" for i in range(12)]  # every run asks twice, at the same time
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(allocate, runs))
    by_run = {}
    for run_id, version in zip(runs, got, strict=True):
        assert by_run.setdefault(run_id, version) == version, run_id
    assert sorted(by_run.values()) == [1, 2, 3, 4, 5, 6]
