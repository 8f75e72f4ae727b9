"""The intake half end to end against a real PostgreSQL and a moto S3 server.

Each bad input the generator can make gets a clear reason in quarantine or rejection, the
rest of the batch goes through, nothing is lost, and every task is idempotent.
"""

from __future__ import annotations

import time

import pytest

from sku_dev.synthetic import (
    ACCEPTED_BY_CONTENT,
    IMAGE_FAULTS,
    generate_batch,
    make_skus,
    upload_batch,
)
from sku_retraining.config import load_config
from sku_retraining.layout import BatchLayout
from sku_retraining.tasks import intake

# What each injected image fault must be quarantined as.
EXPECTED_CODES = {
    "corrupt_jpeg": {"corrupt_image", "not_an_image"},
    "truncated_jpeg": {"corrupt_image"},
    "zero_byte": {"empty_file"},
    "non_image": {"not_an_image"},
    "wrong_extension": {"unsupported_format"},
    "duplicate_across_skus": {"conflicting_labels"},
    "hostile_path": {"invalid_path", "unknown_sku"},
    "decompression_bomb": {"decompression_bomb"},
    "sixteen_bit_png": {"unsupported_mode"},
    "tiny_image": {"too_small"},
    "hostile_file_names": {"invalid_path"},
}


@pytest.fixture
def cfg(catalogue_conn_env, s3_endpoint, fsx_root):
    config = load_config()
    intake.migrate_catalogue(cfg=config)
    return config


def rows(db, query, *args):
    return db.execute(query, args).fetchall()


def state(db) -> dict:
    return {
        "batches": rows(db, "SELECT batch_id, status, rejection_reason, n_images, n_quarantined FROM batches ORDER BY 1"),
        "skus": rows(db, "SELECT sku_id, class_index FROM skus ORDER BY 1"),
        "images": rows(db, "SELECT sha256, sku_id, fsx_path, split FROM images ORDER BY 1"),
        "quarantine": rows(db, "SELECT object_key, reason_code, reason FROM quarantine ORDER BY 1"),
        "snapshots": rows(db, "SELECT dag_run_id, snapshot_id, counts FROM dataset_snapshots ORDER BY 1"),
    }


def upload(s3_client, batch) -> None:
    upload_batch(s3_client, "sku-retraining-data", batch)


def test_every_bad_image_is_quarantined_with_a_reason_and_the_rest_registers(cfg, db, s3_client):
    batch = generate_batch("b-bad", make_skus(4), 6, seed=7, inject=IMAGE_FAULTS)
    upload(s3_client, batch)

    assert intake.find_new_batches(cfg=cfg).batch_ids == ["b-bad"]
    [result] = intake.register_batches(["b-bad"], run_id="r1", cfg=cfg)
    assert result["status"] == "registered"

    prefix = BatchLayout(cfg.prefixes.incoming, "b-bad").prefix
    quarantined = {key[len(prefix):]: (code, reason) for key, code, reason in
                   rows(db, "SELECT object_key, reason_code, reason FROM quarantine")}
    registered = {path[len(prefix):] for (path,) in rows(db, "SELECT fsx_path FROM images")}

    for key, kind in batch.expected_bad.items():
        if kind in ACCEPTED_BY_CONTENT:
            assert key in registered, f"{key} ({kind}) should be accepted by content"
            continue
        if key not in batch.files:
            continue
        assert key in quarantined, f"{key} ({kind}) was not quarantined"
        code, reason = quarantined[key]
        assert code in EXPECTED_CODES[kind], (key, kind, code, reason)
        assert len(reason) > 10
    # Both copies of a conflicting image are held back: we cannot know which label is right.
    for original in batch.duplicate_of.values():
        assert quarantined[original][0] == "conflicting_labels"
    # Nothing lost: every object under images/ is either registered or quarantined.
    assert registered | set(quarantined) == set(batch.files)
    assert not registered & set(quarantined)
    good = set(batch.good_keys) - set(batch.duplicate_of.values())
    assert good <= registered


@pytest.mark.parametrize(
    ("fault", "reason_part"),
    [
        ("missing_manifest", "manifest.json is missing"),
        ("bad_manifest_json", "not valid UTF-8 JSON"),
        ("manifest_schema_violation", "schema violation"),
        ("hostile_manifest_sku", "does not match"),
    ],
)
def test_bad_manifest_rejects_only_that_batch(cfg, db, s3_client, fault, reason_part):
    upload(s3_client, generate_batch("b-good", make_skus(2), 4, seed=1))
    upload(s3_client, generate_batch("b-broken", make_skus(2, start=50), 4, seed=2, inject=(fault,)))

    found = intake.find_new_batches(cfg=cfg)
    assert found.batch_ids == ["b-good"]
    assert any("b-broken" in m and reason_part in m for m in found.messages), found.messages
    [(status, reason)] = rows(db, "SELECT status, rejection_reason FROM batches WHERE batch_id = 'b-broken'")
    assert status == "rejected" and reason_part in reason
    # Looked at once: not reported again until it is re-uploaded.
    assert intake.find_new_batches(cfg=cfg).messages == []


