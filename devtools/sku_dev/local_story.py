"""The two-month story on the local stack: what the README's main command runs.

Month 1 uploads a batch of new SKUs (with bad files mixed in) and a batch whose manifest is
broken, then runs the whole DAG with ``airflow dags test``: the model is trained, evaluated
and promoted as v0001. Month 2 uploads new SKUs plus more images of old ones and runs the DAG
again: warm start from v0001, evaluation against it, promotion as v0002 if the gates pass.
The tests (``tests/e2e``) run the same story, smaller.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sku_dev.synthetic import generate_batch, make_skus, upload_batch

DAG_ID = "sku_retraining"
MONTH_1_BAD = ("corrupt_jpeg", "truncated_jpeg", "zero_byte", "non_image", "duplicate_across_skus", "hostile_path")
MONTHS = ("2026-11-01T03:00:00+00:00", "2026-12-01T03:00:00+00:00")


@dataclass
class StorySize:
    skus_month_1: int = 12
    skus_month_2: int = 6
    images_per_sku: int = 24
    image_size: int = 128
    variants_per_image: int = 2
    epochs: int = 6
    # Gates for a small CPU model trained for minutes (production defaults are in the DAG).
    gates: dict = field(default_factory=lambda: {
        "min_top1": 0.30, "min_new_sku_top1": 0.20, "max_old_sku_regression": 0.20})


@dataclass
class MonthResult:
    logical_date: str
    seconds: float
    returncode: int
    task_seconds: dict[str, float] = field(default_factory=dict)


def catalogue_connect(env: dict[str, str]):
    import psycopg

    info = json.loads(env["AIRFLOW_CONN_SKU_CATALOGUE"])
    return psycopg.connect(
        host=info["host"], port=info["port"], user=info["login"], password=info.get("password"),
        dbname=info["schema"], autocommit=True,
    )


def _s3(env: dict[str, str]):
    import boto3
    from botocore.config import Config

    # As the promotion task does: objects are checked by their own SHA-256, and the SDK's
    # optional CRC check on reads trips on moto's checksum for a server-side copy of a
    # multipart upload (a promoted model.tar.gz), FlexibleChecksumError on a good object.
    return boto3.client(
        "s3", endpoint_url=env["SKU_RETRAINING_S3_ENDPOINT_URL"], region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY", "testing"),
        config=Config(response_checksum_validation="when_required"),
    )


class NotTheLocalStackError(RuntimeError):
    """The reset was pointed at something that is not the local stack's (e.g. RDS)."""


def _is_loopback(host: str | None) -> bool:
    import ipaddress
    import socket

    if not host:
        return False
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def refuse_unless_local_stack(env: dict[str, str]) -> None:
    """The reset drops the catalogue's schema: only ever on the local stack's own servers,
    which listen on loopback only. An RDS endpoint or any other host is refused, naming it."""
    from urllib.parse import urlsplit

    host = json.loads(env["AIRFLOW_CONN_SKU_CATALOGUE"]).get("host")
    endpoint = env.get("SKU_RETRAINING_S3_ENDPOINT_URL", "")
    for what, value in (("catalogue", host), ("S3 endpoint", urlsplit(endpoint).hostname)):
        if not _is_loopback(value):
            raise NotTheLocalStackError(
                f"refusing to reset: the {what} host {value!r} is not the local stack's (loopback only)")


def reset_stack(env: dict[str, str]) -> None:
    """Empty catalogue, bucket, FSx folder and local jobs, so every run tells the same story.

    :raises NotTheLocalStackError: the catalogue or S3 endpoint is not on loopback.
    """
    refuse_unless_local_stack(env)
    with catalogue_connect(env) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    endpoint = env["SKU_RETRAINING_S3_ENDPOINT_URL"]
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
    _s3(env).create_bucket(Bucket=env["SKU_RETRAINING_DATA_BUCKET"])
    fsx_root = Path(env["SKU_RETRAINING_FSX_ROOT"])
    for folder in (fsx_root, fsx_root.parent / "jobs", fsx_root.parent / "reports"):
        shutil.rmtree(folder, ignore_errors=True)
    fsx_root.mkdir(parents=True)


