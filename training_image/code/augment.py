"""Augmentation job entry point (SageMaker training-container contract).

Hyperparameters come from SM_HPS / hyperparameters.json; ``--name value`` arguments override
them. Exit code 0 on success; on failure non-zero, with the reason in SM_OUTPUT_DIR/failure.
"""

from __future__ import annotations

import sys

from sku_jobs.augmentation import main
from sku_jobs.sm_env import run_job

if __name__ == "__main__":  # required: spawned pool workers import this file as __mp_main__
    sys.exit(run_job(main))
