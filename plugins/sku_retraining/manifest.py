"""Batch manifests: parsing and JSON-schema validation with messages that say what and where."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cache

from sku_retraining.config import resource_text

SCHEMA_RESOURCE = ("schemas", "batch_manifest.schema.json")


class ManifestError(ValueError):
    """The manifest of a batch is missing, unreadable or breaks the schema."""

    def __init__(self, batch_id: str, reason: str) -> None:
        super().__init__(f"batch {batch_id!r}: manifest rejected: {reason}")
        self.batch_id = batch_id
        self.reason = reason


@dataclass(frozen=True)
class SkuEntry:
    sku_id: str
    name: str
    brand: str
    category: str


@dataclass(frozen=True)
class BatchManifest:
    batch_id: str
    created_at: str
    skus: tuple[SkuEntry, ...]
    sha256: str
    # Optional per-image split groups: "<sku_id>/<file>" (relative to images/) -> group, from
    # the manifest's "images" list (see docs/contracts.md); images not listed are grouped by
    # near-duplicate clustering at registration.
    image_groups: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def sku_ids(self) -> frozenset[str]:
        return frozenset(s.sku_id for s in self.skus)


@cache
def _validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(resource_text(*SCHEMA_RESOURCE))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def parse_manifest(batch_id: str, raw: bytes | None) -> BatchManifest:
    """Validate ``raw`` (the bytes of ``manifest.json``) for ``batch_id``.

    :raises ManifestError: missing, not UTF-8 JSON, schema violations (each with its JSON
        path), a ``batch_id`` that differs from the folder, or a SKU listed twice.
    """
    if raw is None:
        raise ManifestError(batch_id, "manifest.json is missing")
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(batch_id, f"manifest.json is not valid UTF-8 JSON: {exc}") from None
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(
            f"at {'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors[:5]
        )
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ManifestError(batch_id, f"schema violation {details}{more}")
    if document["batch_id"] != batch_id:
        raise ManifestError(
            batch_id, f"batch_id {document['batch_id']!r} in manifest.json differs from the folder name"
        )
    seen: set[str] = set()
    duplicates = sorted({s["sku_id"] for s in document["skus"] if s["sku_id"] in seen or seen.add(s["sku_id"])})
    if duplicates:
        raise ManifestError(batch_id, f"sku_id listed more than once: {', '.join(duplicates)}")
    skus = tuple(
        SkuEntry(sku_id=s["sku_id"], name=s["name"], brand=s["brand"], category=s["category"])
        for s in document["skus"]
    )
    image_groups: dict[str, str] = {}
    for entry in document.get("images") or ():
        path = entry["path"]
        if path in image_groups:
            raise ManifestError(batch_id, f"images: path {path!r} listed more than once")
        if path.split("/", 1)[0] not in seen:
            raise ManifestError(batch_id, f"images: path {path!r} is not under a SKU listed in skus")
        if entry.get("group") is not None:
            image_groups[path] = entry["group"]
    return BatchManifest(
        batch_id=batch_id,
        created_at=document["created_at"],
        skus=skus,
        sha256=hashlib.sha256(raw).hexdigest(),
        image_groups=image_groups,
    )
