"""Split by group against a real PostgreSQL (issue #10): no group straddles train/val/test, the
split is deterministic, stable when a later month adds photos to a registered group, variants
follow their source, and SKUs with enough groups get val and test groups."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random

import psycopg
import pytest

from sku_retraining.catalogue.migrations import apply_migrations
from sku_retraining.catalogue.registration import StagedImage, register_batch
from sku_retraining.catalogue.variants import VariantRow, register_variants
from sku_retraining.config import SplitConfig
from sku_retraining.manifest import ManifestError, parse_manifest

SPLIT = SplitConfig()


@pytest.fixture
def conn(pg_dsn):
    connection = psycopg.connect(pg_dsn, autocommit=True)
    apply_migrations(connection)
    yield connection
    connection.close()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hexhash(value: int) -> str:
    return f"{value & (2**64 - 1):016x}"


def flip(value: int, bits: int, seed: int) -> int:
    """``value`` with ``bits`` distinct random bits flipped: a near-duplicate's hash."""
    for b in random.Random(seed).sample(range(64), bits):
        value ^= 1 << b
    return value


def manifest(batch_id: str, skus: list[str], groups: dict[str, str] | None = None):
    doc = {
        "batch_id": batch_id,
        "created_at": "2026-11-01T00:00:00Z",
        "skus": [{"sku_id": s, "name": f"name {s}", "brand": "brand", "category": "cat"} for s in skus],
    }
    if groups:
        doc["images"] = [{"path": p, "group": g} for p, g in sorted(groups.items())]
    return parse_manifest(batch_id, json.dumps(doc).encode())


def burst_batch(batch_id: str, sku: str, bursts: int, frames: int, seed: int = 0, tag: str = "") -> list[StagedImage]:
    """``bursts`` runs of ``frames`` near-identical photos each (hashes within 3 bits of the run's first)."""
    rng = random.Random(f"{sku}:{seed}")
    out = []
    for b in range(bursts):
        base = rng.getrandbits(64)
        for f in range(frames):
            name = f"{tag}b{b:02d}f{f:02d}.jpg"
            out.append(StagedImage(f"incoming/{batch_id}/images/{sku}/{name}", sku, sha(f"{sku}/{tag}{b}/{f}/{seed}"),
                                   1000, 64, 64, phash=hexhash(flip(base, f % 4, seed * 1000 + b * 10 + f))))
    return out


def image_rows(conn) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute("SELECT sha256, sku_id, split, group_key, source_sha256 FROM images ORDER BY sha256")
        return cur.fetchall()


def splits_per_group(conn) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for _sha, sku, split, key, _src in image_rows(conn):
        out.setdefault((sku, key), set()).add(split)
    return out


def test_no_group_straddles_splits_and_skus_get_val_and_test_groups(conn):
    skus = [f"SKU-{i:02d}" for i in range(12)]
    images = [img for i, s in enumerate(skus) for img in burst_batch("b1", s, bursts=5, frames=6, seed=i)]
    result = register_batch(conn, manifest("b1", skus), images,
                            split=dataclasses.replace(SPLIT, val_group_per_sku=True))
    assert result.status == "registered" and result.n_images == len(images)
    groups = splits_per_group(conn)
    assert all(len(s) == 1 for s in groups.values()), {k: v for k, v in groups.items() if len(v) > 1}
    assert len(groups) == 12 * 5 == result.n_groups  # each burst found as one group
    for sku in skus:
        mine = {next(iter(v)) for (s, _k), v in groups.items() if s == sku}
        assert {"val", "test"} <= mine, (sku, mine)  # >= 3 groups: a val and a test group
    with conn.cursor() as cur:
        cur.execute("SELECT sku_id, n_groups, n_originals FROM skus ORDER BY 1")
        assert cur.fetchall() == [(s, 5, 30) for s in skus]


def test_manifest_groups_win_and_a_sku_below_the_holdout_minimum_stays_in_train(conn):
    images = burst_batch("b1", "SKU-A", bursts=4, frames=3) + burst_batch("b1", "SKU-B", bursts=2, frames=3)
    # Two sessions for SKU-A given in the manifest: each is one group, whatever the hashes say.
    labels = {f"SKU-A/{i.object_key.rsplit('/', 1)[1]}": f"session-{n % 2}" for n, i in enumerate(images[:12])}
    register_batch(conn, manifest("b1", ["SKU-A", "SKU-B"], labels), images, split=SPLIT)
    groups = splits_per_group(conn)
    assert sorted(k for s, k in groups if s == "SKU-A") == ["manifest:session-0", "manifest:session-1"]
    assert all(len(v) == 1 for v in groups.values())
    # SKU-A: 2 groups, SKU-B: 2 groups, both below min_originals_for_holdout=3: all train.
    assert {split for v in groups.values() for split in v} == {"train"}


