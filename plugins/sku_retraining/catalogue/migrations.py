"""Versioned schema migrations: ``sku_retraining/resources/migrations/NNNN_<name>.sql``
(packaged, read with :mod:`importlib.resources`), applied in order.

All pending migrations run in one transaction under an advisory lock, so two workers
migrating at once serialise and a failing migration leaves the schema as it was. An applied
migration whose file has changed since is an error (fix forward with a new file).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable

from sku_retraining.config import RESOURCES

MIGRATIONS = RESOURCES / "migrations"

_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
# Arbitrary constant: the advisory lock id that serialises concurrent migrators.
_LOCK_ID = 0x5C0_0001


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Traversable = MIGRATIONS) -> list[Migration]:
    migrations = []
    for path in sorted((p for p in directory.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name):
        match = _FILE_RE.fullmatch(path.name)
        if not match:
            raise MigrationError(f"migration file {path.name} must be named NNNN_<lower_snake>.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {directory}")
    return migrations


def apply_migrations(conn, directory: Traversable = MIGRATIONS) -> list[str]:
    """Apply pending migrations; return the names applied (empty when up to date)."""
    migrations = discover(directory)
    applied_now: list[str] = []
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        cur.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        cur.execute("SELECT version, checksum FROM schema_migrations")
        done = dict(cur.fetchall())
        for migration in migrations:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name}.sql was changed after it "
                        "was applied; add a new migration instead"
                    )
                continue
            cur.execute(migration.sql)
            cur.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(f"{migration.version:04d}_{migration.name}")
    return applied_now
