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
        # flatnonzero + divmod: ~10x faster than the 2-D nonzero on these small matrices.
        rows, cols = np.divmod(np.flatnonzero(close), close.shape[1])
        rows += start
        if upper:
            keep = cols > rows
            rows, cols = rows[keep], cols[keep]
        yield from zip(rows.tolist(), cols.tolist(), strict=True)


def default_key(sha256: str, hashed: bool) -> str:
    """The group of an image in no cluster and no manifest group."""
    return (PHASH_PREFIX if hashed else IMAGE_PREFIX) + sha256


def hashes_array(np, hex_hashes: list[str]):
    """16-hex-digit hashes -> uint64 array, in one pass (no Python int per image)."""
    return np.frombuffer(bytes.fromhex("".join(hex_hashes)), dtype=">u8").astype(np.uint64)


def group_keys(
    shas: list[str],
    skus: list[str],
    phashes: list[str | None],
    labels: list[str | None],
    existing: Iterable[tuple[str, int, str]] = (),
    max_distance: int = DEFAULT_MAX_DISTANCE,
) -> dict[int, str]:
    """Group keys of the new originals given column-wise, for those whose key is *not*
    :func:`default_key` (labelled, clustered or joining a registered group): ``{index: key}``.
    ``phashes`` are 16 hex digits (or None); ``existing`` holds signed 64-bit integers.

    Most images are alone in their group, so only the few in a cluster cost any Python work;
    the all-pairs distances are numpy, one SKU at a time.
    """
    import numpy as np

    out: dict[int, str] = {}
    if not shas:
        return out
    anchors: dict[str, list[tuple[int, str]]] = defaultdict(list)  # phash as uint64 bits
    for sku, phash, key in existing:
        if phash is not None:
            anchors[sku].append((phash & (2**64 - 1), key))
    by_sku: dict[str, list[int]] = defaultdict(list)
    for i, (phash, label) in enumerate(zip(phashes, labels, strict=True)):
        if label is not None:
            out[i] = MANIFEST_PREFIX + label
            if phash is not None:  # a labelled image anchors its group: unlabelled near-duplicates join it
                anchors[skus[i]].append((int(phash, 16), out[i]))
        elif phash is not None and max_distance >= 0:
            by_sku[skus[i]].append(i)
    if not by_sku:
        return out
    rows_all = [i for members in by_sku.values() for i in members]
    hashes_all = hashes_array(np, [phashes[i] for i in rows_all])
    start = 0
    for sku, rows in by_sku.items():
        h = hashes_all[start:start + len(rows)]
        start += len(rows)
        pairs = list(_near_pairs(np, h, h, max_distance, upper=True))
        fixed = anchors.get(sku, [])
        near_fixed = []
        if fixed:
            fixed_hashes = np.array([fh for fh, _ in fixed], dtype=np.uint64)
            near_fixed = list(_near_pairs(np, h, fixed_hashes, max_distance, upper=False))
        if not pairs and not near_fixed:
            continue  # every image of this SKU is alone: the default key
        # Union-find over the few images that have a neighbour; the rest stay alone.
        nodes = sorted({i for pair in pairs for i in pair} | {i for i, _ in near_fixed})
        local = {node: n for n, node in enumerate(nodes)}
        roots = _components(len(nodes), [(local[a], local[b]) for a, b in pairs])
        touched: dict[int, str] = {}
        for i, j in near_fixed:
            root, key = roots[local[i]], fixed[j][1]
            if root not in touched or key < touched[root]:
                touched[root] = key
        first: dict[int, str] = {}
        for node, root in zip(nodes, roots, strict=True):
            sha = shas[rows[node]]
            if root not in first or sha < first[root]:
                first[root] = sha
        for node, root in zip(nodes, roots, strict=True):
            out[rows[node]] = touched.get(root) or PHASH_PREFIX + first[root]
    return out


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
    items = list(new)
    hexes = [None if i.phash is None else f"{i.phash & (2**64 - 1):016x}" for i in items]
    keys = group_keys([i.sha256 for i in items], [i.sku_id for i in items], hexes,
                      [i.manifest_group for i in items], existing, max_distance)
    return {it.sha256: keys.get(n) or default_key(it.sha256, it.phash is not None and max_distance >= 0)
            for n, it in enumerate(items)}


def manifest_groups(images: Iterable[Mapping[str, object]] | None) -> dict[str, str]:
    """``<sku_id>/<file> -> group`` from the manifest's optional ``images`` list."""
    return {str(e["path"]): str(e["group"]) for e in images or () if e.get("group") is not None}
