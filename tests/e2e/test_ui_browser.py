"""The Airflow UI in a real browser, as a new user meets it (headless Chromium via Playwright).

The fixture starts what ``./dev ui`` starts (:class:`sku_dev.airflow_ui.AirflowUi`: ``airflow
standalone`` on a free loopback port, ``AIRFLOW_HOME`` in a temporary folder) against the test
session's PostgreSQL and moto servers. The test logs in, opens the DAG and its trigger form,
checks the form's sections and fields, lets the API refuse a bad batch id (the error names the
field), triggers a ``dry_run`` for an uploaded synthetic batch, waits for the run, finds the
registration summary in the ``register_batches`` log, and saves screenshots of the form and the
grid under ``$SKU_UI_ARTEFACTS`` (default: the test's tmp folder; the README's are in docs/).

Needs Debian's ``chromium`` package (``apt-get install -y chromium``; ``.ci/run`` installs it) and
the ``playwright`` Python package (requirements-dev.txt); Playwright's own browser download is
never used. Without them the test is skipped with that message.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from sku_dev.local_stack import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
FORM_SECTIONS = ["What to train on", "Training", "Promotion gates", "Advanced / AWS"]
BATCH_ID = "2026-12-ui"
SECTION_FIELDS = {
    "What to train on": ("Batch ids", "Dry run", "Force retrain"),
    "Training": ("Epochs", "Warm start from the production model"),
    "Promotion gates": ("Gate: minimum overall top-1", "Gate: minimum new-SKU top-1"),
    "Advanced / AWS": ("Training instances", "Managed spot training"),
}


def _skip_unless_ci(reason: str) -> None:
    """Skip on a developer machine without the browser; in CI (``CI`` set, as .ci/run's caller
    does) a missing browser is a failure, so the UI is never silently untested there."""
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


def chromium_path() -> str:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    _skip_unless_ci("the browser test needs Debian's chromium package: `apt-get install -y chromium` "
                    "(as root; .ci/run does it), then re-run; Playwright's browser download is not used")
    raise AssertionError("unreachable")


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator:
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_unless_ci("the browser test needs the playwright package: .venv/bin/pip install -r "
                        "requirements-dev.txt -c constraints.txt (./dev test does it)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=LAUNCH_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


@pytest.fixture
def ui(tmp_path: Path, catalogue_conn_env, s3_endpoint, fsx_root) -> Iterator:
    """``./dev ui``'s stack with this test's catalogue DB, moto and FSx folder."""
    from sku_dev.airflow_ui import AirflowUi

    env = {
        **os.environ,  # the fixtures' AIRFLOW_CONN_*, AWS_* and SKU_RETRAINING_* included
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # Only the runs this test triggers: no scheduled month is started behind its back.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT / 'devtools'}",
    }
    server = AirflowUi(tmp_path / "airflow-home", port=free_port(), env=env, log_path=tmp_path / "standalone.log")
    started = time.monotonic()
    server.start()
    print(f"\nAirflow standalone healthy in {time.monotonic() - started:.0f} s at {server.url}")
    try:
        yield server
    finally:
        server.stop()


def upload_small_batch(s3_client) -> None:
    from sku_dev.synthetic import generate_batch, make_skus, upload_batch

    batch = generate_batch(BATCH_ID, make_skus(3), images_per_sku=4, image_size=96)
    upload_batch(s3_client, "sku-retraining-data", batch)


def api(ui, path: str) -> dict:
    """GET the REST API with a token for the generated admin user."""
    user, password = ui.login()
    body = json.dumps({"username": user, "password": password}).encode()
    request = urllib.request.Request(  # noqa: S310 - our loopback server
        f"{ui.url}/auth/token", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - our loopback server
        token = json.loads(response.read())["access_token"]
    request = urllib.request.Request(  # noqa: S310 - our loopback server
        f"{ui.url}/api/v2/{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        return json.loads(response.read())


def artefacts_dir(tmp_path: Path) -> Path:
    target = Path(os.environ.get("SKU_UI_ARTEFACTS") or tmp_path / "artefacts")
    target.mkdir(parents=True, exist_ok=True)
    return target


def test_trigger_a_dry_run_from_the_form_and_read_its_log(ui, browser_page, s3_client, tmp_path):
    page = browser_page
    shots = artefacts_dir(tmp_path)
    started = time.monotonic()
    upload_small_batch(s3_client)
    try:
        # Log in with what ./dev ui prints.
        user, password = ui.login()
        page.goto(f"{ui.url}/")
        page.locator("input[name='username'], input#username, input[type='text']").first.fill(user)
        page.locator("input[type='password']").first.fill(password)
        page.keyboard.press("Enter")
        page.get_by_text("Welcome", exact=True).first.wait_for()

        # The DAG, and its trigger form.
        page.goto(f"{ui.url}/dags/sku_retraining")
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        dialog.wait_for()
        for section in FORM_SECTIONS:
            dialog.get_by_text(section, exact=True).first.wait_for()
        # The sections are collapsed: open each and find its fields (the first one last, to fill it).
        for section in [*FORM_SECTIONS[1:], FORM_SECTIONS[0]]:
            dialog.get_by_text(section, exact=True).first.click()
            for title in SECTION_FIELDS[section]:
                dialog.get_by_text(title).first.wait_for()
        dialog.get_by_text("one id per line", exact=False).first.wait_for()  # the field's description

        # A value the API refuses: the form says which field and why.
        batch_ids = dialog.locator("#element_batch_ids")
        batch_ids.fill("../etc")
        dialog.get_by_role("button", name="Trigger").last.click()
        error = dialog.get_by_text("Invalid input for param batch_ids", exact=False).first
        error.wait_for()
        assert "does not match" in error.inner_text()

        # A dry run for the uploaded batch.
        batch_ids.fill(BATCH_ID)
        dialog.locator("[id='switch:element_dry_run']").first.click()
        page.screenshot(path=str(shots / "trigger-form.png"), full_page=True)
        dialog.get_by_role("button", name="Trigger").last.click()
        dialog.wait_for(state="hidden")

        # Wait for the run (the REST API, as the grid polls it).
        deadline = time.monotonic() + 300
        run = None
        while time.monotonic() < deadline:
            runs = api(ui, "dags/sku_retraining/dagRuns?order_by=-run_after&limit=1")["dag_runs"]
            run = runs[0] if runs else None
            if run and run["state"] in ("success", "failed"):
                break
            time.sleep(3)
        assert run is not None and run["state"] == "success", run
        assert run["conf"]["batch_ids"] == [BATCH_ID] and run["conf"]["dry_run"] is True

        run_path = f"{ui.url}/dags/sku_retraining/runs/{quote(run['dag_run_id'], safe='')}"
        page.goto(run_path)
        page.get_by_text("register_batches", exact=True).first.wait_for()
        page.screenshot(path=str(shots / "grid.png"), full_page=True)

        # The registration summary in the register_batches log.
        page.goto(f"{run_path}/tasks/register_batches")
        page.get_by_text("Batch registration:", exact=False).first.wait_for()
        assert page.get_by_text(BATCH_ID, exact=False).count() >= 1
        page.screenshot(path=str(shots / "register-batches-log.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(shots / "failure.png"), full_page=True)
        (shots / "failure.html").write_text(page.content())
        print(f"\nscreenshot and page of the failure: {shots}\n--- standalone log tail ---\n"
              + ui.log_path.read_text()[-4000:])
        raise
    print(f"\nbrowser test: {time.monotonic() - started:.0f} s after the UI was up; artefacts in {shots}")
