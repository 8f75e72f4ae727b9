"""What the operators ask the jobs for (issue #10): the freeze setting, the warm-start recipe of a
warm-started month, and variants at the training resolution."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sku_contracts.files import variant_max_side
from sku_retraining.config import load_config
from sku_retraining.operators.augmentation import FsxAugmentationOperator
from sku_retraining.operators.training import SkuTrainingOperator

RUN_ID = "scheduled__2026-12-01T03:00:00+00:00"
SNAPSHOT = {"s3_uri": "s3://sku-retraining-data/datasets/ds-0123456789abcdef/", "num_classes": 12,
            "snapshot_id": "ds-0123456789abcdef"}
PRODUCTION = {"version": 1, "model_uri": "s3://sku-retraining-data/models/sku-recognition/v0001/model.tar.gz"}


@pytest.fixture
def cfg():
    return load_config(environ={"SKU_RETRAINING_JOB_BACKEND": "sagemaker"})


def context(params: dict | None = None) -> dict:
    ti = SimpleNamespace(dag_id="sku_retraining", task_id="train_model", try_number=1, run_id=RUN_ID, map_index=-1)
    return {"ti": ti, "run_id": RUN_ID, "params": {"batch_ids": ["2026-11-a"], **(params or {})}}


def hyperparameters(cfg, params: dict | None = None, **kwargs) -> dict[str, str]:
    operator = SkuTrainingOperator(task_id="train_model", snapshot=SNAPSHOT, **kwargs)
    return operator.build_request(context(params), cfg, "sku-train-x")["HyperParameters"]


def test_a_warm_started_month_follows_the_measured_recipe(cfg):
    warm = hyperparameters(cfg, production=PRODUCTION)
    recipe = cfg.warm_start
    assert warm["epochs"] == str(round(cfg.sagemaker.train_epochs * recipe.epochs_fraction))
    assert warm["replay_balanced"].lower() == str(recipe.replay_balanced).lower()
    assert float(warm["backbone_lr_mult"]) == recipe.backbone_lr_mult
    assert float(warm["distill_weight"]) == recipe.distill_weight
    assert warm["freeze"] == "auto"
    # The first month (no production model) is a full training, without the recipe.
    first = hyperparameters(cfg, production=None)
    assert first["epochs"] == str(cfg.sagemaker.train_epochs)
    assert not {"replay_balanced", "backbone_lr_mult", "distill_weight"} & set(first)
    # Warm start switched off: a full retrain too. Epochs given by hand always win.
    assert hyperparameters(cfg, production=PRODUCTION, warm_start=False)["epochs"] == str(cfg.sagemaker.train_epochs)
    assert hyperparameters(cfg, production=PRODUCTION, epochs=7)["epochs"] == "7"


def test_the_freeze_param_reaches_the_job(cfg):
    assert hyperparameters(cfg, {"freeze": "none"}, production=None)["freeze"] == "none"
    assert hyperparameters(cfg, {"freeze": "conv1,bn1"}, production=None)["freeze"] == "conv1,bn1"


def test_variants_are_written_at_the_training_resolution(cfg):
    inputs = {"s3_uri": "s3://sku-retraining-data/datasets/augment-inputs/x/", "count": 5, "variants_per_image": 4}

    def max_side(**kwargs) -> str:
        op = FsxAugmentationOperator(task_id="augment_on_fsx", augment_inputs=inputs, **kwargs)
        return op.build_request(context(), cfg, "sku-augment-x")["HyperParameters"]["max_side"]

    assert max_side() == str(variant_max_side(cfg.sagemaker.train_image_size)) == "342"
    assert max_side(max_side=256) == "256"
    assert variant_max_side(96) == 147 and variant_max_side(64) == 98
    # The shorter side of a 3:4 variant is never below what the loader decodes at (size / 0.875).
    for size in (64, 96, 160, 224, 299):
        assert variant_max_side(size) * 0.75 >= size / 0.875
