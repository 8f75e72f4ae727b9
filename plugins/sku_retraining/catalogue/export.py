"""Export the training manifests (train/val/test CSV + ``classes.json``) from the catalogue.

The manifests are streamed out of PostgreSQL with ``COPY ... TO STDOUT`` (no row-by-row
fetch) into files, hashed while written. The snapshot id is a content address of the files,
so exporting twice without catalogue changes yields the same id and the same bytes.

CSV columns: ``path,class_index,sku_id,sha256`` with ``path`` relative to the images root
(the FSx mount); rows ordered by ``sha256`` (stable, and already a shuffle of the SKUs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from psycopg import sql

from sku_contracts.files import CLASSES_FILE, SPLITS


@dataclass(frozen=True)
class ExportedManifests:
    snapshot_id: str
    directory: Path
    files: dict[str, str]  # file name -> sha256
    counts: dict[str, int]
    num_classes: int


def _export_split(cur, split: str, path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    lines = 0
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    # COPY takes no bind parameters: the split goes in as a quoted literal, composed by psycopg.
    query = sql.SQL(
        "COPY (SELECT i.fsx_path AS path, s.class_index, i.sku_id, i.sha256 "
        "FROM images i JOIN skus s USING (sku_id) "
        "WHERE i.split = {split} ORDER BY i.sha256) "
        "TO STDOUT WITH (FORMAT csv, HEADER true)"
    ).format(split=sql.Literal(split))
    with path.open("wb") as out, cur.copy(query) as copy:
        for chunk in copy:
            data = bytes(chunk)
            digest.update(data)
            out.write(data)
            lines += data.count(b"\n")
    return digest.hexdigest(), max(0, lines - 1)


def export_manifests(conn, directory: Path, extra_files: dict[str, bytes] | None = None) -> ExportedManifests:
    """Write ``train.csv``, ``val.csv``, ``test.csv`` and ``classes.json`` into ``directory``.

    Runs in one REPEATABLE READ transaction so the four files describe one catalogue state.
    ``extra_files`` (e.g. the evaluation context) are written beside them and are part of
    the snapshot id.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    counts: dict[str, int] = {}
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for split in SPLITS:
            files[f"{split}.csv"], counts[split] = _export_split(cur, split, directory / f"{split}.csv")
        cur.execute("SELECT sku_id, class_index FROM skus ORDER BY class_index")
        rows = cur.fetchall()
    # Class indices are dense (see registration), so the list index is the class index.
    classes = [sku for sku, _ in rows]
    if any(index != position for position, (_, index) in enumerate(rows)):
        raise RuntimeError("class indices in the catalogue are not dense 0..N-1; refusing to export")
    payload = json.dumps({"num_classes": len(classes), "classes": classes}, indent=1).encode() + b"\n"
    (directory / CLASSES_FILE).write_bytes(payload)
    files[CLASSES_FILE] = hashlib.sha256(payload).hexdigest()
    for name, data in (extra_files or {}).items():
        (directory / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    snapshot_id = "ds-" + hashlib.sha256(
        "".join(f"{name}:{digest}\n" for name, digest in sorted(files.items())).encode()
    ).hexdigest()[:16]
    return ExportedManifests(snapshot_id, directory, files, counts, len(classes))
