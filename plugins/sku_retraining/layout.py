"""Where things live in the data bucket and on the FSx mount.

FSx for Lustre is linked to the data bucket at its root, so an object's S3 key is also its
path under the FSx mount: ``incoming/<batch>/images/<sku>/<file>`` on both sides.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from sku_contracts.files import AUGMENTED_DIR, IMAGES_DIR, SUCCESS_MARKER
from sku_contracts.files import BATCH_MANIFEST as MANIFEST_NAME
from sku_contracts.ids import InvalidIdError, check_file_name, check_id


@dataclass(frozen=True)
class BatchLayout:
    """Keys of one batch under the ``incoming/`` prefix."""

    incoming_prefix: str
    batch_id: str

    @property
    def prefix(self) -> str:
        return f"{self.incoming_prefix}{self.batch_id}/"

    @property
    def manifest_key(self) -> str:
        return self.prefix + MANIFEST_NAME

    @property
    def success_key(self) -> str:
        return self.prefix + SUCCESS_MARKER

    @property
    def images_prefix(self) -> str:
        return f"{self.prefix}{IMAGES_DIR}/"

    @property
    def augmented_prefix(self) -> str:
        return f"{self.prefix}{AUGMENTED_DIR}/"


@dataclass(frozen=True)
class ImageKey:
    key: str
    sku_id: str
    file_name: str


def parse_image_key(layout: BatchLayout, key: str) -> ImageKey:
    """Split ``<images_prefix><sku_id>/<file>`` and check both parts.

    :raises InvalidIdError: with a message naming the key when the layout or a name is bad.
    """
    if not key.startswith(layout.images_prefix):
        raise InvalidIdError(f"{key!r} is not under {layout.images_prefix!r}")
    rest = key[len(layout.images_prefix) :]
    parts = rest.split("/")
    if len(parts) != 2:
        raise InvalidIdError(
            f"image key {ascii(key)} must be {layout.images_prefix}<sku_id>/<file>, "
            f"found {len(parts)} path component(s) after images/"
        )
    sku_folder, file_name = parts
    try:
        check_id("sku_id folder", sku_folder)
        check_file_name(file_name)
    except InvalidIdError as exc:
        raise InvalidIdError(f"{exc} (in {ascii(key)})") from None
    # Belt and braces: the normalised path must be the path itself (no '.', '..', '//').
    if posixpath.normpath(key) != key:
        raise InvalidIdError(f"image key {ascii(key)} is not a normalised path")
    return ImageKey(key=key, sku_id=sku_folder, file_name=file_name)


def batch_id_from_success_key(incoming_prefix: str, key: str) -> str | None:
    """``incoming/<batch>/_SUCCESS`` → ``<batch>``; ``None`` for any other key."""
    if not key.startswith(incoming_prefix) or not key.endswith("/" + SUCCESS_MARKER):
        return None
    middle = key[len(incoming_prefix) : -len(SUCCESS_MARKER) - 1]
    return middle if "/" not in middle else None


def augmented_dir_for(image_path: str) -> str:
    """``incoming/<batch>/images/<sku>/<file>`` → ``incoming/<batch>/augmented/<sku>``.

    Variants are written next to their batch, under ``augmented/`` instead of ``images/``,
    so a batch's ``images/`` prefix keeps holding exactly what was uploaded.
    """
    parts = image_path.split("/")
    if len(parts) < 4 or parts[-3] != IMAGES_DIR:
        raise InvalidIdError(f"{image_path!r} is not a batch image path (.../{IMAGES_DIR}/<sku>/<file>)")
    return "/".join([*parts[:-3], AUGMENTED_DIR, parts[-2]])
