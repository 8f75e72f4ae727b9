"""Find complete SKU batches in S3 and inspect their files, ready for registration.

S3 side only (the catalogue side is :mod:`sku_retraining.catalogue.registration`). Takes an
``S3Hook`` so the provider's connection handling (``aws_default``, endpoint_url for the
local stack, retries) applies.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from sku_contracts.ids import InvalidIdError, check_id
from sku_retraining.catalogue.registration import StagedImage
from sku_retraining.config import IntakeConfig
from sku_retraining.image_check import ImageProblem, inspect_image
from sku_retraining.layout import BatchLayout, parse_image_key
from sku_retraining.manifest import BatchManifest, ManifestError, parse_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompleteBatch:
    batch_id: str
    marker_last_modified: datetime


def discover_complete_batches(s3_hook, bucket: str, incoming_prefix: str) -> tuple[list[CompleteBatch], list[str]]:
    """Batches under ``incoming_prefix`` whose ``_SUCCESS`` marker exists.

    :return: (complete batches sorted by id, folder names ignored because they are not valid
        batch ids — reported by the caller, never registered).
    """
    prefixes = s3_hook.list_prefixes(bucket_name=bucket, prefix=incoming_prefix, delimiter="/") or []
    complete: list[CompleteBatch] = []
    invalid: list[str] = []
    for prefix in sorted(prefixes):
        name = prefix[len(incoming_prefix) :].rstrip("/")
        try:
            check_id("batch_id", name)
        except InvalidIdError as exc:
            invalid.append(str(exc))
            continue
        head = s3_hook.head_object(key=BatchLayout(incoming_prefix, name).success_key, bucket_name=bucket)
        if head is not None:
            complete.append(CompleteBatch(name, head["LastModified"]))
    return complete, invalid


def read_manifest(s3_hook, bucket: str, layout: BatchLayout) -> BatchManifest:
    """Read and validate the batch's manifest. :raises ManifestError: with the reason."""
    client = s3_hook.get_conn()
    try:
        raw = client.get_object(Bucket=bucket, Key=layout.manifest_key)["Body"].read()
    except client.exceptions.NoSuchKey:
        raw = None
    return parse_manifest(layout.batch_id, raw)


def _stage_one(client, bucket: str, layout: BatchLayout, key: str, size: int, cfg: IntakeConfig) -> StagedImage:
    try:
        parsed = parse_image_key(layout, key)
    except InvalidIdError as exc:
        return StagedImage(key, None, None, size, problem_code="invalid_path", problem_detail=str(exc))
    extension = posixpath.splitext(parsed.file_name)[1].lower()
    if extension not in cfg.allowed_extensions:
        return StagedImage(
            key, parsed.sku_id, None, size, problem_code="unsupported_format",
            problem_detail=f"extension {extension or '(none)'!r} is not accepted "
            f"(accepted: {', '.join(cfg.allowed_extensions)})",
        )
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    facts = inspect_image(data, allowed_formats=tuple(cfg.allowed_formats), min_side=cfg.min_side)
    if isinstance(facts, ImageProblem):
        return StagedImage(
            key, parsed.sku_id, facts.sha256, facts.n_bytes,
            problem_code=facts.code, problem_detail=f"{facts.detail} ({key})",
        )
    return StagedImage(key, parsed.sku_id, facts.sha256, facts.n_bytes, facts.width, facts.height,
                       phash=facts.phash)


def inspect_batch_images(s3_hook, bucket: str, layout: BatchLayout, cfg: IntakeConfig) -> list[StagedImage]:
    """Download and inspect every object under the batch's ``images/`` prefix.

    S3 errors propagate (the task fails and is retried; nothing has been written yet).
    Problems with a file become a :class:`StagedImage` with ``problem_code`` set.
    """
    objects = [
        (o["Key"], o["Size"])
        for o in s3_hook.iter_file_metadata(prefix=layout.images_prefix, bucket_name=bucket)
        if not o["Key"].endswith("/")
    ]
    client = s3_hook.get_conn()
    with ThreadPoolExecutor(max_workers=max(1, cfg.download_workers)) as pool:
        staged = list(pool.map(lambda ks: _stage_one(client, bucket, layout, ks[0], ks[1], cfg), objects))
    return sorted(staged, key=lambda s: s.object_key)


__all__ = [
    "CompleteBatch",
    "ManifestError",
    "discover_complete_batches",
    "inspect_batch_images",
    "read_manifest",
]
