"""Fixtures for the reliability suite: an Airflow home and environment for ``airflow dags
test`` subprocesses on this test's local stack (as tests/e2e does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def soak_env(tmp_path, catalogue_conn_env, s3_endpoint, fsx_root) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow-home"),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=f"{ROOT / 'plugins'}:{ROOT / 'devtools'}",
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        SKU_RETRAINING_JOB_BACKEND="local",
    )
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    return env
