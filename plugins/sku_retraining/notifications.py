"""Who is told what: failures of the run and of the paid tasks, promotions and rejections.

Through Airflow's notifier interface, with the channels the ecosystem already has: the amazon
provider's :class:`~airflow.providers.amazon.aws.notifications.sns.SnsNotifier` and, when
e-mail addresses are configured, the smtp provider's ``SmtpNotifier``. Which channels (and which
events) come from :class:`~sku_retraining.config.NotificationsConfig`, read **when the
notification is sent**, never when the DAG file is parsed: :class:`SkuNotifier` is built at parse
time with nothing but the event name, so the DAG file touches neither the Variable nor the network.

Every message carries what happened, the link to the run (or task instance) in the Airflow UI
and the reason (the exception, the gates that failed, the run's failure reason). A channel that
cannot be reached is logged and skipped: a notification never fails a promotion, and a failure
callback never hides the failure it reports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.providers.common.compat.notifier import BaseNotifier

if TYPE_CHECKING:
    from sku_retraining.config import PipelineConfig

log = logging.getLogger(__name__)

DEFAULT_UI_BASE_URL = "http://localhost:8080/"
# SNS limits a subject to 100 characters (and one line).
SNS_SUBJECT_LIMIT = 100


@dataclass(frozen=True)
class Notice:
    """One notification: what happened (subject + message), where to look (link), and why."""

    event: str
    subject: str
    message: str
    link: str

    def text(self) -> str:
        return f"{self.message}\n\nAirflow: {self.link}\n"

    def html(self) -> str:
        from html import escape

        body = "<br>".join(escape(line) for line in self.message.splitlines())
        return f'<p>{body}</p><p><a href="{escape(self.link)}">Open in Airflow</a></p>'


def ui_base_url() -> str:
    """The Airflow UI's base URL (``[api] base_url``, as the task log links use)."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback=DEFAULT_UI_BASE_URL) or DEFAULT_UI_BASE_URL).rstrip("/")


def dag_run_url(dag_id: str, run_id: str) -> str:
    return f"{ui_base_url()}/dags/{quote(dag_id)}/runs/{quote(run_id)}"


def task_instance_url(dag_id: str, run_id: str, task_id: str, try_number: int | None = None) -> str:
    url = f"{dag_run_url(dag_id, run_id)}/tasks/{quote(task_id)}"
    return f"{url}?try_number={try_number}" if try_number else url


def dag_id_from_context(context: Mapping[str, Any]) -> str:
    for source in (context.get("ti"), context.get("dag_run"), context.get("dag")):
        value = getattr(source, "dag_id", None)
        if value:
            return str(value)
    return str(context.get("dag_id") or "sku_retraining")


def _run_id(context: Mapping[str, Any]) -> str:
    if context.get("run_id"):
        return str(context["run_id"])
    for source in (context.get("ti"), context.get("dag_run")):
        value = getattr(source, "run_id", None)
        if value:
            return str(value)
    return "unknown run"


