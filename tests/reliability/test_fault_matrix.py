"""The fault matrix: one row per bad input or fault, each injected into a real run of the
pipeline's task functions on the local stack (real PostgreSQL, the moto S3 server, a local
FSx folder), then the same invariants (``sku_dev.invariants``) checked after every row.

Each row starts from a catalogue that already holds a registered month (``m0``), so "class
indices unchanged" and "no image changes split" are checked against real earlier state, and
from a promoted production model, so "production.json points at a complete version" always
has something to check. docs/reliability.md lists every row with what it proves.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import job_faults  # tests/reliability/job_faults.py (pytest puts this folder on sys.path)
import pytest
from botocore.exceptions import EndpointConnectionError

from sku_dev import invariants
from sku_dev.local_stack import CATALOGUE_CONN_ID
from sku_dev.synthetic import generate_batch, make_skus, upload_batch
from sku_retraining.config import load_config
from sku_retraining.tasks import intake

BUCKET = "sku-retraining-data"
SECRET = "matrix-Catalogue-Pw-7f3e"  # noqa: S105 - the value no log or XCom may contain
SIZE = 48  # pixels: the intake's cost is per file, not per pixel


@dataclass
class Run:
    """What a row's run produced: task results (what would be XCom) and what to expect."""

    results: list = field(default_factory=list)
    expect_quarantine: set[str] = field(default_factory=set)  # reason codes that must appear
    expect_rejection: str | None = None  # text in a rejected batch's reason
    expect_violations: tuple[str, ...] = ()  # invariant messages this row *must* produce


@pytest.fixture
def stack(catalogue_conn_env, s3_endpoint, fsx_root, pg_dsn, postgres_server, monkeypatch, s3_client, db):
    """The local stack with a password on the catalogue connection (trust auth ignores it; the
    tasks still carry it) and a baseline: month m0 registered, exported and promoted as v0001."""
    from psycopg2.extensions import parse_dsn

    info = {"conn_type": "postgres", "host": "127.0.0.1", "port": postgres_server.port,
            "login": postgres_server.role, "password": SECRET, "schema": parse_dsn(pg_dsn)["dbname"]}
    monkeypatch.setenv(f"AIRFLOW_CONN_{CATALOGUE_CONN_ID.upper()}", json.dumps(info))
    cfg = load_config()
    intake.migrate_catalogue(cfg=cfg)
    upload_batch(s3_client, BUCKET, generate_batch("m0", make_skus(3), 5, seed=100, image_size=SIZE))
    results = run_intake(cfg)
    promote_fake_model(cfg, s3_client, fsx_root, "baseline", results[-1])
    return cfg


def run_intake(cfg, *, run_id: str = "run-1", batch_ids: list[str] | None = None) -> list:
    """The DAG's intake tasks in order, as the task callables call them."""
    ids = batch_ids if batch_ids is not None else intake.find_new_batches(cfg=cfg).batch_ids
    registered = intake.register_batches(ids, run_id=run_id, cfg=cfg)
    imported = intake.import_batches_to_fsx(ids, cfg=cfg)
    snapshot = intake.export_manifests(run_id=run_id, batch_ids=ids, cfg=cfg)
    return [ids, registered, imported, snapshot]


def fake_job_outputs(s3_client, tmp: Path, tag: str) -> dict:
    """What a training + evaluation job leaves (the bytes do not matter to promotion)."""
    body = hashlib.sha256(tag.encode()).digest() * 4096
    key = f"jobs/train/sku-train-{tag}/output/model.tar.gz"
    s3_client.put_object(Bucket=BUCKET, Key=key, Body=body)
    report = tmp / f"report-{tag}"
    report.mkdir(parents=True, exist_ok=True)
    (report / "report.html").write_text(f"<html>{tag}</html>")
    return {"model_tar_uri": f"s3://{BUCKET}/{key}", "classes_json": b'{"classes": []}',
            "evaluation_json": json.dumps({"challenger": {"top1": 0.9}}).encode(), "report_dir": str(report)}


