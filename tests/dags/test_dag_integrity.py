"""DAG integrity (the Astro template's test, extended): imports, tags, retries, params, parse time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = ROOT / "dags"
DAG_FILES = sorted(DAGS_DIR.glob("*.py"))


@pytest.fixture(scope="module")
def dag_bag():
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.0.x (MWAA): DagBag still lives in airflow.models
        from airflow.models.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR), safe_mode=False)


def test_no_import_errors(dag_bag):
    assert dag_bag.import_errors == {}, dag_bag.import_errors
    assert "sku_retraining" in dag_bag.dags


def test_every_dag_has_tags_retries_and_docs(dag_bag):
    for dag_id, dag in dag_bag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 200, f"{dag_id} has no doc_md"
        for task in dag.tasks:
            assert task.retries >= 2, f"{dag_id}.{task.task_id} retries={task.retries}"


def test_sku_retraining_schedule_and_params(dag_bag):
    from airflow.sdk.definitions.param import ParamValidationError

    dag = dag_bag.dags["sku_retraining"]
    assert dag.catchup is False
    assert dag.schedule == "0 3 1 * *"
    params = dag.params
    assert params["batch_ids"] is None and params["force_retrain"] is False and params["dry_run"] is False
    params.validate()  # defaults are valid
    batch_ids = params.get_param("batch_ids")
    for hostile in (["../etc"], ["a b"], ["SKU\u2215x"], "2026-11-a"):
        with pytest.raises(ParamValidationError):
            batch_ids.resolve(hostile)
    assert batch_ids.resolve(["2026-11-a", "b_2"]) == ["2026-11-a", "b_2"]
    with pytest.raises(ParamValidationError):
        params.get_param("force_retrain").resolve("yes")


def test_intake_task_order(dag_bag):
    dag = dag_bag.dags["sku_retraining"]
    downstream = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert downstream["migrate_catalogue"] == ["wait_for_new_batches"]
    assert "register_batches" in downstream["wait_for_new_batches"]
    assert downstream["register_batches"] == ["continue_unless_dry_run"]
    sensor = dag.get_task("wait_for_new_batches")
    assert sensor.mode == "reschedule" and sensor.soft_fail is True


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parse_is_light(dag_file):
    """Parse in a fresh interpreter: time it (after Airflow itself is imported, as the DAG
    processor does), and check no heavy module is imported. (boto3 is allowed: the amazon
    provider's operator modules import it, as in every DAG that uses them.)"""
    code = """
import sys, time, importlib.util
import airflow.sdk  # the DAG processor has this loaded already
before = set(sys.modules)
t = time.perf_counter()
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
elapsed = time.perf_counter() - t
banned = {"torch", "torchvision", "sagemaker", "psycopg", "psycopg2", "PIL", "numpy", "jsonschema"}
if airflow.sdk.__version__.startswith("1.0."):  # Airflow 3.0.x validates Param defaults with jsonschema
    banned.discard("jsonschema")                # while the DAG is defined: Airflow's import, not ours
loaded = sorted({m.split(".")[0] for m in set(sys.modules) - before} & banned)
print(f"{elapsed:.4f} {','.join(loaded)}")
"""
    env = {"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin", "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    import os

    env["AIRFLOW_HOME"] = os.environ.get("AIRFLOW_HOME", "/tmp")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(dag_file)], capture_output=True, text=True, env=env, check=True).stdout
    elapsed, _, banned = out.strip().splitlines()[-1].partition(" ")
    print(f"\n{dag_file.name}: parsed in {float(elapsed) * 1000:.0f} ms "
          f"(interpreter + Airflow import {time.perf_counter() - started:.1f} s)")
    assert banned == "", f"{dag_file.name} imports {banned} at parse time"
    # The time is printed, not asserted: speed is measured by bench/, never by timed tests.


FORM_SECTIONS = ["What to train on", "Training", "Promotion gates", "Advanced / AWS"]


def test_trigger_form_sections_and_descriptions(dag_bag):
    """The trigger form: every param in one of the four sections (in this order, each section's
    fields together), with a title and a one-line description."""
    params = dag_bag.dags["sku_retraining"].params
    sections_in_order = []
    for name in params:
        param = params.get_param(name)
        schema = param.schema
        assert schema.get("section") in FORM_SECTIONS, f"param {name} has no form section"
        if not sections_in_order or sections_in_order[-1] != schema["section"]:
            sections_in_order.append(schema["section"])
        assert schema.get("title"), f"param {name} has no title"
        description = param.description or schema.get("description_md") or ""
        assert description.strip(), f"param {name} has no description"
        if param.description:
            assert "\n" not in param.description, f"param {name}: description is not one line"
    assert sections_in_order == FORM_SECTIONS, f"form sections out of order or split: {sections_in_order}"
    assert list(params)[:2] == ["batch_ids", "dry_run"], "the most used fields come first"


def test_rejected_form_value_names_the_field(dag_bag):
    """What the trigger form shows when the API refuses a value: the param's name and why."""
    import copy

    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(dag_bag.dags["sku_retraining"].params)
    with pytest.raises(ParamValidationError, match=r"Invalid input for param batch_ids: '\.\./etc' does not match"):
        params["batch_ids"] = ["../etc"]
    with pytest.raises(ParamValidationError, match=r"Invalid input for param epochs: 0 is less than the minimum of 1"):
        params["epochs"] = 0


def test_failure_notifications_are_wired(dag_bag):
    from sku_retraining.notifications import SkuNotifier

    dag = dag_bag.dags["sku_retraining"]
    callbacks = dag.on_failure_callback if isinstance(dag.on_failure_callback, list) else [dag.on_failure_callback]
    assert any(isinstance(cb, SkuNotifier) and cb.event == "run_failed" for cb in callbacks)
    for task_id in ("augment_on_fsx", "train_model", "evaluate_model"):
        task_callbacks = dag.get_task(task_id).on_failure_callback or []
        task_callbacks = task_callbacks if isinstance(task_callbacks, list) else [task_callbacks]
        assert any(isinstance(cb, SkuNotifier) and cb.event == "task_failed" for cb in task_callbacks), task_id
