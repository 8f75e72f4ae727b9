"""What a person sees in the UI: the job tasks' extra links, the training job's PROGRESS line,
the report that a pre-signed link opens whole, and the run's summary table."""

from __future__ import annotations

import json
import urllib.request
from types import SimpleNamespace

import pytest

from sku_contracts import metrics
from sku_retraining.operators import links
from sku_retraining.tasks.decision import summary_table
from sku_retraining.tasks.evaluation import STANDALONE_REPORT_FILE, inline_images, report_prefix

JOB = "sku-train-0123456789abcdef"
TI_KEY = SimpleNamespace(dag_id="sku_retraining", task_id="train_model", run_id="r", map_index=-1)


@pytest.fixture
def xcom(monkeypatch):
    """The XComs of TI_KEY, as the links read them (``XCom.get_value``)."""
    store: dict[str, object] = {}
    monkeypatch.setattr(links.XCom, "get_value", staticmethod(lambda *, key, ti_key: store.get(key)))
    return store


@pytest.fixture
def sagemaker_config(monkeypatch):
    monkeypatch.setenv("SKU_RETRAINING_JOB_BACKEND", "sagemaker")
    monkeypatch.setenv("AIRFLOW_VAR_SKU_RETRAINING_CONFIG", json.dumps({"region_name": "eu-west-1"}))


def test_sagemaker_links_from_the_tasks_return_value(xcom, sagemaker_config):
    xcom["return_value"] = {"Training": {"TrainingJobName": JOB,
                                         "TrainingJobArn": f"arn:aws:sagemaker:eu-west-1:1:training-job/{JOB}"}}
    operator = SimpleNamespace(job_backend=None)
    assert links.SageMakerTrainingJobLink().get_link(operator, ti_key=TI_KEY) == (
        f"https://console.aws.amazon.com/sagemaker/home?region=eu-west-1#/jobs/{JOB}")
    assert links.SageMakerTrainingLogsLink().get_link(operator, ti_key=TI_KEY) == (
        "https://console.aws.amazon.com/cloudwatch/home?region=eu-west-1#logsV2:log-groups/log-group/"
        f"$252Faws$252Fsagemaker$252FTrainingJobs$3FlogStreamNameFilter$3D{JOB}")
    # A job in the China partition gets its console domain.
    xcom["return_value"]["Training"]["TrainingJobArn"] = f"arn:aws-cn:sagemaker:cn-north-1:1:training-job/{JOB}"
    assert links.SageMakerTrainingJobLink().get_link(operator, ti_key=TI_KEY).startswith(
        "https://console.amazonaws.cn/sagemaker/")


def test_sagemaker_links_are_empty_on_the_local_backend_and_before_a_job(xcom, monkeypatch):
    monkeypatch.setenv("SKU_RETRAINING_JOB_BACKEND", "local")
    operator = SimpleNamespace(job_backend=None)
    assert links.SageMakerTrainingJobLink().get_link(operator, ti_key=TI_KEY) == ""  # no job yet
    xcom["return_value"] = {"Training": {"TrainingJobName": JOB}}
    assert links.SageMakerTrainingJobLink().get_link(operator, ti_key=TI_KEY) == ""
    assert links.SageMakerTrainingLogsLink().get_link(operator, ti_key=TI_KEY) == ""


def test_persisted_links_are_pushed_where_the_ui_reads_them_while_the_job_runs(xcom, sagemaker_config):
    """persist_job_links stores the parameters and the final URL (``_link_<class>``) at once."""
    from sku_retraining.config import load_config_from_airflow

    pushed = {}

    def xcom_push(key, value):
        pushed[key] = value
        xcom[key] = value

    ti = SimpleNamespace(xcom_push=xcom_push, **vars(TI_KEY))
    operator = SimpleNamespace(job_backend=None, do_xcom_push=True)
    links.persist_job_links({"ti": ti}, operator, cfg=load_config_from_airflow(), job_name=JOB)
    assert pushed["_link_SageMakerTrainingJobLink"].endswith(f"/sagemaker/home?region=eu-west-1#/jobs/{JOB}")
    assert pushed["_link_SageMakerTrainingLogsLink"].endswith(f"$3FlogStreamNameFilter$3D{JOB}")
    assert pushed[links.SageMakerTrainingJobLink.key]["job_name"] == JOB


