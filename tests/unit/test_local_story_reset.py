"""The local story's reset drops the catalogue schema: it must refuse anything but the stack."""

from __future__ import annotations

import json

import pytest

from sku_dev.local_story import NotTheLocalStackError, refuse_unless_local_stack, reset_stack


def env(host: str, endpoint: str = "http://127.0.0.1:5000") -> dict[str, str]:
    conn = {"conn_type": "postgres", "host": host, "port": 5432, "login": "u", "schema": "catalogue"}
    return {"AIRFLOW_CONN_SKU_CATALOGUE": json.dumps(conn), "SKU_RETRAINING_S3_ENDPOINT_URL": endpoint}


@pytest.mark.parametrize("host", ["sku.abcdefghij.eu-west-1.rds.amazonaws.com", "10.0.3.17", "", None])
def test_a_catalogue_off_loopback_is_refused_before_anything_is_touched(host):
    with pytest.raises(NotTheLocalStackError, match="catalogue host"):
        reset_stack(env(host))  # would connect and DROP SCHEMA without the guard


def test_an_s3_endpoint_off_loopback_is_refused():
    with pytest.raises(NotTheLocalStackError, match="S3 endpoint host"):
        refuse_unless_local_stack(env("127.0.0.1", "https://s3.eu-west-1.amazonaws.com"))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_the_stack_on_loopback_is_allowed(host):
    refuse_unless_local_stack(env(host))