def promote_fake_model(cfg, s3_client, tmp: Path, run_id: str, snapshot: dict) -> dict:
    from sku_retraining.tasks import promotion

    lineage = {"batches": snapshot["batch_ids"], "dataset": {"snapshot_id": snapshot["snapshot_id"]},
               "jobs": {"training": f"sku-train-{run_id}"}, "image_uri": "sku-retraining-training:local"}
    return promotion.promote(run_id=run_id, job_outputs=fake_job_outputs(s3_client, tmp, run_id),
                             lineage=lineage, evaluation={"challenger": {"top1": 0.9}}, cfg=cfg)


def upload(s3_client, batch_id: str, *, inject=(), skus=None, seed: int = 1, n: int = 4):
    batch = generate_batch(batch_id, skus or make_skus(2, start=10), n, seed=seed, image_size=SIZE, inject=inject)
    upload_batch(s3_client, BUCKET, batch)
    return batch


# -- bad inputs ---------------------------------------------------------------------------------


def bad_image(kind: str, codes: set[str]) -> Callable:
    def row(cfg, s3_client, tmp, monkeypatch) -> Run:
        upload(s3_client, "m1", inject=(kind,))
        return Run(run_intake(cfg), expect_quarantine=codes)
    return row


def accepted_by_content(kind: str) -> Callable:
    def row(cfg, s3_client, tmp, monkeypatch) -> Run:
        batch = upload(s3_client, "m1", inject=(kind,))
        run = Run(run_intake(cfg))
        [key] = [k for k, v in batch.expected_bad.items() if v == kind]
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(batch.files[key])) as img:
            upright = ImageOps.exif_transpose(img).size
        with _db(cfg) as conn:
            row_ = conn.execute("SELECT width, height FROM images WHERE fsx_path = %s", (f"incoming/m1/{key}",)).fetchone()
        assert row_ == upright, f"{kind}: registered {row_}, upright {upright}"
        return run
    return row


def bad_manifest(kind: str, reason: str) -> Callable:
    def row(cfg, s3_client, tmp, monkeypatch) -> Run:
        upload(s3_client, "m1", inject=(kind,))
        return Run(run_intake(cfg, batch_ids=intake.find_new_batches(cfg=cfg).batch_ids), expect_rejection=reason)
    return row


def sku_without_images(cfg, s3_client, tmp, monkeypatch) -> Run:
    batch = generate_batch("m1", make_skus(3, start=10), 4, seed=1, image_size=SIZE)
    lonely = batch.manifest["skus"][2]["sku_id"]
    batch.files = {k: v for k, v in batch.files.items() if f"/{lonely}/" not in k}
    upload_batch(s3_client, BUCKET, batch)
    run = Run(run_intake(cfg))
    with _db(cfg) as conn:
        assert conn.execute("SELECT count(*) FROM skus WHERE sku_id = %s", (lonely,)).fetchone()[0] == 0
    return run


def duplicate_across_batches(cfg, s3_client, tmp, monkeypatch) -> Run:
    batch = generate_batch("m1", make_skus(2, start=10), 4, seed=1, image_size=SIZE)
    old_key = next(iter(generate_batch("m0", make_skus(3), 5, seed=100, image_size=SIZE).files.items()))
    batch.files["images/SKU-000010/img_9999.jpg"] = old_key[1]  # m0's picture under another SKU
    upload_batch(s3_client, BUCKET, batch)
    return Run(run_intake(cfg), expect_quarantine={"duplicate", "conflicting_labels"})


def empty_batch(cfg, s3_client, tmp, monkeypatch) -> Run:
    upload(s3_client, "m1", inject=("empty_batch",))
    ids = intake.find_new_batches(cfg=cfg).batch_ids
    return Run([intake.register_batches(ids, run_id="run-1", cfg=cfg)], expect_rejection="empty batch")


