"""Make S3 objects visible on the FSx for Lustre file system linked to the data bucket.

* ``aws``: FSx imports through its data repository association; we start an
  ``IMPORT_METADATA_FROM_REPOSITORY`` data-repository task for the batches' ``s3://`` prefixes
  and wait for it (files are then lazy-loaded from S3 on first read); see
  :func:`import_prefixes_to_aws_fsx` for waiting on other tasks and cancelling on timeout.
* ``local``: the "file system" is a folder; we copy the objects into it (atomically, skipping
  files already there with the same size), refusing any key that would land outside it.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from botocore.exceptions import ClientError

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
        # Unique per writer (two runs may import the same batch at once, in threads or processes).
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        client.download_file(bucket, key, str(tmp))
        os.replace(tmp, target)
        return 1

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return sum(pool.map(copy_one, keys))


#: ``CreateDataRepositoryTask`` takes at most 100 paths (botocore's FSx model:
#: ``DataRepositoryTaskPaths``, max 100).
MAX_TASK_PATHS = 100
#: The error ``CreateDataRepositoryTask`` answers while another data repository task runs on
#: the file system (botocore's FSx model: ``DataRepositoryTaskExecuting``, "Wait until the
#: existing task has completed, then create the new task").
TASK_EXECUTING = "DataRepositoryTaskExecuting"
TASK_ENDED = "DataRepositoryTaskEnded"


def s3_import_path(bucket: str, key_prefix: str) -> str:
    """The ``Paths`` entry of an import task for ``key_prefix`` of ``bucket``.

    botocore's FSx model (``CreateDataRepositoryTaskRequest.Paths``): "For import tasks, the
    list contains paths in the Amazon S3 bucket from which POSIX metadata changes are imported
    to the FSx for Lustre file system. The path can be an S3 bucket or prefix in the format
    ``s3://bucket-name/prefix``". (Export and release tasks take file-system paths instead.)
    The path must lie under the data repository association's ``DataRepositoryPath``; the
    project links the file system's root to the data bucket's root, so FSx paths = S3 keys.
    """
    if not bucket or "/" in bucket:
        raise FsxError(f"{bucket!r} is not an S3 bucket name")
    return f"s3://{bucket}/{key_prefix.lstrip('/')}"


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None) or {}
    return (response.get("Error") or {}).get("Code")


def import_prefixes_to_aws_fsx(
    fsx_client,
    file_system_id: str,
    s3_paths: list[str],
    *,
    poll_seconds: float = 15,
    timeout_seconds: float = 3600,
    busy_timeout_seconds: float = 3600,
    busy_backoff_seconds: tuple[float, float] = (15, 300),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Import ``s3_paths`` (``s3://bucket/prefix``, see :func:`s3_import_path`) with
    ``IMPORT_METADATA_FROM_REPOSITORY`` data repository tasks (at most :data:`MAX_TASK_PATHS`
    paths each), one after the other; return their task ids.

    * While another data repository task runs on the file system, FSx refuses a new one
      (:data:`TASK_EXECUTING`): retried with exponential backoff (``busy_backoff_seconds``:
      first and longest wait) for up to ``busy_timeout_seconds``.
    * A task of ours still running after ``timeout_seconds`` is cancelled
      (``CancelDataRepositoryTask``) before the error is raised, so it does not hold the file
      system's task slot for the next run.
    """
    if not s3_paths:
        return []
    bad = [p for p in s3_paths if not p.startswith("s3://")]
    if bad:
        raise FsxError(f"import task paths must be s3://bucket/prefix, got {bad[:3]}")
    task_ids = []
    for start in range(0, len(s3_paths), MAX_TASK_PATHS):
        chunk = list(s3_paths[start:start + MAX_TASK_PATHS])
        task_id = _create_import_task(fsx_client, file_system_id, chunk, busy_timeout_seconds,
                                      busy_backoff_seconds, sleep, clock)
        _wait_for_task(fsx_client, task_id, poll_seconds, timeout_seconds, sleep, clock)
        task_ids.append(task_id)
    return task_ids


def _create_import_task(fsx_client, file_system_id, paths, busy_timeout, backoff, sleep, clock) -> str:
    deadline = clock() + busy_timeout
    delay, longest = backoff
    while True:
        try:
            response = fsx_client.create_data_repository_task(
                FileSystemId=file_system_id,
                Type="IMPORT_METADATA_FROM_REPOSITORY",
                Paths=paths,
                Report={"Enabled": False},
            )
            return response["DataRepositoryTask"]["TaskId"]
        except ClientError as exc:  # only the "busy" answer is retried
            if _error_code(exc) != TASK_EXECUTING:
                raise
            if clock() + delay > deadline:
                raise FsxError(
                    f"another data repository task was still running on {file_system_id} after "
                    f"{busy_timeout:.0f} s; the import of {len(paths)} path(s) was not started"
                ) from exc
            log.info("Another data repository task is running on %s: retrying in %.0f s", file_system_id, delay)
            sleep(delay)
            delay = min(delay * 2, longest)


def _wait_for_task(fsx_client, task_id, poll_seconds, timeout_seconds, sleep, clock) -> None:
    deadline = clock() + timeout_seconds
    while True:
        task = fsx_client.describe_data_repository_tasks(TaskIds=[task_id])["DataRepositoryTasks"][0]
        state = task["Lifecycle"]
        log.info("FSx import task %s: %s", task_id, state)
        if state == "SUCCEEDED":
            return
        if state in ("FAILED", "CANCELED"):
            raise FsxError(f"FSx import task {task_id} {state}: {task.get('FailureDetails', {})}")
        if clock() > deadline:
            _cancel(fsx_client, task_id)
            raise FsxError(f"FSx import task {task_id} still {state} after {timeout_seconds:.0f} s: cancelled")
        sleep(poll_seconds)


def _cancel(fsx_client, task_id: str) -> None:
    try:
        response = fsx_client.cancel_data_repository_task(TaskId=task_id)
        log.warning("FSx import task %s timed out: cancel requested (%s)", task_id, response.get("Lifecycle"))
    except ClientError as exc:  # a task that ended meanwhile needs no cancelling
        if _error_code(exc) != TASK_ENDED:
            raise
        log.info("FSx import task %s ended before it could be cancelled", task_id)
