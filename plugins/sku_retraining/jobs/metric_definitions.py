"""The jobs' metric regexes, from the contracts package both sides install
(:mod:`sku_contracts.metrics`): CloudWatch ``MetricDefinitions`` and the local backend's
parser use the regexes the job's own printer is tested against."""

from __future__ import annotations

from sku_contracts import metrics


def training_metric_definitions() -> tuple[dict[str, str], ...]:
    return tuple(dict(d) for d in metrics.METRIC_DEFINITIONS)


def evaluation_metric_definitions() -> tuple[dict[str, str], ...]:
    return tuple(dict(d) for d in metrics.EVALUATION_METRIC_DEFINITIONS)
