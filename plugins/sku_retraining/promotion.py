"""The S3 side of model promotion: version layout, copy, verification, the production pointer.

Layout under ``s3://<data_bucket>/<prefixes.models><model_name>/``::

    v0001/model.tar.gz        server-side copy of the training job's artefact
    v0001/classes.json        class index -> sku_id (the training snapshot's)
    v0001/evaluation.json     the evaluation job's full output
    v0001/report/...          report.html, plots/, examples/
    v0001/lineage.json        where the model came from, and the table of the objects above
    production.json           the pointer: which version serves, rewritten last

Every object carries its SHA-256 as user metadata ``sha256``, and the object table
``{name: {"size", "sha256"}}`` (in lineage.json, in production.json and in the catalogue
DB) is what a version is verified against before the pointer may name it. The pointer is one
``PutObject``, which S3 applies atomically: readers see the old pointer or the new one.

The functions take a boto3 S3 client (``S3Hook.get_conn()``); the order of the steps and
the catalogue records are :mod:`sku_retraining.tasks.promotion`'s.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sku_contracts.files import CLASSES_FILE, EVALUATION_FILE  # noqa: E402
from sku_contracts.files import MODEL_ARCHIVE as MODEL_FILE  # noqa: E402

LINEAGE_FILE = "lineage.json"
REPORT_DIR = "report"
POINTER_FILE = "production.json"
LINEAGE_FORMAT = "sku-model-lineage/v1"

SHA256_METADATA = "sha256"
# The ETag of the artefact a model.tar.gz was copied from: lets a retry see that the copy
# it finds is of the same source without streaming the archive again.
SOURCE_ETAG_METADATA = "source-etag"

JOB_OUTPUT_KEYS = ("model_tar_uri", "classes_json", "evaluation_json", "report_dir")
POINTER_KEYS = (
    "model_name", "version", "previous_version", "s3_prefix", "model_uri", "promoted_at",
    "dag_run_id", "action", "objects",
)

_READ_CHUNK = 8 * 1024 * 1024
# Up to 5 GiB (S3's CopyObject limit) the managed copy makes one CopyObject, whose ETag is the
# source's: verification then compares ETags instead of streaming the archive a second time.
# Larger archives are copied in parts (ETag differs) and verified by streaming the copy.
SINGLE_COPY_LIMIT = 5 * 1024**3
MULTIPART_COPY_CHUNK = 256 * 1024 * 1024

ObjectTable = dict[str, dict[str, Any]]


class PromotionError(RuntimeError):
    """Promotion or rollback cannot go on; the message says what and where."""


class VerificationError(PromotionError):
    """Objects of a version do not match its object table.

    :ivar problems: object name -> what is wrong with it.
    """

    def __init__(self, where: str, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        details = "; ".join(f"{name}: {problem}" for name, problem in sorted(self.problems.items()))
        super().__init__(f"{where} failed verification ({len(self.problems)} object(s)): {details}")


@dataclass(frozen=True)
class ModelLayout:
    """Keys and URIs of one model's versions and pointer in the data bucket."""

    bucket: str
    models_prefix: str
    model_name: str

    @classmethod
    def from_config(cls, cfg) -> ModelLayout:
        return cls(cfg.data_bucket, cfg.prefixes.models, cfg.model_name)

    @property
    def prefix(self) -> str:
        return f"{self.models_prefix}{self.model_name}/"

    @property
    def pointer_key(self) -> str:
        return self.prefix + POINTER_FILE

    @property
    def pointer_uri(self) -> str:
        return self.uri(self.pointer_key)

    @staticmethod
    def version_dir(version: int) -> str:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"a model version is an integer >= 1, got {version!r}")
        return f"v{version:04d}"

    def version_prefix(self, version: int) -> str:
        return f"{self.prefix}{self.version_dir(version)}/"

    def version_uri(self, version: int) -> str:
        return self.uri(self.version_prefix(version))

    def key(self, version: int, name: str) -> str:
        return self.version_prefix(version) + name

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; anything else is a :class:`PromotionError`."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise PromotionError(f"expected an s3:// URI, got {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise PromotionError(f"{uri!r} names no bucket")
    return bucket, key


def json_bytes(document: Any) -> bytes:
    """The one JSON encoding of written documents: sorted keys, so equal content = equal bytes."""

    def default(value: Any) -> Any:
        if isinstance(value, datetime | date):
            return value.isoformat()
        raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")

    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False, default=default) + "\n").encode()


