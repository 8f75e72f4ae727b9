"""The whole DAG with ``airflow dags test`` on the local stack: two generated months.

Real PostgreSQL, real moto S3 server, local FSx folder, the local job backend running the
training image's entry points (torchrun, 2 processes). Smaller than ``./dev run``, same story:
month 1 is promoted as v0001; month 2 with an impossible gate is rejected and leaves
production byte-identical; month 2 re-run with reachable gates is warm-started and promoted
as v0002.
"""

from __future__ import annotations

import json

import boto3
import psycopg
import pytest

from sku_dev.local_story import MONTHS, StorySize, run_dag, upload_month

pytestmark = pytest.mark.slow

BUCKET = "sku-retraining-data"
POINTER_KEY = "models/sku-recognition/production.json"
SIZE = StorySize(skus_month_1=6, skus_month_2=3, images_per_sku=14, image_size=96, variants_per_image=1, epochs=4)
LOOSE_GATES = {"min_top1": 0.0, "min_new_sku_top1": 0.0, "max_old_sku_regression": 1.0}


def pointer(s3) -> bytes | None:
    try:
        return s3.get_object(Bucket=BUCKET, Key=POINTER_KEY)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def decisions(pg_dsn) -> list[tuple]:
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute(
            "SELECT decision, version, reasons FROM model_decisions ORDER BY created_at"
        ).fetchall()


def test_two_months_promote_reject_and_warm_start(airflow_env, pg_dsn, s3_endpoint, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    log = tmp_path / "dags-test.log"
    conf = {"variants_per_image": SIZE.variants_per_image, "epochs": SIZE.epochs}

    # Month 1: bad files quarantined, broken batch rejected, first model promoted as v0001.
    upload_month(airflow_env, 1, SIZE)
    month_1 = run_dag(MONTHS[0], {**conf, **LOOSE_GATES}, airflow_env, log)
    assert month_1.returncode == 0, log.read_text()[-5000:]
    first = json.loads(pointer(s3))
    assert first["version"] == 1 and first["previous_version"] is None
    with psycopg.connect(pg_dsn) as conn:
        quarantined = dict(conn.execute("SELECT reason_code, count(*) FROM quarantine GROUP BY 1").fetchall())
        rejected = conn.execute("SELECT rejection_reason FROM batches WHERE status = 'rejected'").fetchall()
        variants = conn.execute("SELECT count(*) FROM images WHERE source_sha256 IS NOT NULL").fetchone()[0]
    assert {"conflicting_labels", "corrupt_image", "empty_file", "invalid_path"} <= set(quarantined)
    assert rejected and "schema violation" in rejected[0][0]
    assert variants > 0
    for name in ("model.tar.gz", "classes.json", "evaluation.json", "lineage.json", "report/report.html"):
        s3.head_object(Bucket=BUCKET, Key=f"models/sku-recognition/v0001/{name}")
    lineage = json.loads(s3.get_object(Bucket=BUCKET, Key="models/sku-recognition/v0001/lineage.json")["Body"].read())
    assert lineage["batches"] == ["2026-10-a"] and lineage["jobs"]["training"].startswith("sku-train-")

    # Month 2 with a gate nobody can pass: rejected, production untouched.
    upload_month(airflow_env, 2, SIZE)
    before = pointer(s3)
    month_2 = run_dag(MONTHS[1], {**conf, **LOOSE_GATES, "min_top1": 1.0}, airflow_env, log)
    assert month_2.returncode == 0, log.read_text()[-5000:]
    assert pointer(s3) == before
    assert decisions(pg_dsn)[-1][0] == "reject" and "overall top-1" in decisions(pg_dsn)[-1][2][0]

    # Re-run month 2 (force_retrain: the batch is registered already) with reachable gates:
    # warm start from v0001 (the head widened for the new SKUs), promoted as v0002.
    month_2b = run_dag(MONTHS[1], {**conf, **LOOSE_GATES, "force_retrain": True}, airflow_env, log)
    assert month_2b.returncode == 0, log.read_text()[-5000:]
    second = json.loads(pointer(s3))
    assert second["version"] == 2 and second["previous_version"] == 1
    evaluation = json.loads(s3.get_object(Bucket=BUCKET, Key="models/sku-recognition/v0002/evaluation.json")["Body"].read())
    assert evaluation["champion"] is not None and evaluation["new_sku_ids"] == []  # no new batch in this run
    log_text = log.read_text()
    assert "Warm start from production v0001" in log_text
