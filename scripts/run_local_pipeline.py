"""The README's main command: the whole DAG, end to end, on the embedded local stack.

Starts (or reuses) the local stack, resets it, and runs the two-month story of
:mod:`sku_dev.local_story` with ``airflow dags test``; prints a summary at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "devtools"))

from sku_dev.local_stack import LocalStack  # noqa: E402
from sku_dev.local_story import StorySize, reset_stack, run_story, story_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = StorySize()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skus-month-1", type=int, default=defaults.skus_month_1)
    parser.add_argument("--skus-month-2", type=int, default=defaults.skus_month_2)
    parser.add_argument("--images-per-sku", type=int, default=defaults.images_per_sku)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--variants-per-image", type=int, default=defaults.variants_per_image)
    args = parser.parse_args(argv)
    size = StorySize(skus_month_1=args.skus_month_1, skus_month_2=args.skus_month_2,
                     images_per_sku=args.images_per_sku, epochs=args.epochs,
                     variants_per_image=args.variants_per_image)

    started = time.monotonic()
    stack = LocalStack(ROOT)
    stack.start()
    env = {**os.environ, **stack.env()}
    reset_stack(env)
    results = run_story(env, size, task_seconds=True)
    print("\n" + "=" * 78)
    print(story_summary(env, results))
    print(f"Total: {time.monotonic() - started:.0f} s. The local stack is still running "
          "(./dev stack stop); FSx folder: " + env["SKU_RETRAINING_FSX_ROOT"])
    failed = [r for r in results if r.returncode != 0]
    if failed or len(results) < 2:
        print(f"FAILED: the DAG run for {failed[0].logical_date if failed else '?'} did not succeed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