def latest_run_task_seconds(env: dict[str, str]) -> dict[str, float]:
    """Per-task durations of the DAG's newest run (the one just tested), from the metadata DB of
    ``env``'s Airflow home (read in a child process, so this process never loads Airflow's
    settings for another home)."""
    code = ("import json\nfrom airflow.models import DagRun, TaskInstance\n"
            "from airflow.utils.session import create_session\n"
            "with create_session() as s:\n"
            f"    r = s.query(DagRun).filter(DagRun.dag_id == {DAG_ID!r}).order_by(DagRun.id.desc()).first()\n"
            f"    tis = s.query(TaskInstance).filter(TaskInstance.dag_id == {DAG_ID!r},"
            " TaskInstance.run_id == r.run_id) if r else []\n"
            "    print(json.dumps({t.task_id: round(t.duration, 1) for t in tis if t.duration is not None}))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {}


def run_dag(logical_date: str, conf: dict, env: dict[str, str], log_file: Path | None = None) -> MonthResult:
    started = time.monotonic()
    cmd = ["airflow", "dags", "test", DAG_ID, logical_date, "--conf", json.dumps(conf)]
    print(f"\n==> {' '.join(cmd)}", flush=True)
    if log_file is None:
        completed = subprocess.run(cmd, env=env, check=False)
    else:
        with log_file.open("a") as out:
            completed = subprocess.run(cmd, env=env, check=False, stdout=out, stderr=subprocess.STDOUT)
    return MonthResult(logical_date, time.monotonic() - started, completed.returncode)


def upload_month(env: dict[str, str], month: int, size: StorySize) -> list[str]:
    s3 = _s3(env)
    bucket = env["SKU_RETRAINING_DATA_BUCKET"]
    if month == 1:
        batches = [
            generate_batch("2026-10-a", make_skus(size.skus_month_1), size.images_per_sku, seed=1,
                           image_size=size.image_size, inject=MONTH_1_BAD, workers=2),
            generate_batch("2026-10-broken", make_skus(2, start=900), 3, seed=2, image_size=size.image_size,
                           inject=("manifest_schema_violation",)),
        ]
    else:
        new_skus = make_skus(size.skus_month_2, start=size.skus_month_1)
        more_of_old = make_skus(3)
        batches = [generate_batch("2026-11-a", new_skus + more_of_old, size.images_per_sku, seed=3,
                                  image_size=size.image_size, workers=2)]
    for batch in batches:
        upload_batch(s3, bucket, batch)
    return [b.batch_id for b in batches]


def run_story(
    env: dict[str, str], size: StorySize, *, log_file: Path | None = None, task_seconds: bool = False
) -> list[MonthResult]:
    """Upload and run both months; stops at the first failed DAG run.

    :param task_seconds: read per-task durations back from ``env``'s Airflow metadata DB.
    """
    conf = {"variants_per_image": size.variants_per_image, "epochs": size.epochs, **size.gates}
    results = []
    for month, logical_date in enumerate(MONTHS, start=1):
        upload_month(env, month, size)
        result = run_dag(logical_date, conf, env, log_file)
        if task_seconds:
            result.task_seconds = latest_run_task_seconds(env)
        results.append(result)
        if result.returncode != 0:
            break
    return results


def story_summary(env: dict[str, str], results: list[MonthResult]) -> str:
    """What happened, read back from the catalogue and the production pointer."""
    lines: list[str] = []
    with catalogue_connect(env) as conn, conn.cursor() as cur:
        cur.execute("SELECT batch_id, status, n_images, n_quarantined, coalesce(rejection_reason, '') "
                    "FROM batches ORDER BY 1")
        lines.append("Batches:")
        lines += [f"  {b:<16} {s:<11} images={n:<5} quarantined={q:<3} {r}" for b, s, n, q, r in cur.fetchall()]
        cur.execute("SELECT reason_code, count(*) FROM quarantine GROUP BY 1 ORDER BY 1")
        lines.append("Quarantined: " + (", ".join(f"{c}={n}" for c, n in cur.fetchall()) or "none"))
        cur.execute("SELECT count(*) FROM skus")
        lines.append(f"SKUs: {cur.fetchone()[0]}")
        cur.execute("SELECT split, count(*) FILTER (WHERE source_sha256 IS NULL), "
                    "count(*) FILTER (WHERE source_sha256 IS NOT NULL) FROM images GROUP BY 1 ORDER BY 1")
        lines.append("Images: " + ", ".join(f"{s}={o} originals+{v} variants" for s, o, v in cur.fetchall()))
        cur.execute("SELECT to_regclass('model_decisions') IS NOT NULL")
        if cur.fetchone()[0]:
            cur.execute("""SELECT d.dag_run_id, d.decision, d.version, d.reasons, v.evaluation
                           FROM model_decisions d LEFT JOIN model_versions v
                             ON v.model_name = d.model_name AND v.version = d.version
                           ORDER BY d.created_at""")
            lines.append("Models:")
            for run_id, decision, version, reasons, evaluation in cur.fetchall():
                label = f"v{version:04d}" if version else "—"
                metrics = ""
                challenger = (evaluation or {}).get("challenger") or {}
                if challenger:
                    metrics = "top-1 {:.3f} | new SKUs {} | old SKUs {}".format(
                        challenger.get("top1", 0),
                        "n/a" if challenger.get("new_sku_top1") is None else f"{challenger['new_sku_top1']:.3f}",
                        "n/a" if challenger.get("old_sku_top1") is None else f"{challenger['old_sku_top1']:.3f}",
                    )
                lines.append(f"  {run_id}: {decision:<13} {label:<6} {metrics} {'; '.join(reasons or [])}")
    for result in results:
        slowest = sorted(result.task_seconds.items(), key=lambda kv: -kv[1])
        lines.append(f"{result.logical_date}: {result.seconds:.0f} s ("
                     + ", ".join(f"{k} {v:.0f}s" for k, v in slowest) + ")")
    reports = sorted((Path(env["SKU_RETRAINING_FSX_ROOT"]).parent / "reports").glob("*/report.html"))
    if reports:
        lines.append("Evaluation reports: " + ", ".join(str(p) for p in reports))
    return "\n".join(lines)
