"""The soak: consecutive monthly runs of the whole DAG (``airflow dags test``) on the local
stack, checking the invariants (:mod:`sku_dev.invariants`) after every month.

Every month uploads a generated batch with new SKUs and more photos of old ones, plus a
sprinkling of bad inputs; one month also gets an injected fault (the
month's run triggered twice at once: the batch registers once, both runs finish). Printed per
month: images, SKUs, quarantined, train/val/test counts, the decision, top-1 overall / new /
old SKUs and wall time per task.

``./dev soak`` runs the full form (five months, the fault in month 3); ``./dev soak --short``
the CI form (two months, the fault in month 2, tiny images, one epoch, few SKUs): still the
whole DAG through ``airflow dags test`` each month, so what CI soaks is what runs monthly;
tests/reliability/test_soak.py runs the short form. Timings: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sku_dev import invariants
from sku_dev.local_story import _s3, catalogue_connect, latest_run_task_seconds, reset_stack, run_dag
from sku_dev.synthetic import generate_batch, make_skus, upload_batch

BAD_INPUTS = ("corrupt_jpeg", "truncated_jpeg", "zero_byte", "non_image", "tiny_image", "exif_rotated",
              "cmyk_jpeg", "duplicate_across_skus", "hostile_file_names", "sixteen_bit_png")
# Loose gates: a tiny CPU model trained for one epoch; the soak is about the pipeline.
LOOSE_GATES = {"min_top1": 0.0, "min_new_sku_top1": 0.0, "max_old_sku_regression": 1.0}


@dataclass
class SoakSize:
    months: int = 5
    new_skus_per_month: int = 6
    old_skus_per_month: int = 3
    images_per_sku: int = 16
    image_size: int = 96
    epochs: int = 3
    variants_per_image: int = 1
    fault_month: int = 3

    @classmethod
    def short(cls) -> SoakSize:
        # CI's budget (~4 min): two months (a first model, then the faulted month warm-starting
        # from it), each a whole `airflow dags test`, ~2 min each on 2 cores (measured).
        return cls(months=2, new_skus_per_month=3, old_skus_per_month=2, images_per_sku=8, image_size=48, epochs=1,
                   fault_month=2)


@dataclass
class MonthReport:
    month: int
    seconds: float
    returncode: int
    facts: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)
    decision: str = ""
    top1: tuple = (None, None, None)
    task_seconds: dict = field(default_factory=dict)
    violations: list = field(default_factory=list)

    def line(self) -> str:
        def pct(v):
            return "n/a" if v is None else f"{v:.3f}"

        tasks = ", ".join(f"{k} {v:.0f}s" for k, v in sorted(self.task_seconds.items(), key=lambda kv: -kv[1]))
        return (f"month {self.month}: {self.seconds:.0f} s, rc={self.returncode} | images={self.facts.get('images')} "
                f"(uploaded {self.facts.get('uploaded')}) SKUs={self.facts.get('skus')} "
                f"quarantined={self.facts.get('quarantined')} | "
                + " ".join(f"{k}={v}" for k, v in self.splits.items())
                + f" | {self.decision} | top-1 {pct(self.top1[0])} new {pct(self.top1[1])} old {pct(self.top1[2])}"
                + (f"\n    tasks: {tasks}" if tasks else "")
                + ("\n    INVARIANTS BROKEN: " + "; ".join(self.violations) if self.violations else ""))


def logical_date(month: int) -> str:
    return datetime(2027, month, 1, 3, tzinfo=UTC).isoformat()


def upload_month(env: dict[str, str], month: int, size: SoakSize) -> str:
    new = make_skus(size.new_skus_per_month, start=(month - 1) * size.new_skus_per_month)
    old = make_skus(min(size.old_skus_per_month, (month - 1) * size.new_skus_per_month))
    bad = (BAD_INPUTS[(2 * month) % len(BAD_INPUTS)], BAD_INPUTS[(2 * month + 1) % len(BAD_INPUTS)])
    batch_id = f"2027-{month:02d}-soak"
    batch = generate_batch(batch_id, new + old, size.images_per_sku, seed=1000 + month,
                           image_size=size.image_size, inject=bad, workers=2)
    upload_batch(_s3(env), env["SKU_RETRAINING_DATA_BUCKET"], batch)
    return batch_id


def _month_numbers(env: dict[str, str]) -> tuple[dict, str, tuple]:
    with catalogue_connect(env) as conn:
        splits = dict(conn.execute("SELECT split, count(*) FROM images GROUP BY 1 ORDER BY 1").fetchall())
        row = conn.execute("""SELECT d.decision, v.evaluation FROM model_decisions d LEFT JOIN model_versions v
                              ON v.model_name = d.model_name AND v.version = d.version
                              ORDER BY d.created_at DESC LIMIT 1""").fetchone()
    decision, evaluation = (row or ("none", None))
    challenger = (evaluation or {}).get("challenger") or {}
    return splits, decision, (challenger.get("top1"), challenger.get("new_sku_top1"), challenger.get("old_sku_top1"))


def run_soak(env: dict[str, str], size: SoakSize, *, log_file: Path | None = None, reset: bool = True,
             echo=print) -> list[MonthReport]:
    """Run ``size.months`` months; stops at the first failed run or broken invariant."""
    if reset:
        reset_stack(env)
    s3 = _s3(env)
    bucket = env["SKU_RETRAINING_DATA_BUCKET"]
    jobs_dir = Path(env["SKU_RETRAINING_FSX_ROOT"]).parent / "jobs"
    previous = None
    reports: list[MonthReport] = []
    for month in range(1, size.months + 1):
        upload_month(env, month, size)
        conf = {"variants_per_image": size.variants_per_image, "epochs": size.epochs, **LOOSE_GATES}
        started = time.monotonic()
        if month == size.fault_month:
            # The injected fault: the month's run triggered twice at once (two schedulers, a
            # double click). Both must succeed, the batch registered once, both models
            # promoted or rejected with versions in order, the invariants intact. The twin
            # carries force_retrain: when its sensor pokes after the first run registered the
            # batch, nothing is new for it, and without the flag it would wait (reschedule
            # mode, a poke every 10 minutes, 12 hours) for the next month's batch, which is
            # right for a scheduler and a hang for `airflow dags test`.
            import threading

            second: list = []
            twin_conf = conf | {"force_retrain": True}
            twin = threading.Thread(target=lambda date, c, out: out.append(run_dag(date, c, env, log_file)),
                                    args=(logical_date(month).replace("T03:", "T04:"), twin_conf, second))
            twin.start()
            result = run_dag(logical_date(month), conf, env, log_file)
            twin.join()
            if second and second[0].returncode != 0:
                result = second[0]
        else:
            result = run_dag(logical_date(month), conf, env, log_file)
        report = MonthReport(month, time.monotonic() - started, result.returncode)
        report.task_seconds = latest_run_task_seconds(env)
        with catalogue_connect(env) as conn:
            checked = invariants.check_all(conn, s3, bucket=bucket, jobs_dir=jobs_dir, previous=previous)
        previous = checked.state
        report.facts, report.violations = checked.facts, checked.violations
        report.splits, report.decision, report.top1 = _month_numbers(env)
        reports.append(report)
        echo(report.line())
        if result.returncode != 0 or checked.violations:
            break
    total = sum(r.seconds for r in reports)
    echo(f"soak: {len(reports)} month(s), {total:.0f} s in all ({total / max(1, len(reports)):.0f} s a month)")
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true",
                        help="the CI form: 2 months, tiny images, 1 epoch, few SKUs")
    parser.add_argument("--months", type=int, default=None, help="default: 5 (full), 2 (--short)")
    parser.add_argument("--log-file", type=Path, default=Path(".stack/soak.log"))
    args = parser.parse_args(argv)
    size = SoakSize.short() if args.short else SoakSize()
    if args.months is not None:
        size.months = args.months
        size.fault_month = min(size.fault_month, size.months)
    from sku_dev.local_stack import LocalStack

    stack = LocalStack(Path.cwd())
    was_running = stack.status()["running"]
    stack.start()
    env = {**os.environ, **stack.env()}
    args.log_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"==> soak: {size}; airflow output in {args.log_file}", flush=True)
    try:
        reports = run_soak(env, size, log_file=args.log_file)
    finally:
        if not was_running:  # leave the machine as found: a stack the soak started stops
            stack.stop()
    ok = len(reports) == size.months and all(r.returncode == 0 and not r.violations for r in reports)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
