"""``NewSkuBatchSensor``: wait until a complete SKU batch exists that the catalogue lacks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from sku_retraining.templated import as_bool

if TYPE_CHECKING:
    from airflow.sdk import Context


class NewSkuBatchSensor(BaseSensorOperator):
    """Wait for new complete SKU image batches in the data bucket.

    A batch is *complete* when ``incoming/<batch_id>/_SUCCESS`` exists and *new* when the
    catalogue has not registered it (a rejected batch whose marker was rewritten after its
    rejection counts as new again: that is how a corrected re-upload gets picked up).
    Each new batch's manifest is validated against the JSON schema; a batch that fails is
    marked rejected in the catalogue with the reason and does not stop the others.

    Pushes the sorted list of new, valid batch ids as its XCom ``return_value``.

    :param batch_ids: explicit batch ids (the DAG's ``batch_ids`` param): no waiting; each must
        be complete and valid, else the task fails naming the batch and the reason.
    :param force_retrain: when nothing is new, succeed at once with ``[]`` instead of waiting.
    :param catalogue_conn_id: catalogue DB connection (default from configuration).
    :param aws_conn_id: AWS connection (default from configuration).
    """

    template_fields: Sequence[str] = ("batch_ids", "force_retrain")

    def __init__(
        self,
        *,
        batch_ids: list[str] | str | None = None,
        force_retrain: bool | str = False,
        catalogue_conn_id: str | None = None,
        aws_conn_id: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.batch_ids = batch_ids
        self.force_retrain = force_retrain
        self.catalogue_conn_id = catalogue_conn_id
        self.aws_conn_id = aws_conn_id

    def poke(self, context: Context) -> PokeReturnValue | bool:
        from sku_retraining.tasks.intake import find_new_batches

        result = find_new_batches(
            explicit_batch_ids=self.batch_ids,
            catalogue_conn_id=self.catalogue_conn_id,
            aws_conn_id=self.aws_conn_id,
            run_id=context["run_id"],
        )
        for message in result.messages:
            self.log.warning("%s", message)
        if result.batch_ids:
            self.log.info("New batches: %s", ", ".join(result.batch_ids))
            return PokeReturnValue(is_done=True, xcom_value=result.batch_ids)
        if as_bool(self.force_retrain):
            self.log.info("No new batches; force_retrain is set, continuing with the catalogue as it is")
            return PokeReturnValue(is_done=True, xcom_value=[])
        self.log.info("No new complete batches yet")
        return False
