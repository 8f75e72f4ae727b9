"""The optional SNS notification of promotions and rejections (moto's SNS + SQS)."""

from __future__ import annotations

import dataclasses
import json

import boto3

from sku_retraining.config import NotificationsConfig, load_config
from sku_retraining.tasks import decision


def test_rejection_is_published_to_the_configured_topic(s3_endpoint, monkeypatch):
    sns = boto3.client("sns", endpoint_url=s3_endpoint, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=s3_endpoint, region_name="us-east-1")
    topic = sns.create_topic(Name="sku-retraining")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    cfg = dataclasses.replace(load_config(), notifications=NotificationsConfig(sns_topic_arn=topic))

    decision._notify(cfg, "sku-recognition: challenger rejected", "overall top-1 0.5 does not meet >= 0.8")

    messages = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=2)["Messages"]
    body = json.loads(messages[0]["Body"])
    assert body["Subject"] == "sku-recognition: challenger rejected"
    assert "does not meet" in body["Message"]


def test_no_topic_means_no_call(monkeypatch):
    cfg = load_config()
    assert cfg.notifications.sns_topic_arn == ""
    monkeypatch.setattr("airflow.providers.amazon.aws.hooks.sns.SnsHook.publish_to_target",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("published without a topic")))
    decision._notify(cfg, "subject", "message")
