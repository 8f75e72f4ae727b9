"""Benchmark: register + split + export manifests for a full-size catalogue.

12,000 SKUs x 350 images (4.2M image rows) go through the real code path
(:func:`register_batch`: COPY into staging, set-based classification, split, insert; then
:func:`export_manifests`: COPY TO STDOUT into CSV files), on a local PostgreSQL.

Baseline, measured in the same run: the naive way — one parameterised INSERT per image
(``executemany``, split computed in Python) on a sample, extrapolated to the full size.

Targets (issue #2): the full 4.2M in under 120 s, and at least 20x the baseline.

    .venv/bin/python bench/register_split_bench.py [--skus 12000 --images 350] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "devtools"))

import psycopg  # noqa: E402

from sku_retraining.catalogue.export import export_manifests  # noqa: E402
from sku_retraining.catalogue.migrations import apply_migrations  # noqa: E402
from sku_retraining.catalogue.registration import StagedImage, register_batch  # noqa: E402
from sku_retraining.config import SplitConfig  # noqa: E402
from sku_retraining.manifest import parse_manifest  # noqa: E402


def sku_id(i: int) -> str:
    return f"SKU-{i:06d}"


def staged_images(batch_id: str, skus: range, per_sku: int):
    """Synthetic file facts; perceptual hashes random, except that every 10th image is a
    near-duplicate of the one before (2 bits flipped): 20% of the images in a cluster, five
    times the share on the real grocery photos (4%, bench/README.md)."""
    for s in skus:
        sku = sku_id(s)
        phash = 0
        for j in range(per_sku):
            digest = hashlib.sha256(f"{sku}/{j}".encode()).hexdigest()
            phash = phash ^ 0b101 << (j % 60) if j % 10 == 9 else int(digest[:16], 16)
            yield StagedImage(f"incoming/{batch_id}/images/{sku}/img_{j:04d}.jpg", sku, digest, 150_000, 512, 512,
                              phash=f"{phash:016x}")


def manifest(batch_id: str, skus: range):
    doc = {
        "batch_id": batch_id,
        "created_at": "2026-11-01T00:00:00Z",
        "skus": [{"sku_id": sku_id(s), "name": f"Product {s}", "brand": f"Brand {s % 97}", "category": "grocery"}
                 for s in skus],
    }
    return parse_manifest(batch_id, json.dumps(doc).encode())


def reset(conn) -> None:
    conn.execute("DROP SCHEMA public CASCADE")
    conn.execute("CREATE SCHEMA public")
    apply_migrations(conn)


def naive_baseline(conn, sample: int, split: SplitConfig) -> float:
    """Rows/s of one INSERT per image (the obvious ORM-style loop), split decided in Python."""
    m = manifest("naive", range(sample // 350 + 1))
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("INSERT INTO batches (batch_id, status) VALUES ('naive', 'registered')")
        cur.executemany(
            "INSERT INTO skus (sku_id, class_index, name, brand, category, first_batch_id) "
            "VALUES (%s, %s, %s, %s, %s, 'naive')",
            [(s.sku_id, i, s.name, s.brand, s.category) for i, s in enumerate(m.skus)],
        )
    rows = list(staged_images("naive", range(sample // 350 + 1), 350))[:sample]
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        for image in rows:
            u = int(hashlib.md5((image.sha256 + ":split").encode()).hexdigest()[:8], 16) / 2**32
            part = "train" if u < split.train_fraction else "val" if u < split.train_fraction + split.val_fraction else "test"
            cur.execute(
                "INSERT INTO images (sha256, sku_id, batch_id, fsx_path, split, width, height, n_bytes, group_key) "
                "VALUES (%s, %s, 'naive', %s, %s, %s, %s, %s, %s)",
                (image.sha256, image.sku_folder, image.object_key, part, image.width, image.height, image.n_bytes,
                 "image:" + image.sha256),
            )
    return len(rows) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skus", type=int, default=12_000)
    parser.add_argument("--images", type=int, default=350)
    parser.add_argument("--batches", type=int, default=1, help="register the catalogue in this many batches")
    parser.add_argument("--baseline-sample", type=int, default=20_000)
    parser.add_argument("--dsn", help="use this PostgreSQL instead of starting a private one")
    args = parser.parse_args(argv)

    server = None
    if args.dsn:
        dsn = args.dsn
    else:
        from sku_dev.local_stack import PostgresServer, reachable_data_dir

        scratch = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        data_dir = reachable_data_dir(scratch / "pgdata", key=str(scratch))
        server = PostgresServer(data_dir)
        server.start()
        dsn = server.dsn
    split = SplitConfig()
    total = args.skus * args.images
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            reset(conn)
            baseline = naive_baseline(conn, args.baseline_sample, split)
            reset(conn)

            per_batch = -(-args.skus // args.batches)
            # The synthetic file facts (hashing 4.2M strings) are made before the clock starts.
            batches = []
            for b in range(args.batches):
                skus = range(b * per_batch, min(args.skus, (b + 1) * per_batch))
                batch_id = f"bench-{b:03d}"
                batches.append((manifest(batch_id, skus), list(staged_images(batch_id, skus, args.images))))
            started = time.perf_counter()
            for batch_manifest, rows in batches:
                result = register_batch(conn, batch_manifest, rows, split=split)
                assert result.status == "registered", result
            registered = time.perf_counter() - started
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                exported = export_manifests(conn, Path(tmp))
                exported_s = time.perf_counter() - t0
            elapsed = time.perf_counter() - started
            assert sum(exported.counts.values()) == total, exported.counts
    finally:
        if server is not None:
            server.stop()
            # A 4.2M-row catalogue is ~4 GB: never leave it behind.
            import shutil

            shutil.rmtree(data_dir.parent if data_dir.parent != scratch else scratch, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)

    rate = total / elapsed
    print(f"catalogue: {args.skus:,} SKUs x {args.images} images = {total:,} rows in {args.batches} batch(es)")
    print(f"register + split : {registered:8.1f} s")
    print(f"export manifests : {exported_s:8.1f} s   {exported.counts}")
    print(f"total            : {elapsed:8.1f} s   {rate:,.0f} rows/s")
    print(f"naive baseline   : {baseline:,.0f} rows/s (row-by-row INSERT, {args.baseline_sample:,}-row sample)"
          f" -> {total / baseline:,.0f} s extrapolated")
    speedup = rate / baseline
    print(f"speed-up         : {speedup:.1f}x")
    ok_time = elapsed < 120 or total < 4_200_000
    print(f"target < 120 s for 4.2M rows : {'PASS' if elapsed < 120 else 'FAIL'}" if total >= 4_200_000
          else "target < 120 s: n/a (smaller run)")
    print(f"target >= 20x baseline       : {'PASS' if speedup >= 20 else 'FAIL'}")
    return 0 if ok_time and speedup >= 20 else 1


if __name__ == "__main__":
    raise SystemExit(main())
