"""Make S3 objects visible on the FSx for Lustre file system linked to the data bucket.

* ``aws``: FSx imports through its data repository association; we start an
  ``IMPORT_METADATA_FROM_REPOSITORY`` data-repository task for the prefixes and wait for it
  (files are then lazy-loaded from S3 on first read).
* ``local``: the "file system" is a folder; we copy the objects into it (atomically, skipping
  files already there with the same size), refusing any key that would land outside it.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)


class FsxError(RuntimeError):
    pass


def safe_local_path(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths and anything resolving outside ``root``."""
    if relative.startswith("/") or "\x00" in relative:
        raise FsxError(f"path {relative!r} must be relative to the FSx root")
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise FsxError(f"path {relative!r} resolves outside the FSx root {root}")
    return target


def import_objects_to_local_fsx(s3_hook, bucket: str, keys: list[str], root: Path, workers: int = 8) -> int:
    """Copy ``keys`` from the bucket to ``root/<key>``; return how many were written."""
    client = s3_hook.get_conn()

    def copy_one(key: str) -> int:
        target = safe_local_path(root, key)
        head = client.head_object(Bucket=bucket, Key=key)
        if target.exists() and target.stat().st_size == head["ContentLength"]:
            return 0
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        client.download_file(bucket, key, str(tmp))
        os.replace(tmp, target)
        return 1

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return sum(pool.map(copy_one, keys))


def import_prefixes_to_aws_fsx(
    fsx_client, file_system_id: str, prefixes: list[str], *, poll_seconds: float = 15, timeout_seconds: float = 3600
) -> str:
    """Run an FSx data-repository import task for ``prefixes`` and wait for it to succeed."""
    response = fsx_client.create_data_repository_task(
        FileSystemId=file_system_id,
        Type="IMPORT_METADATA_FROM_REPOSITORY",
        Paths=prefixes,
        Report={"Enabled": False},
    )
    task_id = response["DataRepositoryTask"]["TaskId"]
    deadline = time.monotonic() + timeout_seconds
    while True:
        task = fsx_client.describe_data_repository_tasks(TaskIds=[task_id])["DataRepositoryTasks"][0]
        state = task["Lifecycle"]
        log.info("FSx import task %s: %s", task_id, state)
        if state == "SUCCEEDED":
            return task_id
        if state in ("FAILED", "CANCELED"):
            raise FsxError(f"FSx import task {task_id} {state}: {task.get('FailureDetails', {})}")
        if time.monotonic() > deadline:
            raise FsxError(f"FSx import task {task_id} still {state} after {timeout_seconds} s")
        time.sleep(poll_seconds)
