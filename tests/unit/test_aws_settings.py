"""#8.4: ``aws_conn_id`` and ``region_name`` from configuration reach every AWS client."""

from __future__ import annotations

import json

import pytest

from sku_retraining.config import load_config
from sku_retraining.operators.training import SkuTrainingOperator
from sku_retraining.tasks import hooks
from sku_retraining.tasks import promotion as promotion_tasks

SNAPSHOT = {"s3_uri": "s3://b/datasets/ds-0123456789abcdef/", "snapshot_id": "ds-0123456789abcdef"}


@pytest.fixture
def cfg():
    return load_config(variable_json=json.dumps({"region_name": "eu-west-1", "aws_conn_id": "acme_aws",
                                                 "catalogue_conn_id": "acme_pg"}), environ={})


def test_task_hooks_use_the_configured_connection_and_region(cfg):
    catalogue, s3 = hooks.pipeline_hooks(cfg)
    assert (s3.aws_conn_id, s3.region_name) == ("acme_aws", "eu-west-1")
    assert catalogue.postgres_conn_id == "acme_pg"
    fsx = hooks.aws_hook(cfg, client_type="fsx")
    assert (fsx.aws_conn_id, fsx.region_name, fsx.client_type) == ("acme_aws", "eu-west-1", "fsx")


def test_promotion_and_notification_clients_use_them_too(cfg, monkeypatch):
    seen = []
    real = hooks.aws_hook

    def spy(c, hook_class=None, **kwargs):
        hook = real(c, hook_class, **kwargs)
        seen.append((type(hook).__name__, hook.aws_conn_id, hook.region_name))
        return hook

    monkeypatch.setattr(hooks, "aws_hook", spy)
    monkeypatch.setattr("airflow.providers.amazon.aws.hooks.s3.S3Hook.get_conn", lambda self: "client")
    promotion_tasks._clients(cfg)
    assert ("S3Hook", "acme_aws", "eu-west-1") in seen


def test_sagemaker_operator_takes_them_at_run_time_unless_given(cfg):
    operator = SkuTrainingOperator(task_id="train_model", snapshot=SNAPSHOT)
    operator._apply_config(cfg)
    assert (operator.aws_conn_id, operator.region_name) == ("acme_aws", "eu-west-1")
    assert (operator.hook.aws_conn_id, operator.hook.region_name) == ("acme_aws", "eu-west-1")

    explicit = SkuTrainingOperator(task_id="train_model", snapshot=SNAPSHOT, aws_conn_id="other", region_name="ap-south-1")
    explicit._apply_config(cfg)
    assert (explicit.hook.aws_conn_id, explicit.hook.region_name) == ("other", "ap-south-1")


def test_local_attempts_follow_the_fingerprint_and_kill_superseded_leftovers(cfg, monkeypatch):
    """Local backend: a recorded job of another request is passed over (and its leftovers
    killed when it was left InProgress); a matching Completed job is adopted."""
    from sku_retraining.jobs.naming import FINGERPRINT_TAG

    records = {
        "sku-train-a": {"TrainingJobStatus": "InProgress", "Tags": [{"Key": FINGERPRINT_TAG, "Value": "old"}]},
        "sku-train-a-t2": {"TrainingJobStatus": "Completed", "Tags": [{"Key": FINGERPRINT_TAG, "Value": "new"}]},
    }
    killed = []

    class Runner:
        def describe(self, name):
            return records.get(name)

        def kill_leftovers(self, name):
            killed.append(name)

    operator = SkuTrainingOperator(task_id="train_model", snapshot=SNAPSHOT)
    monkeypatch.setattr(operator, "_runner", lambda c: Runner())
    names = ["sku-train-a", "sku-train-a-t2", "sku-train-a-t3"]
    assert operator._choose_attempt(names, "new", local=True, cfg=cfg) == ("sku-train-a-t2", "Completed")
    assert killed == ["sku-train-a"]
    assert operator._choose_attempt(names, "newer", local=True, cfg=cfg) == ("sku-train-a-t3", None)
