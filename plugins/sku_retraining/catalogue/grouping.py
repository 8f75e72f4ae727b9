"""Split groups: which originals must share a split (issue #10).

Photos of one product are shot in runs of near-identical frames; split one image at a time,
a test photo's neighbour sits in train and the test top-1 flatters the model. So every
original belongs to a *group* of its SKU, and the split is decided per group:

* the manifest's ``group`` for the image (e.g. the capture session): ``manifest:<group>``;
* else its near-duplicate cluster: images of the same SKU whose 64-bit perceptual hashes
  (:func:`sku_retraining.image_check.perceptual_hash`, stored in ``images.phash``) differ in at
  most ``max_distance`` bits are linked, and a cluster is the connected component of those
  links, new images and the SKU's already registered ones together. A cluster that touches a
  registered group (or a manifest group of this batch) joins it — the smallest key when it
  touches several, so registered groups are never merged or moved; otherwise it is a new group
  ``phash:<smallest sha256 in the cluster>`` (the same on any machine, in any order);
* else (no hash) the image alone: ``image:<sha256>``.

Clustering is within a SKU only. It runs in memory with numpy, one SKU at a time (all pairs:
a SKU has hundreds of originals, so it is a few hundred thousand XOR + popcounts), before the
batch is COPY'd; the split of each group is then decided set-based in SQL.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MANIFEST_PREFIX = "manifest:"
PHASH_PREFIX = "phash:"
IMAGE_PREFIX = "image:"
#: Default link distance (bits of 64). Frames of one burst or a re-upload after recompression
#: differ by a few bits; unrelated photos of one product by ~32 (bench/README.md, issue #10).
DEFAULT_MAX_DISTANCE = 8


@dataclass(frozen=True, slots=True)
class GroupInput:
    """A new original: its content hash, SKU, signed 64-bit phash (or None), manifest group."""

    sha256: str
    sku_id: str
    phash: int | None
    manifest_group: str | None = None


def phash_to_int(hex_hash: str) -> int:
    """16 hex digits → the signed 64-bit integer PostgreSQL's ``bigint`` stores."""
    value = int(hex_hash, 16)
    if not 0 <= value < 2**64 or len(hex_hash) != 16:
        raise ValueError(f"not a 64-bit hash: {hex_hash!r}")
    return value - 2**64 if value >= 2**63 else value


def _components(n: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


def _near_pairs(np, a, b, max_distance: int, upper: bool, block: int = 1024):
    """(i, j) with popcount(a[i] ^ b[j]) <= max_distance (j > i when ``upper``), in row blocks
    so a SKU with many images never builds a huge matrix."""
    for start in range(0, len(a), block):
        close = np.bitwise_count(a[start:start + block, None] ^ b[None, :]) <= max_distance
        rows, cols = np.nonzero(close)
        rows += start
        if upper:
            keep = cols > rows
            rows, cols = rows[keep], cols[keep]
        yield from zip(rows.tolist(), cols.tolist(), strict=True)


def assign_groups(
    new: Iterable[GroupInput],
    existing: Iterable[tuple[str, int, str]] = (),
    max_distance: int = DEFAULT_MAX_DISTANCE,
) -> dict[str, str]:
    """``sha256 -> group_key`` for every new original (see the module docstring).

    :param existing: ``(sku_id, phash, group_key)`` of the SKUs' registered originals with a hash.
    :param max_distance: link two images when their hashes differ in at most this many bits
        (negative: no clustering, every unlabelled image is its own group).
    """
    import numpy as np

    out: dict[str, str] = {}
    by_sku: dict[str, list[GroupInput]] = defaultdict(list)
    for item in new:
        if item.manifest_group is not None:
            out[item.sha256] = MANIFEST_PREFIX + item.manifest_group
            # A labelled image anchors its group: unlabelled near-duplicates join it.
            if item.phash is not None:
                by_sku[item.sku_id].append(item)
        elif item.phash is None or max_distance < 0:
            out[item.sha256] = IMAGE_PREFIX + item.sha256
        else:
            by_sku[item.sku_id].append(item)
    anchors: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for sku, phash, key in existing:
        if sku in by_sku and phash is not None:
            anchors[sku].append((phash, key))

    for sku, items in by_sku.items():
        free = [it for it in items if it.manifest_group is None]
        if not free:
            continue
        fixed = anchors.get(sku, []) + [(it.phash, MANIFEST_PREFIX + it.manifest_group)
                                        for it in items if it.manifest_group is not None]
        hashes = np.array([it.phash for it in free], dtype=np.int64).view(np.uint64)
        roots = _components(len(free), _near_pairs(np, hashes, hashes, max_distance, upper=True))
        touched: dict[int, str] = {}
        if fixed:
            fixed_hashes = np.array([h for h, _ in fixed], dtype=np.int64).view(np.uint64)
            for i, j in _near_pairs(np, hashes, fixed_hashes, max_distance, upper=False):
                root, key = roots[i], fixed[j][1]
                if root not in touched or key < touched[root]:
                    touched[root] = key
        first: dict[int, str] = {}
        for it, root in zip(free, roots, strict=True):
            if root not in first or it.sha256 < first[root]:
                first[root] = it.sha256
        for it, root in zip(free, roots, strict=True):
            out[it.sha256] = touched.get(root) or PHASH_PREFIX + first[root]
    return out


def manifest_groups(images: Iterable[Mapping[str, object]] | None) -> dict[str, str]:
    """``<sku_id>/<file> -> group`` from the manifest's optional ``images`` list."""
    return {str(e["path"]): str(e["group"]) for e in images or () if e.get("group") is not None}