def _one_line(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def failure_notice(event: str, context: Mapping[str, Any], *, model_name: str = "sku-recognition") -> Notice:
    """The notice for a failed task (``task_failed``) or a failed run (``run_failed``)."""
    dag_id, run_id = dag_id_from_context(context), _run_id(context)
    ti = context.get("ti")
    if event == "task_failed" and ti is not None:
        task_id = str(getattr(ti, "task_id", "?"))
        try_number = getattr(ti, "try_number", None)
        max_tries = getattr(ti, "max_tries", None)
        exception = context.get("exception")
        reason = f"{type(exception).__name__}: {exception}" if exception is not None else "see the task log"
        tries = f" (try {try_number} of {max_tries + 1})" if try_number and max_tries is not None else ""
        subject = f"{model_name}: {dag_id}.{task_id} failed"
        message = (f"Task {task_id} of DAG run {run_id} failed{tries}.\nReason: {reason}\n"
                   "A failed try of a SageMaker job task is retried by Airflow and re-attaches to its job; "
                   "when no tries are left, clear the task in the UI to retry it.")
        link = task_instance_url(dag_id, run_id, task_id, try_number)
    elif event == "run_failed":
        reason = str(context.get("reason") or "a task failed")
        failed_task = getattr(ti, "task_id", None)
        subject = f"{model_name}: DAG run {dag_id} failed"
        message = (f"DAG run {run_id} of {dag_id} failed.\nReason: {reason}"
                   + (f"\nLast task: {failed_task}" if failed_task else "")
                   + "\nProduction is unchanged (promotion is the last step and is atomic).")
        link = dag_run_url(dag_id, run_id)
    else:
        raise ValueError(f"not a failure event: {event!r}")
    return Notice(event=event, subject=_one_line(subject, SNS_SUBJECT_LIMIT), message=message, link=link)


def decision_notice(
    event: str, *, dag_id: str, run_id: str, subject: str, message: str, task_id: str | None = None,
) -> Notice:
    """The notice for a promotion (``promoted``) or a rejection (``rejected``) of the challenger."""
    if event not in ("promoted", "rejected"):
        raise ValueError(f"not a decision event: {event!r}")
    link = task_instance_url(dag_id, run_id, task_id) if task_id else dag_run_url(dag_id, run_id)
    return Notice(event=event, subject=_one_line(subject, SNS_SUBJECT_LIMIT), message=message, link=link)


def runtime_config() -> PipelineConfig:
    """The configuration as the tasks see it (Variable included). Where the Variable cannot be
    read (a callback outside a task), the deployment layers alone, with a warning."""
    from sku_retraining.config import load_config, load_config_from_airflow

    try:
        return load_config_from_airflow()
    except Exception:  # noqa: BLE001 - a notification still goes out, with the file layers
        log.warning("Could not read the Airflow Variable layer of the configuration; notifying with the "
                    "deployment configuration alone", exc_info=True)
        return load_config()


def channel_notifiers(cfg: PipelineConfig, notice: Notice) -> list[tuple[str, BaseNotifier]]:
    """The provider notifiers for ``notice`` under ``cfg`` (empty: nothing configured)."""
    settings = cfg.notifications
    if notice.event not in settings.events:
        return []
    channels: list[tuple[str, BaseNotifier]] = []
    if settings.sns_topic_arn:
        from airflow.providers.amazon.aws.notifications.sns import SnsNotifier

        channels.append((f"sns:{settings.sns_topic_arn}", SnsNotifier(
            aws_conn_id=cfg.aws_conn_id, region_name=cfg.region_name, target_arn=settings.sns_topic_arn,
            subject=notice.subject, message=notice.text(),
            message_attributes={"event": notice.event},
        )))
    if settings.email_to:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        channels.append((f"smtp:{','.join(settings.email_to)}", SmtpNotifier(
            to=list(settings.email_to), smtp_conn_id=settings.smtp_conn_id,
            subject=notice.subject, html_content=notice.html(),
        )))
    return channels


def send(notice: Notice, context: Mapping[str, Any] | None = None, *, cfg: PipelineConfig | None = None) -> list[str]:
    """Send ``notice`` on every configured channel; returns the channels that took it.

    A channel that fails is logged (with the reason) and skipped, never raised.
    """
    cfg = cfg or runtime_config()
    sent = []
    notifiers = channel_notifiers(cfg, notice)
    if not notifiers:
        log.info("No notification channel configured for %s (config: notifications)", notice.event)
    for name, notifier in notifiers:
        try:
            # notify(), not __call__: the message is final text (an exception may contain "{{"),
            # and __call__ would template it and swallow errors without naming the channel.
            notifier.notify(dict(context or {}))
        except Exception:  # noqa: BLE001 - one channel down must not stop the others or the task
            log.exception("Could not send the %s notification to %s", notice.event, name)
        else:
            log.info("Notified %s: %s", name, notice.subject)
            sent.append(name)
    return sent


class SkuNotifier(BaseNotifier):
    """Failure callback for the DAG (``run_failed``) and the paid tasks (``task_failed``).

    Built at parse time with the event name only; the channels are resolved from the
    configuration when it fires (in the worker for a task, in the DAG processor for the run).
    """

    template_fields = ()

    def __init__(self, *, event: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if event not in ("task_failed", "run_failed"):  # promoted/rejected: the tasks send those
            raise ValueError(f"SkuNotifier event must be task_failed or run_failed, got {event!r}")
        self.event = event

    def notify(self, context: Any) -> None:
        cfg = runtime_config()
        send(failure_notice(self.event, context, model_name=cfg.model_name), context, cfg=cfg)
