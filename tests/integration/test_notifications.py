"""Notifications through Airflow's notifier interface, against moto's SNS.

An SQS queue is subscribed to the topic in moto; what the notifiers publish is read back from
it. The configuration reaches the notifiers at run time through the Airflow Variable
(``AIRFLOW_VAR_SKU_RETRAINING_CONFIG``), as in a deployment.
"""

from __future__ import annotations

import dataclasses
import json

import psycopg
import pytest
from sns_inbox import SnsInbox

from sku_retraining.catalogue.migrations import apply_migrations
from sku_retraining.config import ConfigError, NotificationsConfig, load_config
from sku_retraining.notifications import SkuNotifier, channel_notifiers, decision_notice, send
from sku_retraining.tasks import decision

RUN_ID = "manual__2026-12-01T03:00:00+00:00"
RUN_PATH = "runs/manual__2026-12-01T03%3A00%3A00%2B00%3A00"
REASONS = ["overall top-1 0.5000 does not meet >= 0.8000"]
GATES = [{"gate": "overall top-1", "value": 0.5, "threshold": ">= 0.8000", "passed": False, "note": ""}]


@pytest.fixture
def inbox(s3_endpoint, monkeypatch) -> SnsInbox:
    """moto SNS topic + SQS inbox; the configuration names the topic through the Airflow Variable."""
    box = SnsInbox(s3_endpoint)
    monkeypatch.setenv("AIRFLOW_VAR_SKU_RETRAINING_CONFIG",
                       json.dumps({"notifications": {"sns_topic_arn": box.topic_arn}}))
    return box


@pytest.fixture
def catalogue(catalogue_conn_env, pg_dsn, fsx_root):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_migrations(conn)


def test_rejection_through_the_task_function_reaches_the_topic(inbox, catalogue):
    row = decision.reject_challenger(
        run_id=RUN_ID, evaluation={"report_s3_uri": "s3://sku-retraining-data/jobs/evaluate/x/report/report.html"},
        decision={"reasons": REASONS, "gates": GATES}, context={"dag_id": "sku_retraining", "run_id": RUN_ID},
    )
    assert row["decision"] == "reject"

    [message] = inbox.messages()
    assert message["Subject"] == "sku-recognition: challenger rejected"
    text = message["Message"]
    assert f"Challenger of run {RUN_ID} rejected, production unchanged" in text  # what happened
    assert f"Reasons: {REASONS[0]}" in text  # why
    assert "report.html" in text
    assert f"http://localhost:8080/dags/sku_retraining/{RUN_PATH}/tasks/reject_model" in text  # where to look
    assert message["MessageAttributes"]["event"]["Value"] == "rejected"


def test_a_failing_paid_task_notifies_with_the_exception_and_its_link(inbox, s3_endpoint, fsx_root):
    """The evaluation task's public function fails; the task's failure callback (built at parse
    time, configured at run time) is called with what Airflow gives a failure callback (the task
    instance and the exception) and publishes what failed, why and where."""
    from types import SimpleNamespace

    from sku_retraining.gates import EvaluationError
    from sku_retraining.tasks.evaluation import collect_evaluation

    callback = SkuNotifier(event="task_failed")
    with pytest.raises(EvaluationError) as failure:
        collect_evaluation({})  # no job description
    ti = SimpleNamespace(dag_id="sku_retraining", run_id=RUN_ID, task_id="evaluate_model", try_number=3, max_tries=2)
    callback({"ti": ti, "run_id": RUN_ID, "exception": failure.value})  # as the task runner calls it

    [message] = inbox.messages()
    assert message["Subject"] == "sku-recognition: sku_retraining.evaluate_model failed"
    text = message["Message"]
    assert f"Task evaluate_model of DAG run {RUN_ID} failed (try 3 of 3)" in text
    assert "Reason: EvaluationError: the evaluation task returned no job description" in text
    assert f"/dags/sku_retraining/{RUN_PATH}/tasks/evaluate_model?try_number=3" in text
    assert message["MessageAttributes"]["event"]["Value"] == "task_failed"