def test_evaluation_report_link_is_a_presigned_url_that_opens_the_report(xcom, s3_endpoint, s3_client):
    from sku_retraining.config import load_config

    name = "sku-evaluate-0123456789abcdef"
    key = report_prefix(load_config(), name) + STANDALONE_REPORT_FILE
    s3_client.put_object(Bucket="sku-retraining-data", Key=key, Body=b"<html><h1>Evaluation</h1></html>")
    xcom["return_value"] = {"Training": {"TrainingJobName": name}}
    url = links.EvaluationReportLink().get_link(SimpleNamespace(), ti_key=TI_KEY)
    assert url.startswith(f"{s3_endpoint}/sku-retraining-data/{key}?") and "Signature" in url
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - the test's own moto URL
        assert response.read() == b"<html><h1>Evaluation</h1></html>"
        assert response.headers["Content-Type"].startswith("text/html")


def test_inline_images_makes_the_report_one_self_contained_file(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "bars.png").write_bytes(b"\x89PNG-bars")
    (tmp_path.parent / "secret.png").write_bytes(b"outside")
    html = ('<img class="plot" src="plots/bars.png" alt="a"><img src="../secret.png">'
            '<img src="https://example.com/x.png"><a href="evaluation.json">json</a>')
    out = inline_images(html, tmp_path)
    assert '<img class="plot" src="data:image/png;base64,iVBORy1iYXJz" alt="a">' in out
    assert '<img src="../secret.png">' in out  # outside the report folder: left alone
    assert '<img src="https://example.com/x.png">' in out
    assert '<a href="evaluation.json">' in out


def test_progress_line_reads_at_a_glance_and_is_no_metric_line():
    line = metrics.format_progress_line(epoch=3, epochs=10, step=120, steps=450, images_per_sec=812.34, loss=1.23456,
                                        eta_seconds=3725, best_val_top1=0.81234, best_epoch=2)
    assert line == ("PROGRESS epoch 3/10 step 120/450 (26%) | 812.3 img/s | loss 1.2346 | ETA 1h02m | "
                    "best val top-1 0.8123 (epoch 2)")
    match = metrics.PROGRESS_RE.search("[1,mpirank:0,algo-1]<stdout>:" + line)
    assert match and match["epoch"] == "3" and match["eta"] == "1h02m" and match["best"] == "0.8123 (epoch 2)"
    assert metrics.parse_metric_lines(line) == {}  # CloudWatch's regexes never read it
    first = metrics.format_progress_line(epoch=1, epochs=4, step=1, steps=9, images_per_sec=0.0, loss=2.0,
                                         eta_seconds=None, best_val_top1=-1.0, best_epoch=0)
    assert first.endswith("| ETA ? | best val top-1 -") and metrics.PROGRESS_RE.search(first)


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "?"), (float("nan"), "?"), (-1, "?"), (0, "0s"), (45.4, "45s"), (725, "12m05s"),
    (11220, "3h07m"), (187200, "2d04h"),
])
def test_format_duration(seconds, text):
    assert metrics.format_duration(seconds) == text


def test_eta_is_the_rate_so_far_times_what_is_left():
    assert metrics.eta_seconds(elapsed=100.0, done_steps=50, total_steps=200) == pytest.approx(300.0)
    assert metrics.eta_seconds(elapsed=0.0, done_steps=0, total_steps=200) is None


def test_summary_table_is_aligned():
    table = summary_table([("run", "manual__1"), ("outcome", "REJECTED: overall top-1 0.5 does not meet >= 0.8")])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # a box
    assert lines[1] == "| run     | manual__1                                        |"