def reupload_changed_bytes(cfg, s3_client, tmp, monkeypatch) -> Run:
    with _db(cfg) as conn:
        before = conn.execute("SELECT sha256, fsx_path FROM images ORDER BY 1").fetchall()
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    original = generate_batch("m0", make_skus(3), 5, seed=100, image_size=SIZE)
    changed = generate_batch("m0", make_skus(3), 5, seed=999, image_size=SIZE)
    upload_batch(s3_client, BUCKET, changed)
    assert intake.find_new_batches(cfg=cfg).batch_ids == []  # registered batches are immutable
    results = intake.register_batches(["m0"], run_id="run-1", cfg=cfg)
    assert results[0]["status"] == "already_registered"
    with _db(cfg) as conn:
        assert conn.execute("SELECT sha256, fsx_path FROM images ORDER BY 1").fetchall() == before
    # Keys the re-upload added (other seed: some .png where there were .jpg) are never
    # registered: the registering run records each as late_object, so none is lost.
    added = sorted(set(changed.files) - set(original.files))
    assert added, "the re-upload must add keys for this row to prove anything"
    _assert_late(cfg, "m0", [f"incoming/m0/{k}" for k in added])
    return Run([results])  # (the matrix's code check skips m0; _assert_late checked it)


def _assert_late(cfg, batch_id: str, keys: list[str]) -> None:
    with _db(cfg) as conn:
        got = dict(conn.execute("SELECT object_key, reason FROM quarantine WHERE batch_id = %s "
                                "AND reason_code = 'late_object'", (batch_id,)).fetchall())
        n_quarantined = conn.execute("SELECT n_quarantined FROM batches WHERE batch_id = %s", (batch_id,)).fetchone()[0]
        n_rows = conn.execute("SELECT count(*) FROM quarantine WHERE batch_id = %s", (batch_id,)).fetchone()[0]
    assert sorted(got) == sorted(keys), (sorted(got), keys)
    assert all("after the batch was registered" in r for r in got.values()), got
    assert n_quarantined == n_rows


