"""NewSkuBatchSensor against a real catalogue and S3: new batches, force_retrain, timeout → skip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from airflow.sdk import PokeReturnValue
from airflow.sdk.exceptions import AirflowSkipException

from sku_dev.synthetic import generate_batch, make_skus, upload_batch
from sku_retraining.config import load_config
from sku_retraining.sensors.new_batches import NewSkuBatchSensor
from sku_retraining.tasks import intake


@pytest.fixture
def cfg(catalogue_conn_env, s3_endpoint, fsx_root, monkeypatch):
    config = load_config()
    intake.migrate_catalogue(cfg=config)
    monkeypatch.setattr(intake, "load_config_from_airflow", lambda: config)
    return config


def context() -> dict:
    return {"run_id": "manual__test", "ti": SimpleNamespace(try_number=1, dag_id="sku_retraining")}


def test_pokes_until_a_new_complete_batch_arrives(cfg, s3_client):
    sensor = NewSkuBatchSensor(task_id="wait", poke_interval=0, timeout=60)
    assert sensor.poke(context()) is False
    upload_batch(s3_client, cfg.data_bucket, generate_batch("b1", make_skus(2), 3, seed=1))
    result = sensor.poke(context())
    assert isinstance(result, PokeReturnValue) and result.is_done and result.xcom_value == ["b1"]


def test_force_retrain_continues_with_nothing_new(cfg):
    sensor = NewSkuBatchSensor(task_id="wait", force_retrain="True", poke_interval=0, timeout=60)
    result = sensor.poke(context())
    assert result.is_done and result.xcom_value == []


def test_explicit_batch_ids_skip_the_wait(cfg, s3_client):
    upload_batch(s3_client, cfg.data_bucket, generate_batch("b1", make_skus(2), 3, seed=1))
    intake.register_batches(["b1"], run_id="r0", cfg=cfg)  # registered already: not "new"...
    sensor = NewSkuBatchSensor(task_id="wait", batch_ids=["b1"], poke_interval=0, timeout=60)
    assert sensor.poke(context()).xcom_value == ["b1"]  # ...but asked for explicitly


def test_nothing_new_by_the_timeout_skips_the_run(cfg):
    sensor = NewSkuBatchSensor(task_id="wait", poke_interval=0.2, timeout=1, mode="poke", soft_fail=True)
    with pytest.raises(AirflowSkipException):
        sensor.execute(context())
