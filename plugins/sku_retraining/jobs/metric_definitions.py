"""The training image's metric regexes, read from its own torch-free ``metrics.py``.

Loaded by file path (the Airflow environment does not have the image's code on its path),
so CloudWatch ``MetricDefinitions`` and the local backend's parser use the regexes the job
itself defines.
"""

from __future__ import annotations

import importlib.util
from functools import cache

from sku_retraining.config import PROJECT_ROOT

METRICS_FILE = PROJECT_ROOT / "training_image" / "code" / "sku_jobs" / "metrics.py"


@cache
def _module():
    spec = importlib.util.spec_from_file_location("sku_training_image_metrics", METRICS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_metric_definitions() -> tuple[dict[str, str], ...]:
    return tuple(dict(d) for d in _module().METRIC_DEFINITIONS)


def evaluation_metric_definitions() -> tuple[dict[str, str], ...]:
    return tuple(dict(d) for d in getattr(_module(), "EVALUATION_METRIC_DEFINITIONS", ()))