def _is_missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
        "404", "NoSuchKey", "NotFound",
    )


def head(client, bucket: str, key: str) -> dict | None:
    """``HeadObject``, or ``None`` when the object does not exist."""
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if _is_missing(exc):
            return None
        raise


def stream_sha256(client, bucket: str, key: str) -> tuple[str, int, str]:
    """SHA-256, size and ETag of an object, read once in chunks (never whole in memory)."""
    response = client.get_object(Bucket=bucket, Key=key)
    digest = hashlib.sha256()
    size = 0
    body = response["Body"]
    try:
        for chunk in iter(lambda: body.read(_READ_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    finally:
        body.close()
    return digest.hexdigest(), size, response["ETag"]


def put_bytes(client, bucket: str, key: str, body: bytes, *, content_type: str | None = None) -> dict[str, Any]:
    """Upload ``body`` with its SHA-256 as metadata and as the request checksum.

    ``ChecksumSHA256`` makes S3 refuse an upload whose bytes arrived changed. Returns the
    object's entry for the object table.
    """
    digest = hashlib.sha256(body)
    client.put_object(
        Bucket=bucket,
        Key=key,
        Body=body,
        ContentType=content_type or mimetypes.guess_type(key)[0] or "application/octet-stream",
        ChecksumSHA256=base64.b64encode(digest.digest()).decode(),
        Metadata={SHA256_METADATA: digest.hexdigest()},
    )
    return {"size": len(body), "sha256": digest.hexdigest()}


def copy_model_archive(client, source_uri: str, bucket: str, key: str) -> tuple[dict[str, Any], str]:
    """Server-side copy of the training artefact to ``key``, with its SHA-256 as metadata.

    The source is streamed once to hash it; the copy is made only from that very object
    (``CopySourceIfMatch`` its ETag), so the recorded hash is the hash of what was copied.
    A copy already there from the same source (a retry) is kept. Returns the object table
    entry and the source ETag (for :func:`verify_objects`).
    """
    from boto3.s3.transfer import TransferConfig

    src_bucket, src_key = parse_s3_uri(source_uri)
    source = head(client, src_bucket, src_key)
    if source is None:
        raise PromotionError(f"the model artefact {source_uri} does not exist")
    existing = head(client, bucket, key)
    if (
        existing is not None
        and existing["ContentLength"] == source["ContentLength"]
        and existing.get("Metadata", {}).get(SOURCE_ETAG_METADATA) == source["ETag"]
        and existing.get("Metadata", {}).get(SHA256_METADATA)
    ):
        return {"size": existing["ContentLength"], "sha256": existing["Metadata"][SHA256_METADATA]}, source["ETag"]

    sha256, size, etag = stream_sha256(client, src_bucket, src_key)
    client.copy(
        {"Bucket": src_bucket, "Key": src_key},
        bucket,
        key,
        ExtraArgs={
            "CopySourceIfMatch": etag,
            "Metadata": {SHA256_METADATA: sha256, SOURCE_ETAG_METADATA: etag},
            "MetadataDirective": "REPLACE",
            "ContentType": "application/gzip",
        },
        Config=TransferConfig(multipart_threshold=SINGLE_COPY_LIMIT, multipart_chunksize=MULTIPART_COPY_CHUNK),
    )
    return {"size": size, "sha256": sha256}, etag


def _check_relative_name(name: str, where: str) -> str:
    """A report file's name under ``report/``: no '..', no absolute or empty parts."""
    if not name or name.startswith("/") or posixpath.normpath(name) != name or ".." in name.split("/"):
        raise PromotionError(f"report file name {name!r} from {where} is not a plain relative path")
    return name


def _load_document(client, source: bytes | str, what: str) -> bytes:
    """``classes_json`` / ``evaluation_json`` as given (bytes) or read from an s3:// URI,
    checked to be JSON so a broken file can never become production's."""
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
        where = f"{what} (bytes)"
    elif isinstance(source, str) and source.startswith("s3://"):
        bucket, key = parse_s3_uri(source)
        try:
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _is_missing(exc):
                raise PromotionError(f"{what} {source} does not exist") from None
            raise
        where = source
    else:
        raise PromotionError(f"{what} must be bytes or an s3:// URI, got {type(source).__name__}")
    try:
        json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromotionError(f"{what} from {where} is not valid JSON: {exc}") from None
    return data


def _report_files(client, report_dir: str | Path) -> Iterator[tuple[str, bytes]]:
    """``(name under report/, bytes)`` from a local folder or an ``s3://`` prefix, in name
    order. The report root's evaluation.json is skipped: it is the version's own
    ``evaluation.json`` already."""
    found = False
    if isinstance(report_dir, str) and report_dir.startswith("s3://"):
        bucket, prefix = parse_s3_uri(report_dir)
        prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        for key in sorted(keys):
            name = _check_relative_name(key[len(prefix) :], report_dir)
            found = True
            if name == EVALUATION_FILE:
                continue
            yield name, client.get_object(Bucket=bucket, Key=key)["Body"].read()
    else:
        root = Path(report_dir)
        if not root.is_dir():
            raise PromotionError(f"report_dir {root} is not a folder")
        # Symlinks are not followed: a report can only publish what is in its own folder.
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            name = _check_relative_name(path.relative_to(root).as_posix(), str(root))
            found = True
            if name == EVALUATION_FILE:
                continue
            yield name, path.read_bytes()
    if not found:
        raise PromotionError(f"report_dir {report_dir} holds no files")


def check_job_outputs(job_outputs: Mapping[str, Any]) -> None:
    unknown = sorted(set(job_outputs) - set(JOB_OUTPUT_KEYS))
    if unknown:
        raise PromotionError(f"unknown job_outputs key(s) {', '.join(unknown)} (known: {', '.join(JOB_OUTPUT_KEYS)})")
    missing = [k for k in ("model_tar_uri", "classes_json", "evaluation_json") if not job_outputs.get(k)]
    if missing:
        raise PromotionError(f"job_outputs lacks {', '.join(missing)}")


def stage_version(
    client, layout: ModelLayout, version: int, job_outputs: Mapping[str, Any]
) -> tuple[ObjectTable, str]:
    """Copy/upload a version's objects (all but lineage.json) into ``v<NNNN>/``.

    Idempotent: the same inputs give the same keys and bytes. Objects under the version's
    prefix that are not in the new table (left by an earlier attempt with other inputs) are
    deleted, so the prefix holds exactly the table. Returns the object table and the source
    ETag of model.tar.gz.
    """
    check_job_outputs(job_outputs)
    bucket = layout.bucket
    objects: ObjectTable = {}
    for name, key in ((CLASSES_FILE, "classes_json"), (EVALUATION_FILE, "evaluation_json")):
        data = _load_document(client, job_outputs[key], key)
        objects[name] = put_bytes(client, bucket, layout.key(version, name), data, content_type="application/json")
    if job_outputs.get("report_dir"):
        for name, data in _report_files(client, job_outputs["report_dir"]):
            objects[f"{REPORT_DIR}/{name}"] = put_bytes(client, bucket, layout.key(version, f"{REPORT_DIR}/{name}"), data)
    objects[MODEL_FILE], source_etag = copy_model_archive(
        client, job_outputs["model_tar_uri"], bucket, layout.key(version, MODEL_FILE)
    )
    _remove_strays(client, layout, version, keep=set(objects) | {LINEAGE_FILE})
    return dict(sorted(objects.items())), source_etag


def _remove_strays(client, layout: ModelLayout, version: int, keep: set[str]) -> None:
    prefix = layout.version_prefix(version)
    strays = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=layout.bucket, Prefix=prefix):
        strays.extend(o["Key"] for o in page.get("Contents", []) if o["Key"][len(prefix) :] not in keep)
    for start in range(0, len(strays), 1000):
        client.delete_objects(
            Bucket=layout.bucket, Delete={"Objects": [{"Key": k} for k in strays[start : start + 1000]], "Quiet": True}
        )


def verify_objects(
    client,
    layout: ModelLayout,
    version: int,
    objects: Mapping[str, Mapping[str, Any]],
    *,
    content: bool = True,
    model_source_etag: str | None = None,
) -> None:
    """Check every object of the table in S3: it exists, its size and its ``sha256``
    metadata match; with ``content``, its bytes hash to the recorded SHA-256.

    model.tar.gz (large) is not streamed when its ETag equals ``model_source_etag``: a
    single-part copy keeps the source's ETag, and the source is what was hashed.

    :raises VerificationError: naming each object that does not match, and why.
    """
    if not objects:
        raise VerificationError(layout.version_uri(version), {"(object table)": "empty: nothing to verify"})
    problems: dict[str, str] = {}
    for name, expected in sorted(objects.items()):
        key = layout.key(version, name)
        found = head(client, layout.bucket, key)
        if found is None:
            problems[name] = f"missing ({layout.uri(key)})"
            continue
        if found["ContentLength"] != expected["size"]:
            problems[name] = f"size {found['ContentLength']}, expected {expected['size']}"
            continue
        recorded = found.get("Metadata", {}).get(SHA256_METADATA)
        if recorded != expected["sha256"]:
            problems[name] = f"sha256 metadata {recorded!r}, expected {expected['sha256']}"
            continue
        if not content or (name == MODEL_FILE and model_source_etag and found["ETag"] == model_source_etag):
            continue
        actual, _, _ = stream_sha256(client, layout.bucket, key)
        if actual != expected["sha256"]:
            problems[name] = f"content sha256 {actual}, expected {expected['sha256']}"
    if problems:
        raise VerificationError(layout.version_uri(version), problems)


_LINEAGE_RESERVED = frozenset(
    {"format", "model_name", "version", "dag_run_id", "created_at", "s3_prefix", "model_uri",
     "source_model_uri", "objects"}
)


def build_lineage(
    *,
    layout: ModelLayout,
    version: int,
    run_id: str,
    created_at: str,
    source_model_uri: str,
    objects: ObjectTable,
    lineage: Mapping[str, Any],
) -> dict[str, Any]:
    """lineage.json: the caller's facts (batches, dataset, jobs, image, metrics) plus what
    only promotion knows. Deterministic for one run (``created_at`` is the version's
    allocation time), so a retry writes the same bytes."""
    clash = sorted(_LINEAGE_RESERVED & set(lineage))
    if clash:
        raise PromotionError(f"lineage key(s) {', '.join(clash)} are set by promotion itself")
    return {
        **lineage,
        "format": LINEAGE_FORMAT,
        "model_name": layout.model_name,
        "version": version,
        "dag_run_id": run_id,
        "created_at": created_at,
        "s3_prefix": layout.version_uri(version),
        "model_uri": layout.uri(layout.key(version, MODEL_FILE)),
        "source_model_uri": source_model_uri,
        "objects": dict(objects),
    }


def build_pointer(
    *,
    layout: ModelLayout,
    version: int,
    previous_version: int | None,
    run_id: str,
    action: str,
    promoted_at: str,
    objects: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    if action not in ("promote", "rollback"):
        raise ValueError(f"action must be 'promote' or 'rollback', got {action!r}")
    if previous_version == version:
        raise PromotionError(f"the pointer cannot name v{version:04d} as its own previous version")
    return {
        "model_name": layout.model_name,
        "version": version,
        "previous_version": previous_version,
        "s3_prefix": layout.version_uri(version),
        "model_uri": layout.uri(layout.key(version, MODEL_FILE)),
        "promoted_at": promoted_at,
        "dag_run_id": run_id,
        "action": action,
        "objects": dict(sorted(objects.items())),
    }


def read_pointer(client, layout: ModelLayout) -> dict[str, Any] | None:
    """production.json, or ``None`` when no version was ever promoted.

    :raises PromotionError: it exists but is not a pointer (never guessed around).
    """
    try:
        data = client.get_object(Bucket=layout.bucket, Key=layout.pointer_key)["Body"].read()
    except Exception as exc:
        if _is_missing(exc):
            return None
        raise
    try:
        pointer = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromotionError(f"{layout.pointer_uri} is not valid JSON ({exc}); fix it before promoting") from None
    missing = [k for k in POINTER_KEYS if not isinstance(pointer, dict) or k not in pointer]
    if missing or not isinstance(pointer.get("version"), int):
        raise PromotionError(
            f"{layout.pointer_uri} is not a production pointer (missing or bad: {', '.join(missing) or 'version'})"
        )
    return pointer


def write_pointer(client, layout: ModelLayout, pointer: Mapping[str, Any]) -> bytes:
    """Replace production.json in one PutObject (atomic for readers); returns the bytes."""
    data = json_bytes(dict(pointer))
    put_bytes(client, layout.bucket, layout.pointer_key, data, content_type="application/json")
    return data
