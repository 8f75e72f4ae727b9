"""Job names derived from the DAG run, and the request fingerprint that says which request a
job ran, so a retried or cleared task re-attaches only to a job that ran *its* request."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

_ALLOWED = re.compile(r"[^a-zA-Z0-9-]+")

#: The tag every job carries: :func:`request_fingerprint` of its request.
FINGERPRINT_TAG = "sku:request-fingerprint"
#: Request members left out of the fingerprint: the name (an attempt suffix is not a change),
#: the tags (run/task bookkeeping) and the checkpoint location (derived from the fingerprint).
_NOT_FINGERPRINTED = ("TrainingJobName", "Tags", "CheckpointConfig")
MAX_ATTEMPTS = 50


def job_name(kind: str, dag_id: str, run_id: str, attempt: int = 1) -> str:
    """``sku-<kind>-<10 hex of dag+run>[-t<attempt>]``: stable per run, <= 63 characters."""
    digest = hashlib.sha256(f"{dag_id}\x00{run_id}".encode()).hexdigest()[:10]
    base = f"sku-{_ALLOWED.sub('-', kind).strip('-')[:30]}-{digest}"
    return base if attempt <= 1 else f"{base}-t{attempt}"


def attempt_names(kind: str, dag_id: str, run_id: str, up_to: int = MAX_ATTEMPTS) -> list[str]:
    """Names of attempts 1..``up_to``, oldest first."""
    return [job_name(kind, dag_id, run_id, n) for n in range(1, max(1, up_to) + 1)]


def request_fingerprint(request: Mapping[str, Any]) -> str:
    """16 hex of the canonical JSON of everything the job computes from: image, hyperparameters
    (epochs, learning rate, warm start...), input channels (the dataset snapshot, the champion
    model), resources, stopping condition, output path, environment, VPC, role."""
    material = {k: v for k, v in request.items() if k not in _NOT_FINGERPRINTED}
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def tag_value(tags: list[Mapping[str, str]] | None, key: str) -> str | None:
    for tag in tags or ():
        if tag.get("Key") == key:
            return tag.get("Value")
    return None
