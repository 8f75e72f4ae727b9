"""The Airflow UI on the local stack: ``airflow standalone`` (api-server, scheduler, dag-processor,
triggerer) in a process group of its own, with the stack's environment, on a loopback port.

Used by ``./dev ui`` (which prints the URL and the login, and stops everything on Ctrl-C) and
by the browser test's fixture. Airflow 3's simple auth manager creates the ``admin`` user and
writes its password to ``$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from sku_dev.local_stack import LOOPBACK, free_port, log_tail, port_is_free

PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
DEFAULT_PORT = 8080


class UiError(RuntimeError):
    """The UI did not come up; the message carries the tail of its log."""


class AirflowUi:
    """``airflow standalone`` with ``AIRFLOW_HOME`` ``airflow_home`` on ``127.0.0.1:port``.

    :param env: the environment of every Airflow process (the stack's ``AIRFLOW_CONN_*`` and
        ``SKU_RETRAINING_*`` included: the scheduler, dag-processor and triggerer need them as
        much as the workers do).
    """

    def __init__(self, airflow_home: Path, *, port: int, env: Mapping[str, str], log_path: Path) -> None:
        self.airflow_home = Path(airflow_home)
        self.port = port
        self.log_path = Path(log_path)
        self.env = {
            **env,
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__API__HOST": LOOPBACK,
            "AIRFLOW__API__PORT": str(port),
            # Links in notifications and logs point at this UI.
            "AIRFLOW__API__BASE_URL": self.url,
        }
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def login(self) -> tuple[str, str]:
        """``(user, password)`` the simple auth manager generated."""
        users = json.loads((self.airflow_home / PASSWORDS_FILE).read_text())
        user = "admin" if "admin" in users else sorted(users)[0]
        return user, users[user]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}/api/v2/monitor/health", timeout=5) as r:
                health = json.loads(r.read())
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return all((health.get(part) or {}).get("status") == "healthy"
                   for part in ("metadatabase", "scheduler", "dag_processor", "triggerer"))

    def start(self, timeout: float = 300) -> AirflowUi:
        """Start and wait until the API and every component report healthy."""
        if not port_is_free(self.port):
            raise UiError(f"port {self.port} is taken (./dev ui --port N picks another)")
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own venv's airflow
                [str(Path(sys.executable).parent / "airflow"), "standalone"], env=self.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UiError(f"airflow standalone exited ({self.process.returncode}):\n{log_tail(self.log_path)}")
            if self._healthy() and (self.airflow_home / PASSWORDS_FILE).is_file():
                return self
            time.sleep(2)
        self.stop()
        raise UiError(f"the Airflow UI was not healthy after {timeout:.0f} s:\n{log_tail(self.log_path)}")

    def stop(self, timeout: float = 30) -> None:
        """SIGINT (standalone stops its components), then SIGTERM/SIGKILL to whatever of the group is left."""
        if self.process is None:
            return
        pgid = self.process.pid
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)  # anyone of the group left?
                except ProcessLookupError:
                    break
                self.process.poll()
                time.sleep(0.5)
            else:
                continue
            break
        self.process.wait(timeout=5)
        self.process = None


def main(argv: Sequence[str] | None = None) -> int:
    """``./dev ui``: start, print the URL and the login, wait for Ctrl-C, stop everything."""
    parser = argparse.ArgumentParser(prog="./dev ui", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=None,
                        help=f"port (default {DEFAULT_PORT}, or a free one when it is taken)")
    args = parser.parse_args(argv)
    port = args.port or (DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port())
    home = Path(os.environ["AIRFLOW_HOME"])
    ui = AirflowUi(home, port=port, env=dict(os.environ), log_path=home / "standalone.log")
    stopping = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, interrupt)
    print(f"==> starting the Airflow UI (log: {ui.log_path})", flush=True)
    try:
        ui.start()
        user, password = ui.login()
        print(f"\n    Airflow UI: {ui.url}\n    login:      {user} / {password}\n"
              f"    (from {home / PASSWORDS_FILE}; Ctrl-C stops everything)\n", flush=True)
        while not stopping:
            if ui.process is None or ui.process.poll() is not None:
                print(f"airflow standalone exited:\n{log_tail(ui.log_path)}", file=sys.stderr)
                return 1
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except UiError as exc:
        print(f"./dev ui: {exc}", file=sys.stderr)
        return 1
    finally:
        print("==> stopping the Airflow UI", flush=True)
        ui.stop()
        print("==> stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
