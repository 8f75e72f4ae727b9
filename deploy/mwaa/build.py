"""Build what Amazon MWAA (Airflow 3.0.6) takes from the repository, under deploy/mwaa/dist/:

* ``plugins.zip``  — ``plugins/`` (``sku_retraining/``, ``sku_contracts/``) at the zip root,
  without ``__pycache__``/``*.pyc``; deterministic (sorted entries, fixed timestamps).
* ``dags/``        — the DAG files, plus ``constraints-airflow-3.0.6.txt`` and, when
  ``--config`` is given, ``sku_retraining_config.json`` (render_config's output).
* ``requirements.txt`` — the packages requirements.txt adds to Airflow, under
  ``--constraint "/usr/local/airflow/dags/constraints-airflow-3.0.6.txt"`` (the project's
  constraints for 3.0.6: the providers the CI tests, newer than Airflow's published 3.0.6 file,
  as MWAA's docs allow), or with ``--published-constraints`` under Airflow's published URL.
* ``startup.sh``   — exports ``SKU_RETRAINING_CONFIG`` so the tasks read the deployment's file.

    python -m deploy.mwaa.build [--config config.json] [--published-constraints]

Upload: ``aws s3 sync deploy/mwaa/dist/dags s3://<source bucket>/dags`` and ``aws s3 cp`` the
other three files; see docs/deploy.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DIST = Path(__file__).resolve().parent / "dist"
MWAA_DAGS = "/usr/local/airflow/dags"
CONSTRAINTS = "constraints-airflow-3.0.6.txt"
PUBLISHED_CONSTRAINTS = "https://raw.githubusercontent.com/apache/airflow/constraints-3.0.6/constraints-3.11.txt"
CONFIG_NAME = "sku_retraining_config.json"
PLUGIN_PACKAGES = ("sku_retraining", "sku_contracts")
# MWAA brings Airflow, boto3 and the postgres driver itself.
NOT_REQUIRED = re.compile(r"^(apache-airflow==|boto3==|botocore==|psycopg2-binary==)", re.I)
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def build_plugins_zip(*, plugins_dir: Path, target: Path) -> list[str]:
    """Zip the plugin packages; return the archive's names."""
    files = sorted(
        p for pkg in PLUGIN_PACKAGES for p in (plugins_dir / pkg).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    missing = [pkg for pkg in PLUGIN_PACKAGES if not (plugins_dir / pkg / "__init__.py").is_file()]
    if missing:
        raise SystemExit(f"plugins/{missing[0]}/__init__.py is missing")
    names = []
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            name = path.relative_to(plugins_dir).as_posix()
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
            names.append(name)
    return names


def requirements_lines(*, requirements: Path, published: bool, provider_pins: dict[str, str]) -> list[str]:
    constraint = PUBLISHED_CONSTRAINTS if published else f"{MWAA_DAGS}/{CONSTRAINTS}"
    lines = [f'--constraint "{constraint}"']
    if not published:  # the providers the project is tested with (pinned by our constraints)
        lines += [f"{name}=={version}" for name, version in sorted(provider_pins.items())]
    for raw in requirements.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or NOT_REQUIRED.match(line):
            continue
        if line.lower().startswith("apache-airflow-providers-"):
            continue  # listed above (or left to the published constraints)
        lines.append(line)
    return lines


def provider_pins(*, requirements: Path) -> dict[str, str]:
    pins = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"^(apache-airflow-providers-[a-z0-9-]+)==(\S+)", line.strip(), re.I)
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


STARTUP = f"""#!/bin/sh
# MWAA startup script: the pipeline reads the deployment's configuration from this file.
export SKU_RETRAINING_CONFIG="{MWAA_DAGS}/{CONFIG_NAME}"
"""


def build(*, dist: Path = DIST, config: Path | None = None, published: bool = False,
          root: Path = REPO_ROOT) -> dict[str, Path]:
    if dist.exists():
        shutil.rmtree(dist)
    (dist / "dags").mkdir(parents=True)
    build_plugins_zip(plugins_dir=root / "plugins", target=dist / "plugins.zip")
    for dag in sorted((root / "dags").glob("*.py")):
        shutil.copy2(dag, dist / "dags" / dag.name)
    if (root / "dags" / ".airflowignore").exists():
        shutil.copy2(root / "dags" / ".airflowignore", dist / "dags" / ".airflowignore")
    shutil.copy2(root / CONSTRAINTS, dist / "dags" / CONSTRAINTS)
    if config is not None:
        shutil.copy2(config, dist / "dags" / CONFIG_NAME)
    reqs = root / "requirements.txt"
    lines = requirements_lines(requirements=reqs, published=published, provider_pins=provider_pins(requirements=reqs))
    (dist / "requirements.txt").write_text("\n".join(lines) + "\n")
    (dist / "startup.sh").write_text(STARTUP)
    (dist / "startup.sh").chmod(0o755)
    return {name: dist / name for name in ("plugins.zip", "requirements.txt", "startup.sh", "dags")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="the deployment's config JSON (python -m deploy.render_config)")
    parser.add_argument("--published-constraints", action="store_true",
                        help="constrain with Airflow's published 3.0.6 file (its older providers) instead")
    args = parser.parse_args(argv)
    for name, path in build(config=args.config, published=args.published_constraints).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
