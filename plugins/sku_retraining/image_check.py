"""Decide whether the bytes of an uploaded file are an image we can train on.

Everything a bad upload can be (zero bytes, truncated, corrupt, not an image, a format we do
not accept, a decompression bomb) ends as an :class:`ImageProblem` with a code and a message,
never as an exception, so one bad file is quarantined and the rest of the batch goes on.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    n_bytes: int
    format: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageProblem:
    code: str
    detail: str
    sha256: str | None
    n_bytes: int


def inspect_image(data: bytes, *, allowed_formats: tuple[str, ...] = ("JPEG", "PNG")) -> ImageFacts | ImageProblem:
    """Hash, identify and fully decode ``data`` (decoding catches truncation and corruption)."""
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
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageProblem("decompression_bomb", f"refused: {exc}", digest, len(data))
    except UnidentifiedImageError:
        return ImageProblem("not_an_image", "not a recognisable image file", digest, len(data))
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or corrupt data as OSError ("image file is truncated", ...).
        return ImageProblem("corrupt_image", f"cannot decode: {exc}", digest, len(data))
    return ImageFacts(sha256=digest, n_bytes=len(data), format=fmt, width=width, height=height)
