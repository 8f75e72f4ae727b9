"""The model registry in the catalogue DB: versions, decisions, production history.

The S3 side (objects, ``production.json``) is :mod:`sku_retraining.promotion`; the order of
the two is :mod:`sku_retraining.tasks.promotion`'s job. Functions here take a psycopg 3
connection in autocommit mode (see ``CatalogueHook.open_connection``) and open their own
``conn.transaction()`` blocks, which nest as savepoints when the caller already holds one
(the pointer update holds :func:`lock_model` across the S3 write and the DB record).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

# Arbitrary constant: the first key of the two-key advisory locks that serialise version
# allocation and pointer changes of one model (the second key is hashtext(model_name)).
# Two-key advisory locks never collide with the single-bigint key of the migrations lock.
_MODEL_LOCK_CLASS = 0x5C0_0002

DECISIONS = ("promote", "reject", "force_promote")


class RegistryError(RuntimeError):
    """The registry refuses the change; the message says why."""


@dataclass(frozen=True)
class ModelVersion:
    model_name: str
    version: int
    dag_run_id: str
    status: str
    s3_prefix: str
    objects: dict[str, dict[str, Any]] | None
    lineage: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    created_at: datetime
    promoted_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (for XCom and logs): timestamps as ISO UTC strings."""
        return {
            "model_name": self.model_name,
            "version": self.version,
            "dag_run_id": self.dag_run_id,
            "status": self.status,
            "s3_prefix": self.s3_prefix,
            "objects": self.objects,
            "created_at": iso_utc(self.created_at),
            "promoted_at": iso_utc(self.promoted_at) if self.promoted_at else None,
        }


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    model_name: str
    version: int
    previous_version: int | None
    action: str
    dag_run_id: str
    created_at: datetime


def iso_utc(moment: datetime) -> str:
    """``2025-01-31T12:00:00.123Z``: one spelling of a UTC instant everywhere we write one."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso_utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


_VERSION_COLUMNS = (
    "model_name, version, dag_run_id, status, s3_prefix, objects, lineage, evaluation, created_at, promoted_at"
)


def _version(row: tuple | None) -> ModelVersion | None:
    return None if row is None else ModelVersion(*row)


def lock_model(conn, model_name: str) -> None:
    """Serialise version allocation and pointer changes of ``model_name`` until the
    enclosing transaction ends. Call inside ``conn.transaction()``."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_MODEL_LOCK_CLASS, model_name))


def allocate_version(
    conn, *, model_name: str, run_id: str, s3_prefix_for: Callable[[int], str]
) -> ModelVersion:
    """The run's version: the one it already has, else ``max + 1`` (status ``staged``).

    Under :func:`lock_model`, so two runs promoting at once never get the same number; rows
    are never deleted, so a number abandoned by a failed run is never handed out again.

    :param s3_prefix_for: version number -> the ``s3://`` prefix its objects go under.
    """
    with conn.transaction():
        lock_model(conn, model_name)
        existing = version_for_run(conn, model_name, run_id)
        if existing is not None:
            return existing
        with conn.cursor() as cur:
            cur.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM model_versions WHERE model_name = %s", (model_name,)
            )
            (version,) = cur.fetchone()
            cur.execute(
                f"""INSERT INTO model_versions (model_name, version, dag_run_id, status, s3_prefix)
                    VALUES (%s, %s, %s, 'staged', %s)
                    RETURNING {_VERSION_COLUMNS}""",
                (model_name, version, run_id, s3_prefix_for(version)),
            )
            return _version(cur.fetchone())


def version_for_run(conn, model_name: str, run_id: str) -> ModelVersion | None:
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE model_name = %s AND dag_run_id = %s",
            (model_name, run_id),
        )
        return _version(cur.fetchone())


def get_version(conn, model_name: str, version: int) -> ModelVersion | None:
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE model_name = %s AND version = %s",
            (model_name, version),
        )
        return _version(cur.fetchone())


def list_versions(conn, model_name: str) -> list[ModelVersion]:
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE model_name = %s ORDER BY version", (model_name,)
        )
        return [_version(row) for row in cur.fetchall()]


