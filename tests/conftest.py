"""Shared fixtures: a real PostgreSQL, a moto server and an FSx folder, from the local stack.

The servers are session-scoped (started once, stopped at session end even when tests fail);
each test gets its own empty database, a reset moto, and its own FSx folder.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before anything imports Airflow: keep its home (config, sqlite DB, logs) out of the project
# and out of ~/airflow.
if "AIRFLOW_HOME" not in os.environ:
    _airflow_home = tempfile.mkdtemp(prefix="sku-tests-airflow-home-")
    os.environ["AIRFLOW_HOME"] = _airflow_home
    atexit.register(shutil.rmtree, _airflow_home, ignore_errors=True)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

import pytest  # noqa: E402

from sku_dev.local_stack import (  # noqa: E402
    AWS_REGION,
    AWS_TEST_CREDENTIAL,
    CATALOGUE_CONN_ID,
    DEFAULT_BUCKET,
    SHARED_TMP,
    MotoServer,
    PostgresServer,
    airflow_postgres_conn,
    aws_test_env,
    create_bucket,
    reachable_data_dir,
)


def pg_data_dir_for_tests(preferred: Path) -> Path:
    """``preferred``, or a /var/tmp folder when PostgreSQL's user cannot reach it (we are root
    and pytest's ``/tmp/pytest-of-root`` is 0700). Remove it with :func:`remove_pg_data_dir`."""
    return reachable_data_dir(preferred, key=str(preferred))


def remove_pg_data_dir(data_dir: Path) -> None:
    """Delete a data dir from :func:`pg_data_dir_for_tests` (and its /var/tmp parent, if any)."""
    if data_dir.parent.parent == SHARED_TMP:
        shutil.rmtree(data_dir.parent, ignore_errors=True)
    else:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def pg_data_dir(tmp_path: Path) -> Iterator[Path]:
    """A not yet existing data dir path for a :class:`PostgresServer` of the test's own, that
    PostgreSQL's user can reach; removed afterwards (stop the server first)."""
    data_dir = pg_data_dir_for_tests(tmp_path / "pgdata")
    yield data_dir
    remove_pg_data_dir(data_dir)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A running :class:`PostgresServer` (fsync off) on a free port; stopped at session end."""
    data_dir = pg_data_dir_for_tests(tmp_path_factory.mktemp("postgres") / "pgdata")
    server = PostgresServer(data_dir, fsync=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        remove_pg_data_dir(data_dir)


def _admin(server: PostgresServer) -> Any:
    import psycopg2

    conn = psycopg2.connect(server.admin_dsn)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    return conn


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A libpq DSN of a fresh, empty database for this test (owned by and connecting as the
    catalogue role, like the stack's ``catalogue`` DB); dropped afterwards."""
    from psycopg2 import sql

    name = f"test_{uuid.uuid4().hex[:16]}"
    conn = _admin(postgres_server)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(postgres_server.role)
                )
            )
    finally:
        conn.close()
    try:
        yield postgres_server.dsn_for(name)
    finally:
        conn = _admin(postgres_server)
        try:
            with conn.cursor() as cur:
                # A connection the test leaked would make DROP DATABASE fail.
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        finally:
            conn.close()


@pytest.fixture
def db(pg_dsn: str) -> Iterator[Any]:
    """An autocommit psycopg connection to the test's database, for reading what tasks wrote."""
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def catalogue_conn_env(pg_dsn: str, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Points Airflow connection ``sku_catalogue`` (``AIRFLOW_CONN_SKU_CATALOGUE``) at this
    test's database; returns the conn id."""
    from psycopg2.extensions import parse_dsn

    dbname = parse_dsn(pg_dsn)["dbname"]
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CATALOGUE_CONN_ID.upper()}",
        airflow_postgres_conn(postgres_server.port, dbname, postgres_server.role),
    )
    return CATALOGUE_CONN_ID


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A running :class:`MotoServer` on a free port; its process group is killed at session end."""
    server = MotoServer(log_path=tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_endpoint(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """moto's endpoint URL, reset to empty and holding bucket ``sku-retraining-data``.

    Sets the dummy AWS credentials, ``AWS_DEFAULT_REGION``, ``AIRFLOW_CONN_AWS_DEFAULT`` (with the
    ``endpoint_url``), ``SKU_RETRAINING_S3_ENDPOINT_URL`` and ``SKU_RETRAINING_DATA_BUCKET``.
    """
    moto_server.reset()
    # Nothing from the developer's own AWS setup may leak in (or reach real AWS).
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in aws_test_env(moto_server.endpoint_url).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SKU_RETRAINING_DATA_BUCKET", DEFAULT_BUCKET)
    create_bucket(moto_server.endpoint_url, DEFAULT_BUCKET)
    return moto_server.endpoint_url


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    """A boto3 S3 client bound to :func:`s3_endpoint`."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=AWS_REGION,
        aws_access_key_id=AWS_TEST_CREDENTIAL,
        aws_secret_access_key=AWS_TEST_CREDENTIAL,
    )


@pytest.fixture
def fsx_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder standing in for the FSx mount, exported as ``SKU_RETRAINING_FSX_ROOT``."""
    root = tmp_path / "fsx"
    root.mkdir()
    monkeypatch.setenv("SKU_RETRAINING_FSX_ROOT", str(root))
    return root


@pytest.fixture
def airflow_env(
    tmp_path: Path, catalogue_conn_env: str, s3_endpoint: str, fsx_root: Path
) -> dict[str, str]:
    """Environment for ``airflow`` CLI subprocesses (``airflow dags test``) on this test's
    stack: a fresh, migrated Airflow home, the project's dags and plugins, the local backend."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow-home"),
        AIRFLOW__CORE__DAGS_FOLDER=str(root / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(root / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=os.pathsep.join([str(root / "plugins"), str(root / "devtools")]),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        SKU_RETRAINING_JOB_BACKEND="local",
    )
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    return env
