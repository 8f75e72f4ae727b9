"""What the Airflow distributions take: MWAA's plugins.zip / requirements.txt / startup script,
and the Astro project (root Dockerfile + .dockerignore)."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from deploy.mwaa import build as mwaa

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mwaa") / "dist"
    config = out.parent / "config.json"
    config.write_text(json.dumps({"job_backend": "sagemaker"}))
    mwaa.build(dist=out, config=config)
    return out


def test_plugins_zip(dist: Path) -> None:
    names = zipfile.ZipFile(dist / "plugins.zip").namelist()
    assert "sku_retraining/__init__.py" in names and "sku_contracts/__init__.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith(("sku_dev/", "devtools/", "tests/"))]
    assert any(n.startswith("sku_retraining/resources/") for n in names), "packaged resources ship in the zip"
    assert {n.split("/")[0] for n in names} == {"sku_retraining", "sku_contracts"}


def test_plugins_zip_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.zip", tmp_path / "b.zip"
    mwaa.build_plugins_zip(plugins_dir=ROOT / "plugins", target=a)
    mwaa.build_plugins_zip(plugins_dir=ROOT / "plugins", target=b)
    assert a.read_bytes() == b.read_bytes()


def test_requirements(dist: Path) -> None:
    lines = (dist / "requirements.txt").read_text().splitlines()
    assert lines[0] == '--constraint "/usr/local/airflow/dags/constraints-airflow-3.0.6.txt"'
    assert not [line for line in lines if line.startswith(("apache-airflow==", "torch", "moto", "pytest"))]
    constraints = (ROOT / "constraints-airflow-3.0.6.txt").read_text()
    assert "apache-airflow==3.0.6" in constraints
    for line in lines[1:]:  # every pinned requirement agrees with the constraints
        name, _, version = line.partition("==")
        pinned = re.search(rf"^{re.escape(name)}==(\S+)$", constraints, re.M | re.I)
        assert pinned and pinned.group(1) == version, line
    assert (dist / "dags" / "constraints-airflow-3.0.6.txt").read_text() == constraints


def test_published_constraints_variant(tmp_path: Path) -> None:
    mwaa.build(dist=tmp_path / "dist", published=True)
    lines = (tmp_path / "dist" / "requirements.txt").read_text().splitlines()
    assert lines[0] == f'--constraint "{mwaa.PUBLISHED_CONSTRAINTS}"'
    assert not [line for line in lines if line.startswith("apache-airflow")]


def test_dags_and_startup(dist: Path) -> None:
    assert {p.name for p in (dist / "dags").glob("*.py")} == {p.name for p in (ROOT / "dags").glob("*.py")}
    assert (dist / "dags" / "sku_retraining_config.json").exists()
    startup = (dist / "startup.sh").read_text()
    assert 'export SKU_RETRAINING_CONFIG="/usr/local/airflow/dags/sku_retraining_config.json"' in startup
    assert subprocess.run(["sh", "-n", str(dist / "startup.sh")]).returncode == 0


def test_plugins_import_from_the_zip_alone(dist: Path, tmp_path: Path) -> None:
    """The runtime needs nothing of the repository beyond dags/ and plugins/ (MWAA's layout)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import importlib.resources as r, sku_retraining, sku_contracts;"
        "from sku_retraining.config import load_config; c = load_config(environ={});"
        "print(c.data_bucket)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(dist / "plugins.zip")], capture_output=True,
                            text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]


# -- Astro -------------------------------------------------------------------------------------------

def test_astro_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM\s+(\S+)", text, re.M)
    registry, tag = base.rsplit(":", 1)
    assert registry == "astrocrpublic.azurecr.io/runtime"  # the Airflow 3 Astro Runtime registry
    assert re.fullmatch(r"3\.\d+-\d+", tag), tag
    pinned = re.search(r"^apache-airflow==(\d+\.\d+)\.", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert tag.startswith(pinned + "-"), "the Runtime's Airflow must be the one requirements.txt pins"
    hadolint = Path(sys.executable).parent / "hadolint"
    if hadolint.exists():
        result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_dockerignore_keeps_dev_parts_out() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for path in (".venv/bin/python", ".venv-af306/x", ".stack/pgdata", "tests/unit/test_gates.py",
                 "devtools/sku_dev/local_stack.py", "bench/README.md", ".git/HEAD"):
        assert ignored(path), path
    for path in ("dags/sku_retraining.py", "plugins/sku_retraining/config.py", "plugins/sku_contracts/__init__.py",
                 "requirements.txt", "training_image/Dockerfile", "training_image/code/train.py"):
        assert not ignored(path), path
