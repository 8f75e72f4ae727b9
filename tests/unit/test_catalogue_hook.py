"""The catalogue hook hands out psycopg 3 connections on every supported Airflow."""

from __future__ import annotations

from unittest import mock

import psycopg

from sku_retraining.hooks.catalogue import CatalogueHook


def test_psycopg3_even_where_the_provider_would_use_psycopg2(monkeypatch):
    """On Airflow 3.0.x (SQLAlchemy 1.4) the provider's USE_PSYCOPG3 is False."""
    import airflow.providers.postgres.hooks.postgres as provider

    monkeypatch.setattr(provider, "USE_PSYCOPG3", False)
    monkeypatch.setenv("AIRFLOW_CONN_SKU_CATALOGUE", "postgresql://u:p@127.0.0.1:1/catalogue?sslmode=disable")
    with mock.patch.object(psycopg.Connection, "connect", return_value="psycopg3-connection") as connect:
        assert CatalogueHook().get_conn() == "psycopg3-connection"
    kwargs = connect.call_args.kwargs
    assert kwargs["host"] == "127.0.0.1" and kwargs["dbname"] == "catalogue" and kwargs["sslmode"] == "disable"
