"""Decide whether the bytes of an uploaded file are an image we can train on.

Everything a bad upload can be (zero bytes, truncated, corrupt, not an image, a format we do
not accept, a decompression bomb, too small to learn from, a pixel mode we cannot turn into
8-bit RGB faithfully) ends as an :class:`ImageProblem` with a code and a message, never as an
exception, so one bad file is quarantined and the rest of the batch goes on.

Sizes are those of the image *as it is meant to be seen*: a phone photo stored sideways with an
EXIF orientation tag is measured upright, as every later decode (augmentation, training,
evaluation) applies the same tag with ``PIL.ImageOps.exif_transpose``.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

#: Default smallest accepted side (pixels, upright); the training crop is far larger, so a
#: thumbnail-sized upload is upscaled noise. Configurable: ``intake.min_side``.
DEFAULT_MIN_SIDE = 32
# Pixel modes that convert to 8-bit RGB without losing the picture. 16-bit and float
# single-channel modes ("I;16", "I", "F") clip to white in ``convert("RGB")``: refused.
CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La"})
# EXIF orientations 5-8 are stored rotated by 90 degrees: width and height swap when upright.
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112


def upright_size(image) -> tuple[int, int]:
    """``(width, height)`` of ``image`` once its EXIF orientation is applied."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block means "as stored"
        orientation = 1
    width, height = image.size
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    n_bytes: int
    format: str
    width: int
    height: int
    # 64-bit DCT perceptual hash (16 hex digits) of the upright image; near-duplicates differ
    # in a few bits. Registration groups them so they share a split (catalogue/grouping.py).
    phash: str | None = None


# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
            6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def perceptual_hash(image) -> str | None:
    """``imagehash.phash`` of the upright picture (16 hex digits), None when it cannot be computed.

    The loaded image is first reduced to 64x64 greyscale (phash itself looks at 32x32), so a
    12 MP photo costs a few ms more than its decode; the EXIF orientation is applied to that
    thumbnail, so a photo stored sideways hashes like its upright twin.
    """
    import imagehash
    from PIL import Image

    try:
        thumb = image.convert("L").resize((64, 64), Image.Resampling.BOX)
        try:
            orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
        except Exception:  # noqa: BLE001 - unreadable EXIF: as stored
            orientation = 1
        if orientation in _UPRIGHT:
            thumb = thumb.transpose(getattr(Image.Transpose, _UPRIGHT[orientation]))
        return str(imagehash.phash(thumb))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ImageProblem:
    code: str
    detail: str
    sha256: str | None
    n_bytes: int


def inspect_image(
    data: bytes, *, allowed_formats: tuple[str, ...] = ("JPEG", "PNG"), min_side: int = DEFAULT_MIN_SIDE
) -> ImageFacts | ImageProblem:
    """Hash, identify and fully decode ``data`` (decoding catches truncation and corruption);
    refuse images whose upright shorter side is below ``min_side`` pixels."""
    from PIL import Image, UnidentifiedImageError

    digest = hashlib.sha256(data).hexdigest() if data else None
    if not data:
        return ImageProblem("empty_file", "file is empty (0 bytes)", None, 0)
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format or "unknown"
                if fmt not in allowed_formats:
                    return ImageProblem(
                        "unsupported_format",
                        f"format {fmt} is not accepted (accepted: {', '.join(allowed_formats)})",
                        digest,
                        len(data),
                    )
                image.load()
                mode = image.mode
                width, height = upright_size(image)
                phash = perceptual_hash(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageProblem("decompression_bomb", f"refused: {exc}", digest, len(data))
    except UnidentifiedImageError:
        return ImageProblem("not_an_image", "not a recognisable image file", digest, len(data))
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or corrupt data as OSError ("image file is truncated", ...).
        return ImageProblem("corrupt_image", f"cannot decode: {exc}", digest, len(data))
    if mode not in CONVERTIBLE_MODES:
        return ImageProblem(
            "unsupported_mode",
            f"pixel mode {mode} (e.g. 16-bit greyscale) is not accepted: save it as 8-bit RGB",
            digest,
            len(data),
        )
    if min(width, height) < min_side:
        return ImageProblem(
            "too_small", f"{width}x{height} px is below the minimum side of {min_side} px", digest, len(data)
        )
    return ImageFacts(sha256=digest, n_bytes=len(data), format=fmt, width=width, height=height, phash=phash)