def mark_promoted(
    conn,
    *,
    model_name: str,
    version: int,
    promoted_at: datetime,
    objects: dict[str, dict[str, Any]],
    lineage: dict[str, Any],
    evaluation: dict[str, Any] | None,
) -> None:
    """Status ``promoted`` with the verified objects; a second call changes nothing."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            """UPDATE model_versions
                  SET status = 'promoted', promoted_at = %s, objects = %s, lineage = %s, evaluation = %s
                WHERE model_name = %s AND version = %s AND status = 'staged'""",
            (promoted_at, Jsonb(objects), Jsonb(lineage), Jsonb(evaluation), model_name, version),
        )
        if cur.rowcount == 0 and get_version(conn, model_name, version) is None:
            raise RegistryError(f"model {model_name!r} has no version {version}")


def latest_history(conn, model_name: str) -> HistoryEntry | None:
    """The last pointer change recorded for ``model_name``: what production should be."""
    with conn.cursor() as cur:
        cur.execute(
            """SELECT id, model_name, version, previous_version, action, dag_run_id, created_at
                 FROM production_history WHERE model_name = %s ORDER BY id DESC LIMIT 1""",
            (model_name,),
        )
        row = cur.fetchone()
        return None if row is None else HistoryEntry(*row)


def history(conn, model_name: str) -> list[HistoryEntry]:
    with conn.cursor() as cur:
        cur.execute(
            """SELECT id, model_name, version, previous_version, action, dag_run_id, created_at
                 FROM production_history WHERE model_name = %s ORDER BY id""",
            (model_name,),
        )
        return [HistoryEntry(*row) for row in cur.fetchall()]


def record_pointer_change(
    conn,
    *,
    model_name: str,
    version: int,
    previous_version: int | None,
    action: str,
    run_id: str,
    created_at: datetime,
) -> bool:
    """Append a production_history row unless the last one already records this change.

    The pointer is written before this row (S3 and the DB cannot share a transaction), so a
    retry after a crash in between finds the pointer already changed and comes here again:
    comparing with the last row keeps that retry from logging the change twice. Returns
    whether a row was added. Call under :func:`lock_model`.
    """
    if action not in ("promote", "rollback"):
        raise ValueError(f"action must be 'promote' or 'rollback', got {action!r}")
    last = latest_history(conn, model_name)
    if last is not None and (last.version, last.action, last.dag_run_id) == (version, action, run_id):
        return False
    with conn.transaction(), conn.cursor() as cur:
        # The partial unique index makes a second 'promote' row for one run impossible
        # even if this were called outside the lock.
        cur.execute(
            """INSERT INTO production_history (model_name, version, previous_version, action, dag_run_id, created_at)
               VALUES (%s, %s, %s, %s, %s, %s)
               ON CONFLICT (model_name, dag_run_id) WHERE action = 'promote' DO NOTHING""",
            (model_name, version, previous_version, action, run_id, created_at),
        )
        return cur.rowcount == 1


def record_decision(
    conn,
    *,
    model_name: str,
    run_id: str,
    decision: str,
    reasons: list[str] | None = None,
    gates: list[dict[str, Any]] | None = None,
    version: int | None = None,
) -> None:
    """Upsert the run's decision (the last call for a run wins; the same call twice is a no-op).

    ``reasons``/``gates`` left as ``None`` keep what an earlier call recorded, so the promote
    task can attach the version without knowing the gates the branch task recorded.

    :raises RegistryError: rejecting a run whose version is already promoted.
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    if decision == "reject":
        if version is not None:
            raise ValueError("a rejection has no model version")
        promoted = version_for_run(conn, model_name, run_id)
        if promoted is not None and promoted.status == "promoted":
            raise RegistryError(
                f"run {run_id!r} already promoted {model_name} v{promoted.version:04d}; "
                "a rejection cannot be recorded for it (roll back instead)"
            )
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            """INSERT INTO model_decisions (model_name, dag_run_id, decision, reasons, gates, version)
               VALUES (%s, %s, %s, %s, %s, %s)
               ON CONFLICT (model_name, dag_run_id) DO NOTHING""",
            (model_name, run_id, decision, Jsonb(reasons or []), Jsonb(gates or []), version),
        )
        if cur.rowcount == 1:
            return
        cur.execute(
            """SELECT decision, reasons, gates, version FROM model_decisions
                WHERE model_name = %s AND dag_run_id = %s FOR UPDATE""",
            (model_name, run_id),
        )
        old = cur.fetchone()
        new = (
            decision,
            old[1] if reasons is None else list(reasons),
            old[2] if gates is None else list(gates),
            # A rejection has no version; a promote decision keeps the one promote attached.
            None if decision == "reject" else (old[3] if version is None else version),
        )
        # Only a real change touches the row, so a retried task leaves it byte-identical.
        if new != tuple(old):
            cur.execute(
                """UPDATE model_decisions SET decision = %s, reasons = %s, gates = %s, version = %s,
                          updated_at = now()
                    WHERE model_name = %s AND dag_run_id = %s""",
                (new[0], Jsonb(new[1]), Jsonb(new[2]), new[3], model_name, run_id),
            )


def get_decision(conn, model_name: str, run_id: str) -> dict[str, Any] | None:
    with conn.cursor() as cur:
        cur.execute(
            """SELECT decision, reasons, gates, version, created_at FROM model_decisions
                WHERE model_name = %s AND dag_run_id = %s""",
            (model_name, run_id),
        )
        row = cur.fetchone()
    if row is None:
        return None
    decision, reasons, gates, version, created_at = row
    return {
        "model_name": model_name,
        "dag_run_id": run_id,
        "decision": decision,
        "reasons": reasons,
        "gates": gates,
        "version": version,
        "created_at": iso_utc(created_at),
    }