def success_before_images(cfg, s3_client, tmp, monkeypatch) -> Run:
    batch = generate_batch("m1", make_skus(2, start=10), 4, seed=1, image_size=SIZE)
    keys = sorted(batch.files)
    late = keys[len(keys) // 2:]
    for key in keys[: len(keys) // 2]:
        s3_client.put_object(Bucket=BUCKET, Key=f"incoming/m1/{key}", Body=batch.files[key])
    s3_client.put_object(Bucket=BUCKET, Key="incoming/m1/manifest.json", Body=batch.manifest_bytes)
    s3_client.put_object(Bucket=BUCKET, Key="incoming/m1/_SUCCESS", Body=b"")
    run = Run(run_intake(cfg))
    for key in late:  # the rest of the upload lands after registration
        s3_client.put_object(Bucket=BUCKET, Key=f"incoming/m1/{key}", Body=batch.files[key])
    # The batch is immutable (_SUCCESS was the contract's "complete"), so the late half is never
    # trained on; the next registering run (here: next month's, with batch m2) records each
    # late file as late_object with its times, so none is lost.
    upload(s3_client, "m2", skus=make_skus(2, start=20), seed=2)
    run.results.extend(run_intake(cfg, run_id="run-2"))
    _assert_late(cfg, "m1", [f"incoming/m1/{k}" for k in late])
    again = intake.register_batches([], run_id="run-3", cfg=cfg)  # a repeat records nothing twice
    _assert_late(cfg, "m1", [f"incoming/m1/{k}" for k in late])
    run.results.append(again)
    run.expect_quarantine = {"late_object"}
    return run


# -- faults ---------------------------------------------------------------------------------------


def s3_down_mid_upload(cfg, s3_client, tmp, monkeypatch) -> Run:
    """S3 goes away while the batch is being read (registration downloads every image)."""
    from sku_retraining import intake as intake_module

    upload(s3_client, "m1")
    real, calls = intake_module._stage_one, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise EndpointConnectionError(endpoint_url="http://s3")
        return real(*args, **kwargs)

    monkeypatch.setattr(intake_module, "_stage_one", flaky)
    ids = intake.find_new_batches(cfg=cfg).batch_ids
    with pytest.raises(EndpointConnectionError):
        intake.register_batches(ids, run_id="run-1", cfg=cfg)
    with _db(cfg) as conn:
        assert conn.execute("SELECT count(*) FROM batches WHERE batch_id = 'm1'").fetchone()[0] == 0
    return Run(run_intake(cfg, batch_ids=ids))  # the task's retry


def postgres_connection_killed_mid_registration(cfg, s3_client, tmp, monkeypatch) -> Run:
    """The catalogue's server drops the registering session mid-transaction (what a server
    restart does to it); the retried task registers the batch exactly once."""
    from sku_retraining.catalogue import registration

    upload(s3_client, "m1", inject=("corrupt_jpeg",))
    real, fired = registration._copy_rows, {"done": False}

    def killed(cur, *args, **kwargs):
        n = real(cur, *args, **kwargs)
        if not fired["done"]:
            fired["done"] = True
            pid = cur.connection.info.backend_pid
            with _db(cfg) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return n

    monkeypatch.setattr(registration, "_copy_rows", killed)
    ids = intake.find_new_batches(cfg=cfg).batch_ids
    with pytest.raises(Exception, match="(?i)terminat|connection|closed"):
        intake.register_batches(ids, run_id="run-1", cfg=cfg)
    with _db(cfg) as conn:
        assert conn.execute("SELECT count(*) FROM images WHERE batch_id = 'm1'").fetchone()[0] == 0
    return Run(run_intake(cfg, batch_ids=ids), expect_quarantine={"corrupt_image", "not_an_image"})


def postgres_server_restarted_mid_registration(cfg, s3_client, tmp, monkeypatch) -> Run:
    """A real server stop (fast shutdown: every session cut, postmaster gone) right after the
    registering transaction's COPY, then a start on the same port and the task's retry. On a
    dedicated server of its own, so the suite's shared server is never stopped; the row checks
    the catalogue invariants on that server and leaves the shared catalogue untouched."""
    import shutil

    from sku_dev.local_stack import (
        SHARED_TMP,
        PostgresServer,
        airflow_postgres_conn,
        free_port,
        reachable_data_dir,
    )
    from sku_retraining.catalogue import registration

    shared_conn = os.environ[f"AIRFLOW_CONN_{CATALOGUE_CONN_ID.upper()}"]
    data_dir = reachable_data_dir(tmp / "pg-restart", key=str(tmp / "pg-restart"))  # as tests/conftest.py
    server = PostgresServer(data_dir, free_port(), fsync=False)
    server.start()
    try:
        monkeypatch.setenv(f"AIRFLOW_CONN_{CATALOGUE_CONN_ID.upper()}",
                           airflow_postgres_conn(server.port, server.database, server.role))
        intake.migrate_catalogue(cfg=cfg)
        upload(s3_client, "m1", inject=("corrupt_jpeg",))
        real, fired = registration._copy_rows, {"done": False}

        def stopped(cur, *args, **kwargs):
            n = real(cur, *args, **kwargs)
            if not fired["done"]:
                fired["done"] = True
                server.stop()
            return n

        monkeypatch.setattr(registration, "_copy_rows", stopped)
        with pytest.raises(Exception, match="(?i)terminat|connection|closed|shut"):
            intake.register_batches(["m1"], run_id="run-1", cfg=cfg)
        assert fired["done"] and not server.is_running()
        server.start()  # same data dir, same port
        with _db(cfg) as conn:
            assert conn.execute("SELECT count(*) FROM images WHERE batch_id = 'm1'").fetchone()[0] == 0
        results = run_intake(cfg, batch_ids=["m1"])  # the task's retry
        assert [r["status"] for r in results[1]] == ["registered"]
        with _db(cfg) as conn:
            own = invariants.check_all(conn, s3_client, bucket=BUCKET, secret=SECRET, results=results)
            n = conn.execute("SELECT count(*), count(DISTINCT fsx_path) FROM images WHERE batch_id = 'm1' "
                             "AND source_sha256 IS NULL").fetchone()
        # The shared production pointer names v0001 of the shared catalogue, not of this one.
        assert [v for v in own.violations if "production.json" not in v] == [], own.violations
        assert own.facts["originals"] + own.facts["quarantined"] == own.facts["uploaded"] and n[0] == n[1] > 0
    finally:
        monkeypatch.setenv(f"AIRFLOW_CONN_{CATALOGUE_CONN_ID.upper()}", shared_conn)
        server.stop()
        shutil.rmtree(data_dir.parent if data_dir.parent.parent == SHARED_TMP else data_dir, ignore_errors=True)
    return Run(results)


def _register_then_hang(conn_env: str, ids: list[str], ready) -> None:  # pragma: no cover - child
    os.environ[f"AIRFLOW_CONN_{CATALOGUE_CONN_ID.upper()}"] = conn_env
    from sku_retraining.catalogue import registration

    real = registration._copy_rows

    def hang(cur, *args, **kwargs):
        n = real(cur, *args, **kwargs)
        ready.set()
        time.sleep(600)  # SIGKILLed here, mid-transaction
        return n

    registration._copy_rows = hang
    intake.register_batches(ids, run_id="run-1", cfg=load_config())


def worker_sigkilled_mid_registration(cfg, s3_client, tmp, monkeypatch) -> Run:
    upload(s3_client, "m1")
    ids = intake.find_new_batches(cfg=cfg).batch_ids
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_register_then_hang,
                        args=(os.environ[f"AIRFLOW_CONN_{CATALOGUE_CONN_ID.upper()}"], ids, ready))
    child.start()
    try:
        assert ready.wait(120), "registration never reached its COPY"
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    finally:
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            child.join()
    assert child.exitcode == -signal.SIGKILL
    return Run(run_intake(cfg, batch_ids=ids))  # the retry, on another worker


def two_runs_at_once(cfg, s3_client, tmp, monkeypatch) -> Run:
    upload(s3_client, "m1")
    upload(s3_client, "m2", skus=make_skus(2, start=20), seed=2)
    ids = intake.find_new_batches(cfg=cfg).batch_ids
    out: dict[str, list] = {}
    errors: list[BaseException] = []

    def one(run_id: str) -> None:
        try:
            out[run_id] = run_intake(cfg, run_id=run_id, batch_ids=ids)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(r,)) for r in ("run-a", "run-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    statuses = sorted(r["status"] for run in out.values() for r in run[1])
    assert statuses.count("registered") == 2 and statuses.count("already_registered") == 2, statuses
    assert out["run-a"][3]["snapshot_id"] == out["run-b"][3]["snapshot_id"]
    return Run([*out["run-a"], *out["run-b"]])


def cleared_and_rerun_from_the_middle(cfg, s3_client, tmp, monkeypatch) -> Run:
    upload(s3_client, "m1", inject=("truncated_jpeg",))
    first = run_intake(cfg)
    ids = first[0]
    # A person clears register_batches and everything downstream, then the run repeats.
    again = [intake.register_batches(ids, run_id="run-1", cfg=cfg), intake.import_batches_to_fsx(ids, cfg=cfg),
             intake.export_manifests(run_id="run-1", batch_ids=ids, cfg=cfg)]
    assert [r["status"] for r in again[0]] == ["already_registered"]
    assert again[2]["snapshot_id"] == first[3]["snapshot_id"] and again[1] == 0
    return Run([*first, *again], expect_quarantine={"corrupt_image"})


def s3_down_mid_promotion(cfg, s3_client, tmp, monkeypatch) -> Run:
    from sku_retraining import promotion as s3p

    upload(s3_client, "m1")
    run = Run(run_intake(cfg))
    snapshot = run.results[-1]
    before = s3_client.get_object(Bucket=BUCKET, Key="models/sku-recognition/production.json")["Body"].read()
    real, calls = s3p.put_bytes, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise EndpointConnectionError(endpoint_url="http://s3")
        return real(*args, **kwargs)

    monkeypatch.setattr(s3p, "put_bytes", flaky)
    with pytest.raises(EndpointConnectionError):
        promote_fake_model(cfg, s3_client, tmp, "run-2", snapshot)
    after = s3_client.get_object(Bucket=BUCKET, Key="models/sku-recognition/production.json")["Body"].read()
    assert after == before  # production untouched by a half-done promotion
    result = promote_fake_model(cfg, s3_client, tmp, "run-2", snapshot)  # the retry
    assert result["version"] == 2
    run.results.append(result)
    return run


def fault_between_copy_and_pointer(cfg, s3_client, tmp, monkeypatch) -> Run:
    from sku_retraining import promotion as s3p
    from sku_retraining.tasks import promotion as tasks_promotion

    upload(s3_client, "m1")
    snapshot = run_intake(cfg)[-1]
    before = s3_client.get_object(Bucket=BUCKET, Key="models/sku-recognition/production.json")["Body"].read()

    def crash(*args, **kwargs):
        raise RuntimeError("worker lost between the verified copy and the pointer write")

    originals = {m: m.write_pointer for m in (s3p, tasks_promotion) if hasattr(m, "write_pointer")}
    for module in originals:
        monkeypatch.setattr(module, "write_pointer", crash)
    with pytest.raises(RuntimeError, match="pointer write"):
        promote_fake_model(cfg, s3_client, tmp, "run-2", snapshot)
    after = s3_client.get_object(Bucket=BUCKET, Key="models/sku-recognition/production.json")["Body"].read()
    assert after == before  # the copied version is staged, production still the old one
    for module, original in originals.items():
        monkeypatch.setattr(module, "write_pointer", original)
    result = promote_fake_model(cfg, s3_client, tmp, "run-2", snapshot)  # the retry
    assert result["version"] == 2
    return Run([snapshot, result])


def failed_training_job(cfg, s3_client, tmp, monkeypatch) -> Run:
    return Run(job_faults.failed_training_job(cfg, s3_client, tmp, monkeypatch))


def training_killed_and_resumed(cfg, s3_client, tmp, monkeypatch) -> Run:
    return Run(job_faults.training_killed_and_resumed(cfg, s3_client, tmp, monkeypatch))


def worker_sigkilled_mid_augmentation(cfg, s3_client, tmp, monkeypatch) -> Run:
    return Run(job_faults.worker_sigkilled_mid_augmentation(cfg, s3_client, tmp, monkeypatch))


# Every row: (id, scenario). Codes are the quarantine reason codes the row must produce.
ROWS: list[tuple[str, Callable]] = [
    ("corrupt", bad_image("corrupt_jpeg", {"corrupt_image", "not_an_image"})),
    ("truncated", bad_image("truncated_jpeg", {"corrupt_image"})),
    ("zero-byte", bad_image("zero_byte", {"empty_file"})),
    ("non-image", bad_image("non_image", {"not_an_image"})),
    ("wrong-extension", bad_image("wrong_extension", {"unsupported_format"})),
    ("decompression-bomb", bad_image("decompression_bomb", {"decompression_bomb"})),
    ("16-bit", bad_image("sixteen_bit_png", {"unsupported_mode"})),
    ("tiny", bad_image("tiny_image", {"too_small"})),
    ("cmyk", accepted_by_content("cmyk_jpeg")),
    ("exif-orientation", accepted_by_content("exif_rotated")),
    ("png-named-jpg", accepted_by_content("png_as_jpg")),
    ("missing-manifest", bad_manifest("missing_manifest", "manifest.json is missing")),
    ("malformed-manifest", bad_manifest("bad_manifest_json", "not valid UTF-8 JSON")),
    ("schema-breaking-manifest", bad_manifest("manifest_schema_violation", "schema violation")),
    ("hostile-manifest-sku", bad_manifest("hostile_manifest_sku", "does not match")),
    ("manifest-sku-without-images", sku_without_images),
    ("hostile-folders", bad_image("hostile_path", {"invalid_path", "unknown_sku"})),
    ("hostile-file-names", bad_image("hostile_file_names", {"invalid_path"})),
    ("one-image-two-skus", bad_image("duplicate_across_skus", {"conflicting_labels"})),
    ("one-image-across-batches", duplicate_across_batches),
    ("empty-batch", empty_batch),
    ("reupload-changed-bytes", reupload_changed_bytes),
    ("success-before-images", success_before_images),
    ("fault:s3-down-mid-upload", s3_down_mid_upload),
    ("fault:postgres-killed-mid-registration", postgres_connection_killed_mid_registration),
    ("fault:postgres-server-restarted-mid-registration", postgres_server_restarted_mid_registration),
    ("fault:worker-sigkill-mid-registration", worker_sigkilled_mid_registration),
    ("fault:two-runs-at-once", two_runs_at_once),
    ("fault:cleared-and-rerun-from-the-middle", cleared_and_rerun_from_the_middle),
    ("fault:s3-down-mid-promotion", s3_down_mid_promotion),
    ("fault:between-promotion-copy-and-pointer", fault_between_copy_and_pointer),
    ("fault:worker-sigkill-mid-augmentation", worker_sigkilled_mid_augmentation),
    ("fault:failed-training-job", failed_training_job),
    ("fault:training-killed-mid-epoch-and-resumed", training_killed_and_resumed),
]


def _db(cfg):
    import psycopg

    info = json.loads(os.environ[f"AIRFLOW_CONN_{CATALOGUE_CONN_ID.upper()}"])
    return psycopg.connect(host=info["host"], port=info["port"], user=info["login"], dbname=info["schema"],
                           autocommit=True)


@pytest.mark.parametrize("scenario", [r[1] for r in ROWS], ids=[r[0] for r in ROWS])
def test_fault_matrix(stack, s3_client, fsx_root, tmp_path, monkeypatch, caplog, scenario):
    caplog.set_level(logging.INFO)
    with _db(stack) as conn:
        before = invariants.read_state(conn)
    run = scenario(stack, s3_client, tmp_path, monkeypatch)
    with _db(stack) as conn:
        report = invariants.check_all(
            conn, s3_client, bucket=BUCKET, jobs_dir=fsx_root.parent / "jobs", previous=before,
            secret=SECRET, log_texts=[caplog.text], results=run.results,
        )
        codes = {c for (c,) in conn.execute("SELECT DISTINCT reason_code FROM quarantine WHERE batch_id <> 'm0'")}
        rejections = [r for (r,) in conn.execute("SELECT rejection_reason FROM batches WHERE status = 'rejected'")]
    print(f"invariants: {invariants.format_facts(report.facts)}")
    expected = list(run.expect_violations)
    unexpected = [v for v in report.violations if not any(v.startswith(e) for e in expected)]
    assert unexpected == [], "\n".join(unexpected)
    for e in expected:
        assert any(v.startswith(e) for v in report.violations), f"the checker missed: {e}"
    if run.expect_quarantine:
        assert codes & run.expect_quarantine, (codes, run.expect_quarantine)
    if run.expect_rejection:
        assert any(run.expect_rejection in r for r in rejections), rejections
