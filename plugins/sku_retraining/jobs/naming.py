"""SageMaker job names derived from the DAG run, so a retried task finds its own job."""

from __future__ import annotations

import hashlib
import re

_ALLOWED = re.compile(r"[^a-zA-Z0-9-]+")


def job_name(kind: str, dag_id: str, run_id: str, attempt: int = 1) -> str:
    """``sku-<kind>-<8 hex of dag+run>[-t<attempt>]``: stable per run, <= 63 characters."""
    digest = hashlib.sha256(f"{dag_id}\x00{run_id}".encode()).hexdigest()[:10]
    base = f"sku-{_ALLOWED.sub('-', kind).strip('-')[:30]}-{digest}"
    return base if attempt <= 1 else f"{base}-t{attempt}"


def attempt_names(kind: str, dag_id: str, run_id: str, up_to: int) -> list[str]:
    """Names of attempts 1..``up_to``, newest first."""
    return [job_name(kind, dag_id, run_id, n) for n in range(max(1, up_to), 0, -1)]