def test_incomplete_and_hostile_batches_are_not_sensed(cfg, s3_client):
    upload(s3_client, generate_batch("b-partial", make_skus(2), 3, seed=1, inject=("no_success_marker",)))
    s3_client.put_object(Bucket="sku-retraining-data", Key="incoming/bad batch/_SUCCESS", Body=b"")
    found = intake.find_new_batches(cfg=cfg)
    assert found.batch_ids == []
    assert any("'bad batch'" in m for m in found.messages)
    with pytest.raises(ValueError, match="b-partial.*is not complete"):
        intake.find_new_batches(cfg=cfg, explicit_batch_ids=["b-partial"])
    with pytest.raises(ValueError, match="batch_ids"):
        intake.find_new_batches(cfg=cfg, explicit_batch_ids=["../etc"])


def test_empty_batch_is_rejected_and_a_fixed_reupload_is_picked_up(cfg, db, s3_client):
    upload(s3_client, generate_batch("b-empty", make_skus(2), 3, seed=1, inject=("empty_batch",)))
    assert intake.find_new_batches(cfg=cfg).batch_ids == ["b-empty"]
    [result] = intake.register_batches(["b-empty"], run_id="r1", cfg=cfg)
    assert result["status"] == "rejected" and "empty batch" in result["rejection_reason"]
    assert intake.find_new_batches(cfg=cfg).batch_ids == []

    # S3's LastModified has one-second resolution: a corrected re-upload is recognised by a
    # newer _SUCCESS marker, so it must land in a later second than the rejected one.
    time.sleep(1.1)
    upload(s3_client, generate_batch("b-empty", make_skus(2), 3, seed=1))  # marker rewritten last
    assert intake.find_new_batches(cfg=cfg).batch_ids == ["b-empty"]
    [result] = intake.register_batches(["b-empty"], run_id="r2", cfg=cfg)
    assert result["status"] == "registered" and result["n_images"] == 6


def test_every_intake_task_is_idempotent(cfg, db, s3_client, fsx_root):
    upload(s3_client, generate_batch("m1", make_skus(3), 8, seed=1, inject=("truncated_jpeg",)))
    ids = intake.find_new_batches(cfg=cfg).batch_ids

    def run_all():
        intake.migrate_catalogue(cfg=cfg)
        intake.register_batches(ids, run_id="run-1", cfg=cfg)
        intake.import_batches_to_fsx(ids, cfg=cfg)
        return intake.export_manifests(run_id="run-1", batch_ids=ids, cfg=cfg)

    first_snapshot = run_all()
    first_state = state(db)
    first_files = {p.relative_to(fsx_root): p.read_bytes() for p in fsx_root.rglob("*") if p.is_file()}
    assert run_all() == first_snapshot
    assert state(db) == first_state
    assert {p.relative_to(fsx_root): p.read_bytes() for p in fsx_root.rglob("*") if p.is_file()} == first_files

    # What the training job will read: manifests on FSx and in S3, images on FSx.
    manifest_dir = fsx_root / first_snapshot["fsx_path"]
    train_lines = (manifest_dir / "train.csv").read_text().splitlines()
    assert train_lines[0] == "path,class_index,sku_id,sha256"
    for line in train_lines[1:]:
        assert (fsx_root / line.split(",")[0]).is_file()
    key = first_snapshot["fsx_path"] + "classes.json"
    assert s3_client.get_object(Bucket="sku-retraining-data", Key=key)["Body"].read() == (
        manifest_dir / "classes.json"
    ).read_bytes()
    assert sum(first_snapshot["counts"].values()) == len(first_state["images"])


def test_dry_run_writes_nothing(cfg, db, s3_client):
    upload(s3_client, generate_batch("m1", make_skus(2), 5, seed=1))
    [result] = intake.register_batches(["m1"], run_id="dry", dry_run=True, cfg=cfg)
    assert result["status"] == "registered" and result["n_images"] == 10
    assert state(db)["batches"] == [] and state(db)["images"] == []


def test_s3_fault_mid_registration_leaves_no_partial_state(cfg, db, s3_client, monkeypatch):
    upload(s3_client, generate_batch("m1", make_skus(3), 6, seed=1))
    from botocore.exceptions import EndpointConnectionError

    from sku_retraining import intake as intake_module

    real_stage = intake_module._stage_one
    calls = {"n": 0}

    def flaky(client, bucket, layout, key, size, config):
        calls["n"] += 1
        if calls["n"] == 7:
            raise EndpointConnectionError(endpoint_url="http://s3")
        return real_stage(client, bucket, layout, key, size, config)

    monkeypatch.setattr(intake_module, "_stage_one", flaky)
    with pytest.raises(EndpointConnectionError):
        intake.register_batches(["m1"], run_id="r1", cfg=cfg)
    assert state(db)["batches"] == [] and state(db)["images"] == []
    monkeypatch.setattr(intake_module, "_stage_one", real_stage)
    [result] = intake.register_batches(["m1"], run_id="r1", cfg=cfg)  # the retry
    assert result["status"] == "registered" and result["n_images"] == 18