def test_a_failed_run_notifies_with_the_reason(inbox):
    """The DAG-level callback as the DAG processor calls it (dag, run_id, reason)."""
    from airflow.sdk import DAG

    dag = DAG("sku_retraining", schedule=None)
    SkuNotifier(event="run_failed").notify({"dag": dag, "run_id": RUN_ID, "reason": "task_failure"})

    [message] = inbox.messages()
    assert message["Subject"] == "sku-recognition: DAG run sku_retraining failed"
    assert f"DAG run {RUN_ID} of sku_retraining failed.\nReason: task_failure" in message["Message"]
    assert f"/dags/sku_retraining/{RUN_PATH}\n" in message["Message"]


def test_no_channel_means_nothing_is_published(s3_endpoint, monkeypatch):
    """No topic, or an event the configuration leaves out: no notifier is built, nothing is sent.
    (A recorder, not a raising stub: ``send`` logs a channel's exception instead of raising it.)"""
    from airflow.providers.amazon.aws.notifications.sns import SnsNotifier

    published = []
    monkeypatch.setattr(SnsNotifier, "notify", lambda self, context: published.append(self.subject))
    notice = decision_notice("rejected", dag_id="sku_retraining", run_id=RUN_ID, subject="rejected", message="m")
    cfg = load_config()
    assert cfg.notifications.sns_topic_arn == ""
    assert send(notice, cfg=cfg) == [] and published == []

    topic = "arn:aws:sns:us-east-1:123456789012:sku-retraining"
    only_failures = dataclasses.replace(cfg, notifications=NotificationsConfig(sns_topic_arn=topic,
                                                                               events=("task_failed",)))
    assert send(notice, cfg=only_failures) == [] and published == []

    # The recorder records: with the topic and the event configured, the same call publishes.
    with_topic = dataclasses.replace(cfg, notifications=NotificationsConfig(sns_topic_arn=topic))
    assert send(notice, cfg=with_topic) == [f"sns:{topic}"] and published == ["rejected"]


def test_a_channel_that_fails_is_logged_and_the_task_goes_on(s3_endpoint, catalogue, monkeypatch, caplog):
    missing = "arn:aws:sns:us-east-1:123456789012:no-such-topic"
    monkeypatch.setenv("AIRFLOW_VAR_SKU_RETRAINING_CONFIG", json.dumps({"notifications": {"sns_topic_arn": missing}}))
    row = decision.reject_challenger(run_id=RUN_ID, evaluation={}, decision={"reasons": REASONS, "gates": GATES})
    assert row["decision"] == "reject"
    assert f"Could not send the rejected notification to sns:{missing}" in caplog.text


def test_email_channel_uses_the_smtp_providers_notifier():
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    cfg = dataclasses.replace(load_config(), notifications=NotificationsConfig(email_to=("ml@example.com",),
                                                                             smtp_conn_id="smtp_ops"))
    notice = decision_notice("promoted", dag_id="sku_retraining", run_id=RUN_ID, subject="v0003 promoted",
                             message="promoted <v0003>", task_id="promote_model")
    [(name, notifier)] = channel_notifiers(cfg, notice)
    assert name == "smtp:ml@example.com" and isinstance(notifier, SmtpNotifier)
    assert (notifier.to, notifier.smtp_conn_id, notifier.subject) == (["ml@example.com"], "smtp_ops", "v0003 promoted")
    assert "promoted &lt;v0003&gt;" in notifier.html_content and f"{RUN_PATH}/tasks/promote_model" in notifier.html_content


def test_unknown_event_in_the_configuration_is_an_error():
    with pytest.raises(ConfigError, match="unknown event.*rejectd"):
        load_config(variable_json=json.dumps({"notifications": {"events": ["rejectd"]}}))
