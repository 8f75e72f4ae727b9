"""The one typed configuration: layers, errors, and what parse time may read."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sku_retraining.config import CONFIG_FILE_ENV, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_layers_later_ones_win(tmp_path: Path) -> None:
    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps({"data_bucket": "acme-sku", "region_name": "eu-west-1"}))
    cfg = load_config(
        variable_json=json.dumps({"region_name": "eu-central-1", "local_jobs": {"train_epochs": 7}}),
        environ={CONFIG_FILE_ENV: str(deployment)},
    )
    assert cfg.data_bucket == "acme-sku"
    assert cfg.region_name == "eu-central-1"
    assert cfg.local_jobs.train_epochs == 7
    assert cfg.sagemaker.train_arch == "resnet152"  # the packaged default


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"sagemaker\.role_arm"):
        load_config(variable_json=json.dumps({"sagemaker": {"role_arm": "x"}}), environ={})


@pytest.mark.parametrize("key", ["data_bucket", "model_name", "prefixes"])
def test_variable_may_not_set_what_parse_time_reads(key: str) -> None:
    value = {"models": "m/"} if key == "prefixes" else "other"
    with pytest.raises(ConfigError, match=rf"sets {key}: deployment settings"):
        load_config(variable_json=json.dumps({key: value}), environ={})


def test_production_asset_names_the_bucket_tasks_write(tmp_path: Path) -> None:
    """The DAG's Asset (parse time) and the promotion's pointer (run time) are one URI."""
    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps({"data_bucket": "acme-sku-images", "model_name": "till-cnn"}))
    code = (
        "import json, sys\n"
        "from sku_retraining.assets import production_model_asset\n"
        "from sku_retraining.config import load_config_from_airflow\n"
        "from sku_retraining.promotion import ModelLayout\n"
        "from unittest import mock\n"
        "with mock.patch('airflow.sdk.Variable.get', return_value=json.dumps({'region_name': 'eu-west-1'})):\n"
        "    cfg = load_config_from_airflow()\n"
        "print(json.dumps([production_model_asset().uri, ModelLayout.from_config(cfg).pointer_uri]))\n"
    )
    env = {**_env(), CONFIG_FILE_ENV: str(deployment)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    asset_uri, pointer_uri = json.loads(out.stdout.strip().splitlines()[-1])
    assert asset_uri == pointer_uri == "s3://acme-sku-images/models/till-cnn/production.json"


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SKU_RETRAINING_")}
    env["PYTHONPATH"] = str(ROOT / "plugins")
    return env


def test_runs_from_a_plugins_zip_alone(tmp_path: Path) -> None:
    """MWAA ships plugins.zip: config, migrations and the manifest schema load from it."""
    archive = tmp_path / "plugins.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for package in ("sku_retraining", "sku_contracts"):
            for path in (ROOT / "plugins" / package).rglob("*"):
                if path.is_file() and "__pycache__" not in path.parts:
                    zf.write(path, path.relative_to(ROOT / "plugins").as_posix())
    code = (
        "import sku_retraining, json\n"
        "assert '.zip' in sku_retraining.__file__, sku_retraining.__file__\n"
        "from sku_retraining.config import load_config\n"
        "from sku_retraining.catalogue.migrations import discover\n"
        "from sku_retraining.manifest import parse_manifest\n"
        "from sku_retraining.jobs.metric_definitions import training_metric_definitions\n"
        "cfg = load_config(environ={})\n"
        "names = [m.name for m in discover()]\n"
        "m = parse_manifest('b1', json.dumps({'batch_id': 'b1', 'created_at': '2026-12-01T00:00:00Z', 'skus': [{'sku_id': 'S1', 'name': 'n', 'brand': 'b', 'category': 'c'}]}).encode())\n"
        "print(json.dumps({'bucket': cfg.data_bucket, 'migrations': names, 'metrics': len(training_metric_definitions())}))\n"
    )
    env = _env()
    env["PYTHONPATH"] = str(archive)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bucket"] == load_config(environ={}).data_bucket
    assert result["migrations"][:2] == ["catalogue", "model_registry"]
    assert result["metrics"] > 0
