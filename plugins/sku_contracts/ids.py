"""Identifier rules shared by every layer: batch ids, SKU ids and image file names.

``re.fullmatch`` with ASCII classes: ``$`` would accept a trailing newline, and ``\\w`` would
accept look-alike unicode letters (fullwidth digits, division slashes...).
"""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Image file names follow the id alphabet too (they become FSx paths), with a longer limit.
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class InvalidIdError(ValueError):
    """An id or path component breaks the naming contract; the message says which and why."""


def _describe(value: object) -> str:
    return ascii(value)


def check_id(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid ``kind`` id (``batch_id``, ``sku_id``), else raise."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or value in (".", ".."):
        raise InvalidIdError(
            f"{kind} {_describe(value)} is invalid: it must match {ID_PATTERN} "
            "(ASCII letters, digits, '.', '_', '-'; at most 64 characters; no path separators)"
        )
    return value


def is_valid_id(value: object) -> bool:
    try:
        check_id("id", value)
    except InvalidIdError:
        return False
    return True


def check_file_name(value: str) -> str:
    if not _FILE_NAME_RE.fullmatch(value) or set(value) == {"."}:
        raise InvalidIdError(
            f"file name {_describe(value)} is invalid: it must be ASCII letters, digits, '.', '_', '-' "
            "(at most 128 characters, not starting with '.', no spaces or path separators)"
        )
    return value
