"""Read back what was published to an SNS topic: an SQS queue subscribed to it, both in moto.

Shared by the notification tests and the reliability matrix (``from sns_inbox import SnsInbox``;
pytest puts ``tests/`` on ``sys.path`` for its root conftest).
"""

from __future__ import annotations

import json

import boto3


class SnsInbox:
    """An SQS queue subscribed to a new SNS topic ``sku-retraining`` at ``endpoint``."""

    def __init__(self, endpoint: str, region: str = "us-east-1") -> None:
        self.sns = boto3.client("sns", endpoint_url=endpoint, region_name=region)
        self.sqs = boto3.client("sqs", endpoint_url=endpoint, region_name=region)
        self.topic_arn = self.sns.create_topic(Name="sku-retraining")["TopicArn"]
        self.queue_url = self.sqs.create_queue(QueueName="inbox")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])["Attributes"]
        self.sns.subscribe(TopicArn=self.topic_arn, Protocol="sqs", Endpoint=arn["QueueArn"])

    def messages(self, wait: int = 1) -> list[dict]:
        """Every SNS envelope delivered so far (Subject, Message, MessageAttributes), consumed."""
        found = []
        while True:
            got = self.sqs.receive_message(QueueUrl=self.queue_url, WaitTimeSeconds=wait, MaxNumberOfMessages=10)
            if not got.get("Messages"):
                return found
            for message in got["Messages"]:
                found.append(json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
            wait = 0