def test_manifest_images_must_be_under_listed_skus():
    with pytest.raises(ManifestError, match="not under a SKU"):
        manifest("b1", ["SKU-A"], {"SKU-Z/x.jpg": "g"})


def test_split_is_deterministic_whatever_the_order(conn, pg_dsn):
    skus = [f"SKU-{i:02d}" for i in range(6)]
    images = [img for i, s in enumerate(skus) for img in burst_batch("b1", s, bursts=6, frames=4, seed=i)]
    register_batch(conn, manifest("b1", skus), images, split=SPLIT)
    first = image_rows(conn)
    conn.execute("DROP SCHEMA public CASCADE")
    conn.execute("CREATE SCHEMA public")
    apply_migrations(conn)
    shuffled = images[:]
    random.Random(7).shuffle(shuffled)
    register_batch(conn, manifest("b1", list(reversed(skus))), shuffled, split=SPLIT)
    assert image_rows(conn) == first


def test_a_later_month_joining_a_group_gets_its_split_and_nothing_moves(conn):
    skus = [f"SKU-{i:02d}" for i in range(8)]
    month1 = [img for i, s in enumerate(skus) for img in burst_batch("m1", s, bursts=5, frames=4, seed=i)]
    labels1 = {f"SKU-00/{i.object_key.rsplit('/', 1)[1]}": "session-x" for i in month1[:4]}
    register_batch(conn, manifest("m1", skus, labels1), month1, split=SPLIT)
    before = image_rows(conn)
    split_of = {(s, k): next(iter(v)) for (s, k), v in splits_per_group(conn).items()}

    # Month 2: more frames of every month-1 burst (same seeds: near-identical hashes), a new
    # photo of SKU-00's labelled session, and fresh bursts.
    month2 = [img for i, s in enumerate(skus) for img in burst_batch("m2", s, bursts=5, frames=2, seed=i, tag="m2")]
    month2 += [img for i, s in enumerate(skus) for img in burst_batch("m2", s, bursts=2, frames=3, seed=100 + i)]
    session_photo = StagedImage("incoming/m2/images/SKU-00/late.jpg", "SKU-00", sha("late"), 1000, 64, 64,
                                phash=hexhash(random.Random(1).getrandbits(64)))
    labels2 = {"SKU-00/late.jpg": "session-x"}
    result = register_batch(conn, manifest("m2", skus, labels2), [*month2, session_photo], split=SPLIT)
    assert result.status == "registered"
    after = image_rows(conn)
    assert set(before) <= set(after)  # no registered row changed (split, group)
    new_rows = {r[0]: r for r in after if r not in set(before)}
    joined = [r for r in new_rows.values() if (r[1], r[3]) in split_of]
    assert len(joined) == 8 * 5 * 2 + 1  # every extra frame and the session photo joined a registered group
    for _sha, sku, split, key, _src in joined:
        assert split == split_of[(sku, key)]
    assert new_rows[sha("late")][3] == "manifest:session-x"
    assert all(len(v) == 1 for v in splits_per_group(conn).values())
    assert result.n_groups == 8 * 2  # only the fresh bursts are new groups


def test_variants_follow_their_source_group_and_split(conn):
    images = burst_batch("b1", "SKU-A", bursts=6, frames=2)
    register_batch(conn, manifest("b1", ["SKU-A"]), images, split=SPLIT)
    with conn.cursor() as cur:
        cur.execute("SELECT sha256, fsx_path, group_key FROM images WHERE split = 'train' ORDER BY sha256 LIMIT 2")
        sources = cur.fetchall()
    rows = [VariantRow(f"{path}__v01.jpg", src, 1, 0, sha(f"variant/{src}"), 64, 64, "{}") for src, path, _ in sources]
    assert register_variants(conn, rows)["inserted"] == 2
    with conn.cursor() as cur:
        cur.execute("""SELECT v.group_key = o.group_key AND v.split = o.split FROM images v
                       JOIN images o ON o.sha256 = v.source_sha256""")
        assert [r[0] for r in cur.fetchall()] == [True, True]
