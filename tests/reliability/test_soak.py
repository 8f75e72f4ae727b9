"""The soak's short form (what CI runs): two monthly runs of the whole DAG on the local
stack, the second triggered twice at once, invariants after every month (see
devtools/sku_dev/soak.py; ``./dev soak`` is the five-month form)."""

from __future__ import annotations

import pytest

from sku_dev.soak import SoakSize, run_soak

pytestmark = pytest.mark.slow


def test_soak_short_form(airflow_env, tmp_path):
    size = SoakSize.short()
    reports = run_soak(airflow_env, size, log_file=tmp_path / "soak.log", reset=False)
    assert len(reports) == size.months, (tmp_path / "soak.log").read_text()[-4000:]
    for report in reports:
        assert report.returncode == 0, (tmp_path / "soak.log").read_text()[-4000:]
        assert report.violations == []
    assert reports[-1].facts["skus"] == size.months * size.new_skus_per_month
    assert reports[-1].facts["production_version"] is not None
