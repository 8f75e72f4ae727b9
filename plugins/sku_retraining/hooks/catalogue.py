"""``CatalogueHook``: the catalogue database through the postgres provider's connection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.providers.postgres.hooks.postgres import PostgresHook


class CatalogueHook(PostgresHook):
    """The SKU catalogue (PostgreSQL; RDS in production).

    A ``PostgresHook`` whose default connection is ``sku_catalogue``; all catalogue work goes
    through :meth:`open_connection`, which hands out a psycopg connection in autocommit mode so
    every ``conn.transaction()`` block below is a real, self-contained transaction.

    :param postgres_conn_id: the Airflow connection of the catalogue database.
    """

    default_conn_name = "sku_catalogue"
    hook_name = "SKU catalogue (PostgreSQL)"

    def __init__(self, *, postgres_conn_id: str = default_conn_name, **kwargs) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id, **kwargs)

    def _create_connection(self, conn_args: dict[str, Any]):
        """Always psycopg 3, whatever SQLAlchemy the Airflow install has.

        The provider hands out psycopg 3 only with SQLAlchemy 2 (Airflow 3.1+); on Airflow
        3.0.x (Amazon MWAA) it would hand out psycopg2, whose API the catalogue code (COPY,
        ``conn.transaction()``) does not use. The connection's parameters, extras and RDS IAM
        token still come from the provider's ``get_conn``.
        """
        from psycopg import Connection

        args = {k: v for k, v in conn_args.items() if k not in ("cursor_factory", "row_factory")}
        return Connection.connect(**args)

    @contextmanager
    def open_connection(self) -> Iterator:
        conn = self.get_conn()
        try:
            conn.autocommit = True
            yield conn
        finally:
            conn.close()

    def migrate(self) -> list[str]:
        from sku_retraining.catalogue.migrations import apply_migrations

        with self.open_connection() as conn:
            return apply_migrations(conn)

    def known_batches(self) -> dict[str, tuple[str, object]]:
        """``batch_id -> (status, marker_last_modified)`` for every batch the catalogue has seen."""
        with self.open_connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT batch_id, status, marker_last_modified FROM batches")
            return {row[0]: (row[1], row[2]) for row in cur.fetchall()}
