"""The invariants every run must leave true, checked from the outside: the catalogue, S3 and
the local job folder. One module, used by the reliability matrix (after every row) and the
soak (after every month).

1. **No image lost or registered twice**: every object uploaded under a registered batch's
   ``images/`` is either an original in ``images`` (``fsx_path`` = its key) or in
   ``quarantine``, never both, never twice; every variant's source is registered.
2. **Reasons recorded**: every quarantine row has a code and a readable reason; every
   rejected batch has its rejection reason.
3. **Class indices stable**: dense ``0..N-1``; every SKU keeps the index it had before.
4. **Splits stable**: no image changes split; variants are train only.
5. **Production is complete**: ``production.json`` points at a version whose every listed
   object exists with the recorded size and sha256.
6. **Lineage**: every promoted version's ``lineage.json`` names its dataset snapshot, its
   training job and its training image.
7. **Nothing left running**: no local job recorded ``InProgress`` and no process still
   running a job's code (torchrun, the entry points) from the local job folder.
8. **No secret leaked**: the catalogue password is in no captured log line or task result.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The local backend records each job's DescribeTrainingJob-like status here (jobs/local.py).
JOB_STATUS_FILE = "job.json"
POINTER_FILE = "production.json"
LINEAGE_FILE = "lineage.json"


@dataclass
class CatalogueState:
    """What must never change once written: class indices and splits."""

    class_index: dict[str, int] = field(default_factory=dict)
    split: dict[str, str] = field(default_factory=dict)


@dataclass
class InvariantReport:
    violations: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    state: CatalogueState = field(default_factory=CatalogueState)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, message: str) -> None:
        self.violations.append(message)


def read_state(conn) -> CatalogueState:
    with conn.cursor() as cur:
        cur.execute("SELECT sku_id, class_index FROM skus")
        classes = dict(cur.fetchall())
        cur.execute("SELECT sha256, split FROM images")
        splits = dict(cur.fetchall())
    return CatalogueState(classes, splits)


def _list_keys(s3, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return keys


def _get(s3, bucket: str, key: str) -> bytes | None:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def _table_exists(conn, name: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
        return bool(cur.fetchone()[0])


def check_catalogue(conn, s3, bucket: str, incoming: str, report: InvariantReport,
                    previous: CatalogueState | None) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT batch_id, status, coalesce(rejection_reason, '') FROM batches")
        batches = cur.fetchall()
        cur.execute("SELECT fsx_path, sha256, split, batch_id FROM images WHERE source_sha256 IS NULL")
        originals = cur.fetchall()
        cur.execute("SELECT batch_id, object_key, coalesce(reason_code, ''), coalesce(reason, '') FROM quarantine")
        quarantined = cur.fetchall()
        cur.execute("""SELECT count(*) FROM images v LEFT JOIN images s ON s.sha256 = v.source_sha256
                       WHERE v.source_sha256 IS NOT NULL AND (s.sha256 IS NULL OR s.split <> 'train'
                                                             OR v.split <> 'train')""")
        bad_variants = cur.fetchone()[0]
        cur.execute("SELECT count(*) FILTER (WHERE source_sha256 IS NULL), count(*) FROM images")
        n_originals, n_images = cur.fetchone()
    registered_paths = Counter(path for path, *_ in originals)
    quarantined_keys = Counter(key for _, key, _, _ in quarantined)
    report.facts.update(
        batches=len(batches), originals=n_originals, images=n_images, quarantined=len(quarantined),
        rejected_batches=sum(1 for _, s, _ in batches if s == "rejected"),
    )
    for path, n in registered_paths.items():
        if n > 1:
            report.fail(f"image {path} registered {n} times")
    for key, n in quarantined_keys.items():
        if n > 1:
            report.fail(f"object {key} quarantined {n} times")
    for key in set(registered_paths) & set(quarantined_keys):
        report.fail(f"object {key} is both registered and quarantined")
    uploaded_total = 0
    for batch_id, status, reason in batches:
        if status == "rejected":
            if len(reason.strip()) < 5:
                report.fail(f"batch {batch_id} rejected without a reason")
            continue
        uploaded = set(_list_keys(s3, bucket, f"{incoming}{batch_id}/images/"))
        uploaded_total += len(uploaded)
        accounted = {k for k in registered_paths if k.startswith(f"{incoming}{batch_id}/")} | {
            k for b, k, _, _ in quarantined if b == batch_id}
        for key in sorted(uploaded - accounted)[:20]:
            report.fail(f"lost: {key} (batch {batch_id}) is neither registered nor quarantined")
        for key in sorted(accounted - uploaded)[:20]:
            report.fail(f"phantom: {key} is in the catalogue but was never uploaded")
    report.facts["uploaded"] = uploaded_total
    for batch_id, key, code, reason in quarantined:
        if not code or len(reason) < 10:
            report.fail(f"quarantined {key} ({batch_id}) without a code and reason: {code!r} {reason!r}")
    if bad_variants:
        report.fail(f"{bad_variants} variant(s) outside train or without a registered train source")

    state = read_state(conn)
    report.state = state
    if sorted(state.class_index.values()) != list(range(len(state.class_index))):
        report.fail("class indices are not dense 0..N-1")
    if previous is not None:
        for sku, index in previous.class_index.items():
            if state.class_index.get(sku) != index:
                report.fail(f"SKU {sku} changed class index {index} -> {state.class_index.get(sku)}")
        for sha, split in previous.split.items():
            now = state.split.get(sha)
            if now != split:
                report.fail(f"image {sha[:12]} changed split {split} -> {now}")
    report.facts["skus"] = len(state.class_index)


def _sha256(s3, bucket: str, key: str) -> tuple[str, int] | None:
    digest, size = hashlib.sha256(), 0
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except s3.exceptions.NoSuchKey:
        return None
    for chunk in iter(lambda: body.read(1 << 20), b""):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def check_models(conn, s3, bucket: str, model_prefix: str, report: InvariantReport) -> None:
    raw = _get(s3, bucket, model_prefix + POINTER_FILE)
    report.facts["production_version"] = None
    if raw is not None:
        pointer = json.loads(raw)
        report.facts["production_version"] = pointer.get("version")
        version_prefix = f"{model_prefix}v{int(pointer['version']):04d}/"
        objects = pointer.get("objects") or {}
        if "model.tar.gz" not in objects:
            report.fail(f"production.json lists no model.tar.gz: {sorted(objects)}")
        for name, recorded in objects.items():
            got = _sha256(s3, bucket, version_prefix + name)
            if got is None:
                report.fail(f"production v{pointer['version']}: {name} is missing")
            elif got != (recorded.get("sha256"), recorded.get("size")):
                report.fail(f"production v{pointer['version']}: {name} does not match its recorded sha256/size")
    if not _table_exists(conn, "model_versions"):
        return
    with conn.cursor() as cur:
        cur.execute("SELECT version FROM model_versions WHERE status = 'promoted' ORDER BY version")
        promoted = [v for (v,) in cur.fetchall()]
    report.facts["promoted_versions"] = promoted
    if raw is not None and report.facts["production_version"] not in promoted:
        report.fail(f"production.json points at v{report.facts['production_version']}, not a promoted version")
    for version in promoted:
        lineage_raw = _get(s3, bucket, f"{model_prefix}v{version:04d}/{LINEAGE_FILE}")
        if lineage_raw is None:
            report.fail(f"v{version:04d} has no lineage.json")
            continue
        lineage = json.loads(lineage_raw)
        if not (lineage.get("dataset") or {}).get("snapshot_id"):
            report.fail(f"v{version:04d} lineage names no dataset snapshot")
        if not (lineage.get("jobs") or {}).get("training"):
            report.fail(f"v{version:04d} lineage names no training job")
        if not lineage.get("image_uri"):
            report.fail(f"v{version:04d} lineage names no training image")


def _running_job_processes(jobs_dir: Path) -> list[str]:
    """Processes whose command line or working directory is inside ``jobs_dir``."""
    found = []
    needle = str(jobs_dir.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line.split()[1] for line in (proc / "status").read_text().splitlines()
                          if line.startswith("State:")), "?")
            cwd = os.readlink(proc / "cwd")
        except (OSError, StopIteration, IndexError):
            continue
        if state == "Z":
            continue  # a reaped-late zombie holds nothing
        if needle in cmdline or cwd.startswith(needle):
            found.append(f"pid {proc.name}: {cmdline[:120]}")
    return found


def check_no_orphans(jobs_dir: Path, report: InvariantReport) -> None:
    if not jobs_dir.is_dir():
        return
    for description in jobs_dir.rglob(JOB_STATUS_FILE):
        try:
            status = json.loads(description.read_text()).get("TrainingJobStatus")
        except (OSError, ValueError):
            continue
        if status == "InProgress":
            report.fail(f"local job {description.parent.name} is still recorded InProgress")
    for line in _running_job_processes(jobs_dir):
        report.fail(f"orphaned job process: {line}")


def check_no_secret(secret: str | None, texts: Iterable[str], results: Iterable[Any],
                    report: InvariantReport) -> None:
    if not secret:
        return
    for n, text in enumerate(texts):
        if secret in text:
            report.fail(f"the catalogue password appears in captured log text #{n}")
    for n, result in enumerate(results):
        if secret in json.dumps(result, default=str):
            report.fail(f"the catalogue password appears in task result #{n} (XCom)")


def check_all(
    conn, s3, *, bucket: str, incoming: str = "incoming/", model_prefix: str = "models/sku-recognition/",
    jobs_dir: Path | None = None, previous: CatalogueState | None = None, secret: str | None = None,
    log_texts: Iterable[str] = (), results: Iterable[Any] = (),
) -> InvariantReport:
    """Every invariant; ``report.violations`` lists what broke (empty: all hold)."""
    report = InvariantReport()
    if _table_exists(conn, "batches"):
        check_catalogue(conn, s3, bucket, incoming, report, previous)
    check_models(conn, s3, bucket, model_prefix, report)
    if jobs_dir is not None:
        check_no_orphans(jobs_dir, report)
    check_no_secret(secret, log_texts, results, report)
    return report


def format_facts(facts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in facts.items())
