"""The README's main command: the whole DAG, end to end, on the embedded local stack.

Starts (or reuses) the local stack, resets it to an empty catalogue/bucket/FSx, then tells a
two-month story: month 1 uploads a batch of new SKUs (with bad files mixed in, and one batch
with a broken manifest), runs ``airflow dags test sku_retraining``; month 2 uploads new SKUs
plus more images of old ones and runs the DAG again. Ends with a summary read from the
catalogue.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from sku_retraining.local_stack import LocalStack  # noqa: E402
from sku_retraining.synthetic import generate_batch, make_skus, upload_batch  # noqa: E402

DAG_ID = "sku_retraining"
MONTH_1_BAD = ("corrupt_jpeg", "truncated_jpeg", "zero_byte", "non_image", "duplicate_across_skus", "hostile_path")


def reset_stack(env: dict[str, str]) -> None:
    """Empty catalogue, bucket and FSx folder, so every demo run tells the same story."""
    import boto3
    import psycopg

    conn_info = json.loads(env["AIRFLOW_CONN_SKU_CATALOGUE"])
    with psycopg.connect(
        host=conn_info["host"], port=conn_info["port"], user=conn_info["login"],
        password=conn_info.get("password"), dbname=conn_info["schema"], autocommit=True,
    ) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    endpoint = env["SKU_RETRAINING_S3_ENDPOINT_URL"]
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket=env["SKU_RETRAINING_DATA_BUCKET"]
    )
    fsx_root = Path(env["SKU_RETRAINING_FSX_ROOT"])
    shutil.rmtree(fsx_root, ignore_errors=True)
    fsx_root.mkdir(parents=True)


def run_dag(logical_date: str, conf: dict) -> float:
    started = time.monotonic()
    cmd = ["airflow", "dags", "test", DAG_ID, logical_date, "--conf", json.dumps(conf)]
    print(f"\n==> {' '.join(cmd)}", flush=True)
    completed = subprocess.run(cmd, env=os.environ.copy(), check=False)
    if completed.returncode != 0:
        raise SystemExit(f"airflow dags test failed for {logical_date} (exit {completed.returncode})")
    return time.monotonic() - started


def summary(env: dict[str, str]) -> str:
    import psycopg

    info = json.loads(env["AIRFLOW_CONN_SKU_CATALOGUE"])
    lines = []
    with psycopg.connect(
        host=info["host"], port=info["port"], user=info["login"], password=info.get("password"),
        dbname=info["schema"],
    ) as conn, conn.cursor() as cur:
        cur.execute("SELECT batch_id, status, n_images, n_quarantined, coalesce(rejection_reason, '') FROM batches ORDER BY 1")
        lines.append("Batches:")
        lines += [f"  {b:<16} {s:<11} images={n:<5} quarantined={q:<3} {r}" for b, s, n, q, r in cur.fetchall()]
        cur.execute("SELECT count(*), max(class_index) FROM skus")
        n_skus, max_index = cur.fetchone()
        lines.append(f"SKUs: {n_skus} (class indices 0..{max_index})")
        cur.execute("SELECT split, count(*) FROM images GROUP BY 1 ORDER BY 1")
        lines.append("Images by split: " + ", ".join(f"{s}={n}" for s, n in cur.fetchall()))
        cur.execute("SELECT reason_code, count(*) FROM quarantine GROUP BY 1 ORDER BY 1")
        lines.append("Quarantined: " + (", ".join(f"{c}={n}" for c, n in cur.fetchall()) or "none"))
        cur.execute("SELECT dag_run_id, snapshot_id, counts, s3_prefix FROM dataset_snapshots ORDER BY created_at")
        lines.append("Dataset snapshots:")
        lines += [f"  {r}: {s} {json.dumps(c)} {p}" for r, s, c, p in cur.fetchall()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skus-month-1", type=int, default=12)
    parser.add_argument("--skus-month-2", type=int, default=6)
    parser.add_argument("--images-per-sku", type=int, default=24)
    parser.add_argument("--keep-state", action="store_true", help="do not reset the local stack first")
    args = parser.parse_args(argv)

    stack = LocalStack(ROOT)
    stack.start()
    env = stack.env()
    os.environ.update(env)
    if not args.keep_state:
        reset_stack(env)

    import boto3

    s3 = boto3.client("s3", endpoint_url=env["SKU_RETRAINING_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = env["SKU_RETRAINING_DATA_BUCKET"]
    durations = {}

    month_1_skus = make_skus(args.skus_month_1, start=0)
    upload_batch(s3, bucket, generate_batch("2026-10-a", month_1_skus, args.images_per_sku, seed=1, inject=MONTH_1_BAD))
    upload_batch(s3, bucket, generate_batch("2026-10-broken", make_skus(2, start=900), 3, seed=2,
                                            inject=("manifest_schema_violation",)))
    durations["month 1"] = run_dag("2026-11-01T03:00:00+00:00", {})

    month_2_skus = make_skus(args.skus_month_2, start=args.skus_month_1)
    more_of_old = make_skus(3, start=0)
    upload_batch(s3, bucket, generate_batch("2026-11-a", month_2_skus + more_of_old, args.images_per_sku, seed=3))
    durations["month 2"] = run_dag("2026-12-01T03:00:00+00:00", {})

    print("\n" + "=" * 72)
    print(summary(env))
    print("Durations: " + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items()))
    print(f"Local stack still running (stop it with ./dev stack stop); FSx folder: {env['SKU_RETRAINING_FSX_ROOT']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
