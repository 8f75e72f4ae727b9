"""Synthetic SKU image batches for tests, the local stack and demos.

Each SKU gets a packaging *design* derived from ``sha256(sku_id)`` (shape, colours, pattern,
label band, brand logo and text), so the same SKU looks the same in every batch. Each image is
that product photographed at a till: varied background and clutter, lighting, rotation, scale,
position, partial occlusion (a hand or another object), blur, noise and JPEG quality, all
seeded by ``(seed, sku_id, image index)``. Same arguments give byte-identical files.

Only PIL and numpy are used (no torch), so the generator runs inside Airflow workers and CI.

Faults for the intake's tests are added with ``inject=``; they only *add* files or change the
manifest / marker, never the bytes of the good images, and every one is listed in
:attr:`GeneratedBatch.expected_bad`. ``png_as_jpg`` is the exception to "bad": the intake
decides by content, not by extension, so a PNG named ``.jpg`` is *accepted*; it is still
recorded (kind in :data:`ACCEPTED_BY_CONTENT`) so tests can check that decision.

Command line (``PYTHONPATH=plugins:devtools``)::

    python -m sku_dev.synthetic --batch-id 2026-11 --skus 20 --images-per-sku 30 \\
        --seed 1 --bucket sku-retraining-data [--endpoint-url URL] [--inject corrupt_jpeg,...]
    python -m sku_dev.synthetic --batch-id 2026-11 --out-dir /tmp/batches
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import struct
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from sku_contracts.ids import check_id
from sku_retraining.layout import IMAGES_DIR, MANIFEST_NAME, SUCCESS_MARKER

log = logging.getLogger(__name__)

ENDPOINT_ENV = "SKU_RETRAINING_S3_ENDPOINT_URL"

IMAGE_FAULTS: tuple[str, ...] = (
    "corrupt_jpeg",
    "truncated_jpeg",
    "zero_byte",
    "non_image",
    "wrong_extension",
    "png_as_jpg",
    "duplicate_across_skus",
    "hostile_path",
    "decompression_bomb",
    "exif_rotated",
    "cmyk_jpeg",
    "sixteen_bit_png",
    "tiny_image",
    "hostile_file_names",
)
BATCH_FAULTS: tuple[str, ...] = (
    "missing_manifest",
    "bad_manifest_json",
    "manifest_schema_violation",
    "hostile_manifest_sku",
    "empty_batch",
    "no_success_marker",
)
FAULT_KINDS: tuple[str, ...] = IMAGE_FAULTS + BATCH_FAULTS
#: Recorded in ``expected_bad`` but readable: the intake accepts these by content.
ACCEPTED_BY_CONTENT: frozenset[str] = frozenset({"png_as_jpg", "exif_rotated", "cmyk_jpeg"})
#: Side of the ``tiny_image`` fault: below the intake's default minimum side (32 px).
TINY_SIDE = 16
#: EXIF orientation of ``exif_rotated``: 6 = "rotate 90 degrees clockwise to display"; the
#: file holds the picture turned 90 degrees counter-clockwise.
EXIF_ORIENTATION_TAG, EXIF_ROTATE_CW = 0x0112, 6
# Faults that each rewrite manifest.json: two at once would make expected_bad ambiguous.
_MANIFEST_FAULTS = frozenset(
    {"missing_manifest", "bad_manifest_json", "manifest_schema_violation", "hostile_manifest_sku"}
)
#: ``expected_bad`` key used for the batch-level ``empty_batch`` fault (not a file).
EMPTY_BATCH_KEY = f"{IMAGES_DIR}/"
#: Side of the decompression-bomb PNG: 400 Mpx, more than twice PIL's default limit (~89 Mpx).
BOMB_SIDE = 20_000
PNG_SHARE = 0.12


# --------------------------------------------------------------------------------------------
# SKU catalogue
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkuSpec:
    """One product as the manifest lists it. Frozen so it can key the per-process sprite cache."""

    sku_id: str
    name: str
    brand: str
    category: str


# Few brands for many SKUs on purpose: brand text and logo are shared, so they cannot be the
# only cue that tells two SKUs apart.
_BRANDS = (
    "Nordvik", "Sunpeak", "Brightfield", "Alpenhof", "Kasumi", "Vitalo",
    "Oakridge", "Lumen", "Puro", "Zestra", "Marlow", "Tidewell",
)  # fmt: skip
_VARIANTS = (
    "Classic", "Light", "Zero", "Original", "Extra", "Mild",
    "Spicy", "Organic", "Family", "Mini", "Fresh", "Max",
)  # fmt: skip
# category -> (products, pack sizes, packaging shape weights)
_CATEGORIES: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, int]]] = {
    "beverages": (
        ("Cola", "Lemonade", "Iced Tea", "Sparkling Water", "Orange Juice", "Energy Drink"),
        ("330ml", "500ml", "1L", "1.5L"),
        {"can": 3, "bottle": 4, "box": 1},
    ),
    "snacks": (
        ("Crisps", "Pretzels", "Popcorn", "Tortilla Chips", "Rice Cakes", "Nut Mix"),
        ("40g", "150g", "200g"),
        {"pouch": 5, "box": 2, "can": 1},
    ),
    "dairy": (
        ("Whole Milk", "Yogurt", "Butter", "Cream Cheese", "Kefir"),
        ("250g", "500ml", "1L"),
        {"bottle": 2, "box": 3, "can": 1},
    ),
    "bakery": (
        ("Crackers", "Oat Biscuits", "Wafers", "Crispbread"),
        ("200g", "250g", "400g"),
        {"box": 4, "pouch": 3},
    ),
    "confectionery": (
        ("Chocolate Bar", "Gummy Bears", "Mints", "Toffee", "Caramel Bites"),
        ("45g", "100g", "200g"),
        {"pouch": 3, "box": 3, "can": 1},
    ),
    "household": (
        ("Dish Soap", "Laundry Pods", "Surface Spray", "Sponges"),
        ("500ml", "750ml", "1L"),
        {"bottle": 4, "box": 3, "pouch": 1},
    ),
    "personal_care": (
        ("Shampoo", "Shower Gel", "Toothpaste", "Hand Soap", "Deodorant"),
        ("200ml", "250ml", "400ml"),
        {"bottle": 4, "box": 2, "can": 1},
    ),
    "canned_goods": (
        ("Chopped Tomatoes", "Chickpeas", "Sweetcorn", "Tuna", "Soup"),
        ("160g", "300g", "400g"),
        {"can": 6, "box": 1},
    ),
}
_SHAPES = ("box", "can", "bottle", "pouch")


def make_skus(count: int, start: int = 0, prefix: str = "SKU") -> list[SkuSpec]:
    """SKUs ``<prefix>-<n:06d>`` for ``n`` in ``[start, start + count)``.

    Stable: name, brand and category come from ``sha256`` of the id, so SKU number ``n``
    always gives the same spec whatever ``count`` and ``start`` are.
    """
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0, got count={count}, start={start}")
    categories = sorted(_CATEGORIES)
    skus = []
    for n in range(start, start + count):
        sku_id = check_id("sku_id", f"{prefix}-{n:06d}")
        h = hashlib.sha256(f"sku|{sku_id}".encode()).digest()
        brand = _BRANDS[h[0] % len(_BRANDS)]
        category = categories[h[1] % len(categories)]
        products, sizes, _ = _CATEGORIES[category]
        name = f"{brand} {products[h[2] % len(products)]} {_VARIANTS[h[3] % len(_VARIANTS)]} {sizes[h[4] % len(sizes)]}"
        skus.append(SkuSpec(sku_id=sku_id, name=name, brand=brand, category=category))
    return skus


# --------------------------------------------------------------------------------------------
# Deterministic randomness
# --------------------------------------------------------------------------------------------


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded from the parts; hashlib, never ``hash()`` (salted per process)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


# --------------------------------------------------------------------------------------------
# Product design and sprite (once per SKU and process)
# --------------------------------------------------------------------------------------------

# Deliberately few main colours so several SKUs share one (a colour histogram is not enough).
_PALETTE = (
    (200, 30, 35), (120, 20, 30), (235, 120, 20), (240, 200, 40), (60, 150, 60),
    (20, 80, 45), (20, 140, 140), (30, 90, 190), (20, 35, 90), (110, 50, 140),
    (235, 235, 228), (30, 30, 32), (110, 70, 40), (230, 110, 160),
)  # fmt: skip
_PATTERNS = ("plain", "stripes_h", "stripes_diag", "dots", "waves", "split", "chevron")
_LOGOS = ("circle", "star", "diamond", "triangle", "hexagon", "shield")


@dataclass(frozen=True)
class _Design:
    shape: str
    aspect: float
    main: tuple[int, int, int]
    accent: tuple[int, int, int]
    band: tuple[int, int, int]
    band_pos: float
    band_h: float
    pattern: str
    pattern_scale: float
    logo: str
    logo_colour: tuple[int, int, int]
    cap: tuple[int, int, int]


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _luma(c: tuple[int, int, int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _ink(background: tuple[int, int, int]) -> tuple[int, int, int]:
    return (20, 20, 20) if _luma(background) > 140 else (250, 250, 245)


def _design(spec: SkuSpec) -> _Design:
    """The packaging of ``spec``: from ``sha256(sku_id)``, with brand cues from the brand."""
    rng = _rng("design", spec.sku_id)
    brand_rng = _rng("brand", spec.brand)
    weights = _CATEGORIES.get(spec.category, (None, None, dict.fromkeys(_SHAPES, 1)))[2]
    shapes = list(weights)
    p = np.array([weights[s] for s in shapes], dtype=float)
    shape = shapes[int(rng.choice(len(shapes), p=p / p.sum()))]
    aspect = {
        "box": rng.uniform(1.1, 1.4) if rng.random() < 0.25 else rng.uniform(0.6, 0.95),
        "can": rng.uniform(0.52, 0.64),
        "bottle": rng.uniform(0.36, 0.46),
        "pouch": rng.uniform(0.68, 0.85),
    }[shape]
    main_i = int(rng.integers(len(_PALETTE)))
    accent_i = (main_i + int(rng.integers(2, len(_PALETTE) - 1))) % len(_PALETTE)
    main = _jitter(rng, _PALETTE[main_i], 12)
    accent = _jitter(rng, _PALETTE[accent_i], 12)
    band = _pick(rng, ((245, 242, 232), (250, 250, 250), accent, (25, 25, 25), (212, 175, 55)))
    band_range = {"box": (0.3, 0.7), "can": (0.35, 0.65), "bottle": (0.55, 0.75), "pouch": (0.4, 0.7)}[shape]
    return _Design(
        shape=shape,
        aspect=float(aspect),
        main=main,
        accent=accent,
        band=band,
        band_pos=float(rng.uniform(*band_range)),
        band_h=float(rng.uniform(0.16, 0.3)),
        pattern=_pick(rng, _PATTERNS),
        pattern_scale=float(rng.uniform(0.6, 1.4)),
        logo=_pick(brand_rng, _LOGOS),
        logo_colour=_jitter(brand_rng, _pick(brand_rng, _PALETTE), 8),
        cap=_pick(rng, ((20, 20, 20), (240, 240, 240), accent, (200, 30, 35))),
    )


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, size))


def _silhouette(draw: ImageDraw.ImageDraw, shape: str, w: int, h: int) -> None:
    """Fill the packaging outline with 255 on an ``L`` mask."""
    if shape == "box":
        draw.rounded_rectangle((0, 0, w - 1, h - 1), radius=max(1, int(0.03 * w)), fill=255)
    elif shape == "can":
        lid = int(0.05 * h)
        draw.rectangle((0, lid, w - 1, h - 1 - lid), fill=255)
        draw.ellipse((0, 0, w - 1, 2 * lid), fill=255)
        draw.ellipse((0, h - 1 - 2 * lid, w - 1, h - 1), fill=255)
    elif shape == "bottle":
        draw.rectangle((int(0.34 * w), 0, int(0.66 * w), int(0.09 * h)), fill=255)  # cap
        draw.rectangle((int(0.37 * w), int(0.09 * h), int(0.63 * w), int(0.2 * h)), fill=255)  # neck
        draw.polygon(
            [
                (int(0.37 * w), int(0.2 * h)),
                (int(0.63 * w), int(0.2 * h)),
                (w - 1, int(0.34 * h)),
                (0, int(0.34 * h)),
            ],
            fill=255,
        )
        draw.rounded_rectangle((0, int(0.32 * h), w - 1, h - 1), radius=max(1, int(0.12 * w)), fill=255)
    else:  # pouch: narrower crimped top, bulging body
        top = int(0.1 * h)
        pts = [(int(0.06 * w), 0), (int(0.94 * w), 0), (int(0.94 * w), top)]
        for i in range(9):
            t = i / 8
            bulge = 0.06 * math.sin(math.pi * t)
            pts.append((int((0.94 + bulge) * w) if i else int(0.94 * w), top + int(t * (h - 1 - top))))
        pts += [(int(0.03 * w), h - 1)]
        for i in range(8, -1, -1):
            t = i / 8
            bulge = 0.06 * math.sin(math.pi * t)
            pts.append((int((0.06 - bulge) * w), top + int(t * (h - 1 - top))))
        draw.polygon(pts, fill=255)


def _pattern(draw: ImageDraw.ImageDraw, d: _Design, w: int, h: int) -> None:
    step = max(4, int(0.12 * h * d.pattern_scale))
    col = d.accent
    if d.pattern == "stripes_h":
        for y in range(0, h, 2 * step):
            draw.rectangle((0, y, w, y + step // 2), fill=col)
    elif d.pattern == "stripes_diag":
        for x in range(-h, w + h, 2 * step):
            draw.line((x, 0, x + h, h), fill=col, width=max(2, step // 2))
    elif d.pattern == "dots":
        r = max(2, step // 4)
        for y in range(step // 2, h, step):
            for x in range(step // 2 + (y // step % 2) * step // 2, w, step):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=col)
    elif d.pattern == "waves":
        for y0 in range(0, h, 2 * step):
            pts = [
                (x, y0 + int(step * 0.4 * math.sin(x / max(1, w) * 4 * math.pi))) for x in range(0, w + 4, 4)
            ]
            draw.line(pts, fill=col, width=max(2, step // 3))
    elif d.pattern == "split":
        draw.polygon([(0, int(0.75 * h)), (w, int(0.45 * h)), (w, h), (0, h)], fill=col)
    elif d.pattern == "chevron":
        for y0 in range(0, h + w, 2 * step):
            draw.line([(0, y0), (w // 2, y0 - w // 3), (w, y0)], fill=col, width=max(2, step // 2))


def _logo(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour, outline) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=outline, width=max(1, int(r / 6)))
        return
    n, inner = {
        "star": (5, 0.45),
        "diamond": (4, 1.0),
        "triangle": (3, 1.0),
        "hexagon": (6, 1.0),
        "shield": (5, 1.0),
    }[kind]
    pts = []
    for i in range(n * (2 if kind == "star" else 1)):
        if kind == "star":
            a = -math.pi / 2 + i * math.pi / n
            rr = r if i % 2 == 0 else r * inner
        else:
            a = -math.pi / 2 + i * 2 * math.pi / n
            rr = r * (1.25 if kind == "shield" and i in (2, 3) else 1.0)
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    draw.polygon(pts, fill=colour, outline=outline, width=max(1, int(r / 6)))


def _fit_text(draw: ImageDraw.ImageDraw, text: str, max_w: float, max_h: float):
    size = max(6, int(max_h))
    font = _font(size)
    length = draw.textlength(text, font=font)
    if length > max_w:
        font = _font(int(size * max_w / length))
    return font


@lru_cache(maxsize=512)
def _sprite(spec: SkuSpec, height: int) -> Image.Image:
    """The product cut out on a transparent background (RGBA), ``height`` pixels tall."""
    d = _design(spec)
    h = height
    w = max(8, int(round(h * d.aspect)))
    mask = Image.new("L", (w, h), 0)
    _silhouette(ImageDraw.Draw(mask), d.shape, w, h)

    img = Image.new("RGB", (w, h), d.main)
    draw = ImageDraw.Draw(img)
    _pattern(draw, d, w, h)

    # Label band with the brand name and logo: shared within a brand, on purpose.
    by0 = int((d.band_pos - d.band_h / 2) * h)
    by1 = int((d.band_pos + d.band_h / 2) * h)
    draw.rectangle((0, by0, w, by1), fill=d.band)
    bh = by1 - by0
    logo_r = min(0.16 * w, 0.09 * h)
    logo_y = by0 - logo_r * 1.3 if by0 - 2.6 * logo_r > 0.1 * h else by1 + logo_r * 1.3
    _logo(draw, d.logo, w / 2, logo_y, logo_r, d.logo_colour, _ink(d.logo_colour))
    font = _fit_text(draw, spec.brand, 0.86 * w, 0.55 * bh)
    draw.text((w / 2, by0 + bh * 0.42), spec.brand, font=font, fill=_ink(d.band), anchor="mm")
    small = spec.name.split()[-2:] if len(spec.name.split()) > 2 else spec.name.split()
    sub = " ".join(small)
    font2 = _fit_text(draw, sub, 0.8 * w, 0.22 * bh)
    draw.text((w / 2, by0 + bh * 0.82), sub, font=font2, fill=_ink(d.band), anchor="mm")

    # Shape details drawn over the body.
    if d.shape == "can":
        lid = int(0.05 * h)
        draw.ellipse((0, 0, w - 1, 2 * lid), fill=(190, 192, 196), outline=(120, 122, 126))
        draw.ellipse(
            (int(0.3 * w), int(0.4 * lid), int(0.7 * w), int(1.6 * lid)), outline=(110, 110, 115), width=2
        )
        draw.rectangle((0, h - 1 - 2 * lid, w - 1, h - 1 - lid), fill=(170, 172, 176))
    elif d.shape == "bottle":
        draw.rectangle((int(0.34 * w), 0, int(0.66 * w), int(0.09 * h)), fill=d.cap)
        ridge = tuple(max(0, c - 40) for c in d.cap)
        for y in range(2, int(0.09 * h), 4):  # grip ridges on the cap
            draw.line((int(0.34 * w), y, int(0.66 * w), y), fill=ridge, width=1)
    elif d.shape == "pouch":
        top = int(0.1 * h)
        draw.rectangle((0, 0, w, top), fill=tuple(min(255, c + 40) for c in d.main))
        for x in range(0, w, 6):
            draw.line((x, 0, x, top), fill=tuple(max(0, c - 30) for c in d.main), width=1)

    # Shading gives volume: cylinders darken to the sides with a highlight, boxes get a
    # darker side face, pouches soft wrinkles.
    arr = np.asarray(img, dtype=np.float32)
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)
    if d.shape in ("can", "bottle"):
        prof = 0.55 + 0.5 * np.sin(np.pi * x) + 0.35 * np.exp(-(((x - 0.3) / 0.06) ** 2))
    elif d.shape == "box":
        prof = np.where(x > 0.86, 0.72, 1.0) + 0.08 * (1 - x)
    else:
        prof = 0.9 + 0.1 * np.sin(x * 5 * np.pi + 1.0) + 0.1 * np.sin(np.pi * x)
    arr = np.clip(arr * prof[None, :, None], 0, 255).astype(np.uint8)
    out = Image.fromarray(arr, "RGB").convert("RGBA")
    out.putalpha(mask)
    return out


# --------------------------------------------------------------------------------------------
# One photograph
# --------------------------------------------------------------------------------------------

_SURFACES = (
    (60, 62, 66),
    (140, 142, 146),
    (30, 30, 30),
    (200, 200, 196),
    (120, 90, 60),
    (70, 80, 95),
    (180, 170, 150),
)
_SHADOW_LUT = [int(v * 0.45) for v in range(256)]
_SKIN = ((241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 60, 40), (255, 219, 172))


@lru_cache(maxsize=8)
def _noise_tile(side: int) -> np.ndarray:
    # One fixed tile per process, cropped at a random offset per image: far cheaper than
    # drawing fresh gaussian noise, and identical in every worker (fixed seed).
    return np.random.default_rng(0x5EED).standard_normal((2 * side, 2 * side, 3), dtype=np.float32)


def _smooth(rng: np.random.Generator, size: int, cells: int, lo: int, hi: int, base=None) -> Image.Image:
    """A smooth random field: a tiny random image upscaled (cheap blotches / gradients)."""
    grid = rng.integers(lo, hi, (cells, cells, 3))
    if base is not None:
        grid = np.clip(grid + np.asarray(base)[None, None, :], 0, 255)
    small = Image.fromarray(grid.astype(np.uint8), "RGB")
    return small.resize((size, size), Image.Resampling.BICUBIC if cells > 2 else Image.Resampling.BILINEAR)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    kind = int(rng.integers(4))
    if kind == 0:  # till surface with mottling
        bg = _smooth(rng, size, int(rng.integers(3, 7)), -25, 26, base=_pick(rng, _SURFACES))
    elif kind == 1:  # light gradient across the scanner area
        bg = _smooth(rng, size, 2, 20, 236)
    elif kind == 2:  # conveyor belt: dark with parallel ribs
        bg = Image.new("RGB", (size, size), _jitter(rng, (35, 35, 38), 15))
        draw = ImageDraw.Draw(bg)
        step = int(rng.integers(8, 24))
        rib = _jitter(rng, (60, 60, 64), 15)
        for y in range(int(rng.integers(step)), size, step):
            draw.line((0, y, size, y), fill=rib, width=max(1, step // 4))
        if rng.random() < 0.5:
            bg = bg.rotate(float(rng.uniform(-90, 90)), resample=Image.Resampling.NEAREST, fillcolor=rib)
    else:  # busy surroundings (bags, other shopping), muted: real scenes are rarely neon
        bg = _smooth(rng, size, int(rng.integers(3, 6)), -70, 71, base=_jitter(rng, (128, 124, 118), 30))
    draw = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(0, 5))):
        what = int(rng.integers(4))
        cx, cy = rng.uniform(0, size, 2)
        if what == 0:  # receipt: rotated pale rectangle with print lines
            a = rng.uniform(0, math.pi)
            rw, rh = size * rng.uniform(0.1, 0.22), size * rng.uniform(0.25, 0.5)
            c, s = math.cos(a), math.sin(a)
            corners = [(cx + dx * c - dy * s, cy + dx * s + dy * c) for dx, dy in
                       ((-rw, -rh), (rw, -rh), (rw, rh), (-rw, rh))]  # fmt: skip
            draw.polygon(corners, fill=_jitter(rng, (238, 236, 228), 10))
            for k in range(1, 8):
                t = -rh + k * 2 * rh / 8
                draw.line([(cx - 0.7 * rw * c - t * s, cy - 0.7 * rw * s + t * c),
                           (cx + 0.5 * rw * c - t * s, cy + 0.5 * rw * s + t * c)], fill=(150, 150, 150), width=1)  # fmt: skip
        elif what == 1:  # coin
            r = size * rng.uniform(0.03, 0.06)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_pick(rng, ((200, 170, 60), (180, 180, 185))),
                         outline=(90, 90, 90))  # fmt: skip
        elif what == 2:  # scanner window with its red laser line
            rw, rh = size * rng.uniform(0.15, 0.35), size * rng.uniform(0.1, 0.2)
            draw.rectangle((cx - rw, cy - rh, cx + rw, cy + rh), fill=(15, 18, 22))
            draw.line((cx - rw, cy, cx + rw, cy), fill=(230, 20, 20), width=2)
        else:  # edge of a carrier bag
            pts = [tuple(rng.uniform(-0.2, 1.2, 2) * size) for _ in range(4)]
            draw.polygon(
                pts, fill=_jitter(rng, _pick(rng, ((240, 240, 240), (90, 160, 90), (220, 200, 120))), 15)
            )
    return bg


def _hand(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, box) -> None:
    """A hand-like blob (palm + fingers) reaching onto the product from one side."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a = rng.uniform(0, 2 * math.pi)
    reach = 0.5 * max(x1 - x0, y1 - y0) * rng.uniform(0.7, 1.2)
    px, py = cx + math.cos(a) * reach, cy + math.sin(a) * reach
    skin = _jitter(rng, _pick(rng, _SKIN), 12)
    r = size * rng.uniform(0.09, 0.13)
    inward = a + math.pi
    ux, uy = math.cos(inward), math.sin(inward)  # towards the product
    vx, vy = -uy, ux  # across the palm
    # Palm: a fat stroke across the reach direction, so it reads as a hand, not a ball.
    draw.line(
        (px - vx * r * 0.5, py - vy * r * 0.5, px + vx * r * 0.5, py + vy * r * 0.5),
        fill=skin,
        width=int(2 * r),
    )
    draw.ellipse((px - r, py - r, px + r, py + r), fill=skin)
    fw = max(3, int(r * 0.42))
    # Four roughly parallel fingers from the palm edge nearest the product, then a thumb.
    for k, off in enumerate((-0.75, -0.25, 0.25, 0.75)):
        bend = rng.uniform(-0.12, 0.12)
        fx, fy = math.cos(inward + bend), math.sin(inward + bend)
        sx, sy = px + ux * r * 0.6 + vx * off * r, py + uy * r * 0.6 + vy * off * r
        length = r * rng.uniform(1.0, 1.5) * (0.8 if k in (0, 3) else 1.0)
        ex, ey = sx + fx * length, sy + fy * length
        draw.line((sx, sy, ex, ey), fill=skin, width=fw)
        draw.ellipse((ex - fw / 2, ey - fw / 2, ex + fw / 2, ey + fw / 2), fill=skin)
    side = _pick(rng, (-1.0, 1.0))
    ta = inward + side * rng.uniform(0.9, 1.3)
    sx, sy = px + vx * side * r * 0.8, py + vy * side * r * 0.8
    ex, ey = sx + math.cos(ta) * r * 0.9, sy + math.sin(ta) * r * 0.9
    draw.line((sx, sy, ex, ey), fill=skin, width=int(fw * 1.2))
    draw.ellipse((ex - fw * 0.6, ey - fw * 0.6, ex + fw * 0.6, ey + fw * 0.6), fill=skin)
    # Knuckle creases: a little darker skin so fingers separate at low resolution.
    crease = tuple(max(0, c - 45) for c in skin)
    for off in (-0.5, 0.0, 0.5):
        sx, sy = px + ux * r * 0.55 + vx * off * r, py + uy * r * 0.55 + vy * off * r
        draw.line((sx, sy, sx + ux * r * 0.5, sy + uy * r * 0.5), fill=crease, width=1)


def _other_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, box) -> None:
    """Part of another item overlapping a corner of the product."""
    x0, y0, x1, y1 = box
    cx, cy = rng.uniform(x0, x1), _pick(rng, (y0, y1))
    a = rng.uniform(0, math.pi)
    rw, rh = size * rng.uniform(0.1, 0.2), size * rng.uniform(0.15, 0.3)
    c, s = math.cos(a), math.sin(a)
    corners = [
        (cx + dx * c - dy * s, cy + dx * s + dy * c)
        for dx, dy in ((-rw, -rh), (rw, -rh), (rw, rh), (-rw, rh))
    ]
    colour = _jitter(rng, _pick(rng, _PALETTE), 20)
    draw.polygon(corners, fill=colour)
    draw.line([corners[0], corners[1]], fill=_ink(colour), width=max(2, int(size * 0.02)))


def _scale_rotate(sprite: Image.Image, k: float, angle: float) -> Image.Image:
    """Scale by ``k`` and rotate by ``angle`` degrees in one affine pass (expanded canvas).

    One resampling instead of resize + rotate halves the cost; ``k`` stays above ~0.6, where
    bilinear without a pre-filter does not visibly alias.
    """
    w, h = sprite.size
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    ow = max(4, math.ceil(k * (abs(w * c) + abs(h * s))))
    oh = max(4, math.ceil(k * (abs(w * s) + abs(h * c))))
    # PIL wants the inverse map: output pixel -> source pixel.
    ia, ib, id_, ie = c / k, s / k, -s / k, c / k
    ocx, ocy = ow / 2, oh / 2
    matrix = (ia, ib, w / 2 - ia * ocx - ib * ocy, id_, ie, h / 2 - id_ * ocx - ie * ocy)
    return sprite.transform((ow, oh), Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR)


def _render(spec: SkuSpec, size: int, rng: np.random.Generator) -> Image.Image:
    """Compose one photograph of ``spec`` (RGB, ``size`` x ``size``)."""
    bg = _background(rng, size)
    sprite = _sprite(spec, max(32, int(size * 0.95)))

    # Scale, rotation (mostly upright, sometimes lying any way round) and position.
    frac = rng.uniform(0.6, 0.95)
    k = frac * size / max(sprite.size)
    angle = rng.uniform(-30, 30) if rng.random() < 0.8 else rng.uniform(-180, 180)
    prod = _scale_rotate(sprite, k, angle)
    cx = size / 2 + rng.uniform(-0.12, 0.12) * size
    cy = size / 2 + rng.uniform(-0.12, 0.12) * size
    ox, oy = int(cx - prod.width / 2), int(cy - prod.height / 2)
    alpha = prod.getchannel("A")

    # Drop shadow: the alpha mask, softened and offset, darkening the surface.
    if rng.random() < 0.7:
        shadow = alpha.point(_SHADOW_LUT).filter(ImageFilter.BoxBlur(2))
        sx, sy = (int(v) for v in rng.integers(2, max(3, size // 32) + 1, 2))
        bg.paste((0, 0, 0), (ox + sx, oy + sy), shadow)
    bg.paste(prod, (ox, oy), alpha)

    draw = ImageDraw.Draw(bg)
    box = (ox, oy, ox + prod.width, oy + prod.height)
    occ = rng.random()
    if occ < 0.22:
        _hand(draw, rng, size, box)
    elif occ < 0.35:
        _other_object(draw, rng, size, box)

    # Lighting as one per-channel lookup table: contrast, brightness and a colour cast.
    contrast = rng.uniform(0.7, 1.25)
    bright = rng.uniform(-40, 35)
    cast = rng.uniform(0.86, 1.14, 3)
    ramp = np.arange(256, dtype=np.float32)
    lut = np.clip(((ramp - 128) * contrast + 128 + bright)[None, :] * cast[:, None], 0, 255)
    img = bg.point(lut.astype(np.uint8).ravel().tolist())

    if rng.random() < 0.5:  # uneven illumination (a lamp off to one side)
        light = _smooth(rng, size, 3, 150, 256)
        img = ImageChops.multiply(img, light.convert("L").convert("RGB"))
    if rng.random() < 0.3:
        # Box blur with a fractional radius: looks like slight defocus, ~8x cheaper than gaussian.
        img = img.filter(ImageFilter.BoxBlur(float(rng.uniform(0.4, 1.2))))
    if rng.random() < 0.7:
        tile = _noise_tile(size)
        oy2, ox2 = (int(v) for v in rng.integers(0, size, 2))
        sigma = rng.uniform(2, 9)
        noisy = np.asarray(img, dtype=np.float32) + tile[oy2 : oy2 + size, ox2 : ox2 + size] * sigma
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    return img


def _encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """Deterministic encoding: explicit quality, no EXIF, no PNG text/time chunks."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=int(quality), optimize=False, progressive=False)
    elif fmt == "png":
        # Level 1: noisy photos barely compress anyway, and level 6 is ~5x slower.
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, fmt.upper())
    return buf.getvalue()


def render_image(spec: SkuSpec, index: int, *, seed: int = 0, image_size: int = 256) -> tuple[str, bytes]:
    """Image ``index`` of ``spec``: ``(extension, bytes)``; mostly JPEG, ~12% PNG."""
    rng = _rng("image", seed, spec.sku_id, index)
    img = _render(spec, image_size, rng)
    if rng.random() < PNG_SHARE:
        return "png", _encode(img, "png")
    return "jpg", _encode(img, "jpeg", int(rng.integers(60, 96)))


def _render_sku(args: tuple[SkuSpec, int, int, int]) -> list[tuple[str, bytes]]:
    spec, count, seed, size = args
    out = []
    for i in range(count):
        ext, data = render_image(spec, i, seed=seed, image_size=size)
        out.append((f"{IMAGES_DIR}/{spec.sku_id}/img_{i:04d}.{ext}", data))
    return out


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class GeneratedBatch:
    """A batch in memory, ready for :func:`upload_batch` or :func:`write_batch_to_dir`.

    ``files`` keys are relative to the batch folder (``images/<sku_id>/<file>``) and exclude
    ``manifest.json``, whose exact bytes are ``manifest_bytes`` (``None``: no manifest file).
    ``expected_bad`` maps a relative key (or ``manifest.json``, ``_SUCCESS``, ``images/`` for
    batch-level faults) to the fault kind.
    """

    batch_id: str
    files: dict[str, bytes]
    manifest: dict | None
    manifest_bytes: bytes | None
    expected_bad: dict[str, str] = field(default_factory=dict)
    write_success: bool = True
    #: For ``duplicate_across_skus``: copy key -> the good original it duplicates.
    duplicate_of: dict[str, str] = field(default_factory=dict)

    @property
    def good_keys(self) -> list[str]:
        """Image keys that are not injected faults (what the intake should register)."""
        return [k for k in self.files if k not in self.expected_bad]

    @property
    def rejected_keys(self) -> list[str]:
        """Image keys the intake must quarantine (injected, minus kinds accepted by content)."""
        return [
            k for k, kind in self.expected_bad.items() if k in self.files and kind not in ACCEPTED_BY_CONTENT
        ]

    def objects(self) -> list[tuple[str, bytes]]:
        """Everything to write before the marker: images, then ``manifest.json``."""
        items = list(self.files.items())
        if self.manifest_bytes is not None:
            items.append((MANIFEST_NAME, self.manifest_bytes))
        return items


def _dump_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _created_at(value: datetime | None) -> str:
    if value is None:
        value = datetime.now(UTC).replace(microsecond=0)
    if value.tzinfo is None:
        raise ValueError("created_at must be timezone-aware (UTC)")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _normalise_inject(inject: str | Iterable[str]) -> list[str]:
    kinds = (
        [k.strip() for k in inject.split(",")]
        if isinstance(inject, str)
        else [str(k).strip() for k in inject]
    )
    kinds = [k for k in kinds if k]
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}")
    chosen = set(kinds)
    manifest_faults = sorted(chosen & _MANIFEST_FAULTS)
    if len(manifest_faults) > 1:
        raise ValueError(f"at most one manifest fault at a time, got {manifest_faults}")
    if "empty_batch" in chosen and chosen & set(IMAGE_FAULTS):
        raise ValueError(
            "empty_batch cannot be combined with image-level faults (the batch would not be empty)"
        )
    # Canonical order, so the injected file names do not depend on the order given.
    return [k for k in FAULT_KINDS if k in chosen]


class _Injector:
    """Adds fault files to a batch; each kind has its own RNG stream, so kinds are independent."""

    def __init__(self, batch: GeneratedBatch, skus: list[SkuSpec], images_per_sku: int, seed: int, size: int):
        self.batch, self.skus, self.seed, self.size = batch, skus, seed, size
        self._next: dict[str, int] = {}
        self._base = images_per_sku

    def rng(self, kind: str) -> np.random.Generator:
        return _rng("fault", self.seed, kind)

    def key(self, folder: str, ext: str) -> str:
        # Continue the SKU's numbering so fault files are not recognisable by name.
        n = self._next.get(folder, self._base)
        self._next[folder] = n + 1
        return f"{IMAGES_DIR}/{folder}/img_{n:04d}.{ext}"

    def photo(self, spec: SkuSpec, kind: str, n: int = 0) -> Image.Image:
        # Fresh pictures (own seed domain), so they never duplicate a good image by accident.
        return _render(spec, self.size, _rng("fault-image", self.seed, kind, spec.sku_id, n))

    def add(self, key: str, data: bytes, kind: str) -> None:
        self.batch.files[key] = data
        self.batch.expected_bad[key] = kind

    # -- image level ------------------------------------------------------------------------

    def corrupt_jpeg(self, kind: str) -> None:
        rng = self.rng(kind)
        spec = _pick(rng, self.skus)
        # SOI + a well-formed JFIF APP0, then noise where the next marker should be: the file
        # "looks like" a JPEG (magic bytes, extension) but no decoder can read it.
        header = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        garbage = bytearray(rng.integers(0, 256, int(rng.integers(2000, 8000)), dtype=np.uint8).tobytes())
        garbage[0] = 0x42  # not 0xFF: guarantees "no marker found" whatever the seed
        self.add(self.key(spec.sku_id, "jpg"), header + bytes(garbage), kind)

    def truncated_jpeg(self, kind: str) -> None:
        spec = _pick(self.rng(kind), self.skus)
        data = _encode(self.photo(spec, kind), "jpeg", 90)
        self.add(self.key(spec.sku_id, "jpg"), data[: int(len(data) * 0.4)], kind)

    def zero_byte(self, kind: str) -> None:
        spec = _pick(self.rng(kind), self.skus)
        self.add(self.key(spec.sku_id, "jpg"), b"", kind)

    def non_image(self, kind: str) -> None:
        spec = _pick(self.rng(kind), self.skus)
        html = (
            "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
            f"<body><h1>Not Found</h1><p>The requested image {spec.sku_id} was not found.</p></body></html>\n"
        )
        self.add(self.key(spec.sku_id, "jpg"), html.encode(), kind)

    def wrong_extension(self, kind: str) -> None:
        rng = self.rng(kind)
        spec = _pick(rng, self.skus)
        img = self.photo(spec, kind)
        self.add(
            self.key(spec.sku_id, "gif"), _encode(img.convert("P", palette=Image.Palette.WEB), "gif"), kind
        )
        self.add(self.key(spec.sku_id, "bmp"), _encode(img, "bmp"), kind)
        self.add(
            self.key(spec.sku_id, "txt"), f"notes for {spec.sku_id}: reshoot the front label\n".encode(), kind
        )

    def png_as_jpg(self, kind: str) -> None:
        spec = _pick(self.rng(kind), self.skus)
        self.add(self.key(spec.sku_id, "jpg"), _encode(self.photo(spec, kind), "png"), kind)

    def duplicate_across_skus(self, kind: str) -> None:
        if len(self.skus) < 2:
            raise ValueError("duplicate_across_skus needs at least 2 SKUs")
        rng = self.rng(kind)
        a, b = (self.skus[int(i)] for i in rng.choice(len(self.skus), 2, replace=False))
        # Only good images: earlier faults may already have added files under A.
        originals = [
            k
            for k in self.batch.files
            if k.startswith(f"{IMAGES_DIR}/{a.sku_id}/") and k not in self.batch.expected_bad
        ]
        original = _pick(rng, originals)
        copy_key = self.key(b.sku_id, original.rsplit(".", 1)[1])
        self.add(copy_key, self.batch.files[original], kind)
        self.batch.duplicate_of[copy_key] = original

    def hostile_path(self, kind: str) -> None:
        spec = self.skus[0]
        ids = {s.sku_id for s in self.skus}
        unlisted = "SKU-UNLISTED"
        while unlisted in ids:
            unlisted += "-X"
        # Fullwidth letters NFKC-normalise to a real SKU id: a normalisation collision.
        fullwidth = "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalpha() else c for c in spec.sku_id)
        for n, folder in enumerate(("..", "bad sku", "SKU\u2215evil", fullwidth, unlisted)):
            data = _encode(self.photo(spec, kind, n), "jpeg", 85)
            self.add(f"{IMAGES_DIR}/{folder}/img_{n:04d}.jpg", data, kind)

    def decompression_bomb(self, kind: str) -> None:
        spec = _pick(self.rng(kind), self.skus)
        self.add(self.key(spec.sku_id, "png"), bomb_png(), kind)

    def exif_rotated(self, kind: str) -> None:
        # A phone photo: the pixels stored sideways, an EXIF tag saying how to show them.
        # Accepted; every decode must apply the tag (upright_photo() is what they must see).
        spec = _pick(self.rng(kind), self.skus)
        upright = self.photo(spec, kind)
        stored = upright.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = EXIF_ROTATE_CW
        buf = io.BytesIO()
        stored.save(buf, "JPEG", quality=90, exif=exif.tobytes())
        self.add(self.key(spec.sku_id, "jpg"), buf.getvalue(), kind)

    def cmyk_jpeg(self, kind: str) -> None:
        # Print-workflow exports: a valid JPEG in CMYK, accepted and converted to RGB.
        spec = _pick(self.rng(kind), self.skus)
        buf = io.BytesIO()
        self.photo(spec, kind).convert("CMYK").save(buf, "JPEG", quality=90)
        self.add(self.key(spec.sku_id, "jpg"), buf.getvalue(), kind)

    def sixteen_bit_png(self, kind: str) -> None:
        # 16-bit greyscale (a scanner's default): no faithful 8-bit RGB conversion, refused.
        spec = _pick(self.rng(kind), self.skus)
        grey = np.asarray(self.photo(spec, kind).convert("L"), dtype=np.uint16) * 257
        buf = io.BytesIO()
        Image.fromarray(grey).save(buf, "PNG")  # uint16 -> mode I;16
        self.add(self.key(spec.sku_id, "png"), buf.getvalue(), kind)

    def tiny_image(self, kind: str) -> None:
        spec = _pick(self.rng(kind), self.skus)
        small = self.photo(spec, kind).resize((TINY_SIDE, TINY_SIDE))
        self.add(self.key(spec.sku_id, "jpg"), _encode(small, "jpeg", 90), kind)

    def hostile_file_names(self, kind: str) -> None:
        # Good pictures under names that break the file-name contract (they become FSx paths).
        spec = self.skus[0]
        names = (
            "..jpg",  # dot-dot prefix
            "front label.jpg",  # space
            "img_0001\u0430.jpg",  # Cyrillic 'a': a confusable
            "x" * 296 + ".jpg",  # 300 characters
        )
        for n, name in enumerate(names):
            self.add(f"{IMAGES_DIR}/{spec.sku_id}/{name}", _encode(self.photo(spec, kind, n), "jpeg", 85), kind)

    # -- batch level ------------------------------------------------------------------------

    def _manifest(self, kind: str, manifest: dict | None, data: bytes | None) -> None:
        self.batch.manifest, self.batch.manifest_bytes = manifest, data
        self.batch.expected_bad[MANIFEST_NAME] = kind

    def missing_manifest(self, kind: str) -> None:
        self._manifest(kind, None, None)

    def bad_manifest_json(self, kind: str) -> None:
        good = self.batch.manifest_bytes or b""
        self._manifest(kind, None, good[: int(len(good) * 0.6)])  # cut mid-document: not JSON

    def manifest_schema_violation(self, kind: str) -> None:
        m = copy.deepcopy(self.batch.manifest)
        del m["skus"][0]["name"]
        bid = self.batch.batch_id
        m["batch_id"] = (bid if len(bid) <= 60 else bid[:60]) + "-old"
        self._manifest(kind, m, _dump_manifest(m))

    def hostile_manifest_sku(self, kind: str) -> None:
        m = copy.deepcopy(self.batch.manifest)
        m["skus"].append(
            {"sku_id": "../../etc", "name": "Path traversal", "brand": "Evil", "category": "snacks"}
        )
        self._manifest(kind, m, _dump_manifest(m))

    def empty_batch(self, kind: str) -> None:
        self.batch.files.clear()
        self.batch.expected_bad[EMPTY_BATCH_KEY] = kind

    def no_success_marker(self, kind: str) -> None:
        self.batch.write_success = False
        self.batch.expected_bad[SUCCESS_MARKER] = kind


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A 1-bit greyscale PNG of ``side`` x ``side`` that is only ~50 KB on disk.

    Written by hand (chunks + zlib) so building it never allocates the decoded image.
    """
    return _bomb_png(side)


@lru_cache(maxsize=2)
def _bomb_png(side: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
        )

    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def generate_batch(
    batch_id: str,
    skus: Sequence[SkuSpec],
    images_per_sku: int,
    *,
    seed: int = 0,
    image_size: int = 256,
    inject: str | Iterable[str] = (),
    created_at: datetime | None = None,
    workers: int = 1,
) -> GeneratedBatch:
    """Render a batch in memory.

    :param inject: fault kinds (see :data:`FAULT_KINDS`), a list or a comma-separated string.
    :param created_at: aware datetime for the manifest; default now (UTC, whole seconds).
        Image bytes never depend on it.
    :param workers: processes for rendering (``spawn``: safe inside Airflow workers that
        hold threads; a calling *script* needs the ``if __name__ == "__main__":`` guard).
        The bytes are the same for any value.
    :raises ValueError: bad ids, duplicate SKUs, unknown or incompatible fault kinds.
    """
    check_id("batch_id", batch_id)
    skus = list(skus)
    if not skus:
        raise ValueError("at least one SKU is needed")
    for spec in skus:
        check_id("sku_id", spec.sku_id)
    if len({s.sku_id for s in skus}) != len(skus):
        raise ValueError("sku_ids must be unique")
    if images_per_sku < 1:
        raise ValueError(f"images_per_sku must be >= 1, got {images_per_sku} (use inject='empty_batch')")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    kinds = _normalise_inject(inject)

    manifest = {
        "batch_id": batch_id,
        "created_at": _created_at(created_at),
        "skus": [asdict(s) for s in skus],
    }
    files: dict[str, bytes] = {}
    if "empty_batch" not in kinds:
        tasks = [(s, images_per_sku, seed, image_size) for s in skus]
        if workers > 1 and len(skus) > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(skus)), mp_context=ctx) as pool:
                results = list(pool.map(_render_sku, tasks))
        else:
            results = [_render_sku(t) for t in tasks]
        for chunk in results:  # map() keeps task order: same dict order for any worker count
            files.update(chunk)

    batch = GeneratedBatch(
        batch_id=batch_id, files=files, manifest=manifest, manifest_bytes=_dump_manifest(manifest)
    )
    injector = _Injector(batch, skus, images_per_sku, seed, image_size)
    for kind in kinds:
        getattr(injector, kind)(kind)
    return batch


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

_CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".json": "application/json",
}


def _batch_prefix(prefix: str, batch_id: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{batch_id}/" if prefix else f"{batch_id}/"


def upload_batch(
    s3_client, bucket: str, batch: GeneratedBatch, prefix: str = "incoming/", *, max_workers: int = 8
) -> list[str]:
    """Put the images (in parallel), then ``manifest.json``, then ``_SUCCESS`` last.

    Keys are used verbatim, hostile ones included (S3 keys are any UTF-8; nothing here
    normalises them). :return: the full keys written, in completion order.
    """
    base = _batch_prefix(prefix, batch.batch_id)

    def put(rel: str, data: bytes) -> str:
        key = base + rel
        ctype = _CONTENT_TYPES.get(PurePosixPath(rel).suffix.lower(), "application/octet-stream")
        s3_client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=ctype)
        return key

    written: list[str] = []
    images = list(batch.files.items())
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        written.extend(pool.map(lambda kv: put(*kv), images))
    # The pool is joined before these: a reader that sees the marker sees every image.
    if batch.manifest_bytes is not None:
        written.append(put(MANIFEST_NAME, batch.manifest_bytes))
    if batch.write_success:
        written.append(put(SUCCESS_MARKER, b""))
    return written


#: Longest file-name component a local filesystem holds (NAME_MAX on ext4/xfs/Lustre, in
#: bytes); an S3 key may hold longer ones (the ``hostile_file_names`` fault has 300 chars).
NAME_MAX_BYTES = 255


def _unsafe_local(rel: str) -> bool:
    parts = rel.split("/")
    return (rel.startswith("/") or "\\" in rel or "\x00" in rel or any(p in ("", ".", "..") for p in parts)
            or any(len(p.encode("utf-8")) > NAME_MAX_BYTES for p in parts))


def write_batch_to_dir(root: str | os.PathLike, batch: GeneratedBatch) -> list[str]:
    """Write the batch under ``root/<batch_id>/`` (``_SUCCESS`` last).

    Keys that a filesystem cannot hold faithfully (``..`` / ``.`` / empty components, a
    component over 255 bytes) are skipped rather than resolved or truncated, so nothing is ever
    written outside the batch folder and no write fails half-way.
    :return: the skipped relative keys.
    """
    folder = Path(root) / batch.batch_id
    folder.mkdir(parents=True, exist_ok=True)
    resolved_root = folder.resolve()
    skipped: list[str] = []
    for rel, data in batch.objects():
        if _unsafe_local(rel):
            skipped.append(rel)
            log.warning("skipping key %s: not representable on a local filesystem", ascii(rel))
            continue
        path = folder / rel
        if not path.resolve().is_relative_to(resolved_root):  # symlinks planted in root
            skipped.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if batch.write_success:
        (folder / SUCCESS_MARKER).write_bytes(b"")
    return skipped


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sku_dev.synthetic", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--batch-id", required=True)
    p.add_argument("--skus", type=int, default=20, help="number of SKUs (default 20)")
    p.add_argument("--sku-start", type=int, default=0, help="first SKU number (default 0)")
    p.add_argument("--sku-prefix", default="SKU")
    p.add_argument("--images-per-sku", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--inject", default="", help=f"comma-separated fault kinds: {', '.join(FAULT_KINDS)}")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    p.add_argument("--created-at", type=datetime.fromisoformat, default=None, help="ISO-8601 with offset")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--bucket", help="upload to this S3 bucket")
    dest.add_argument("--out-dir", help="write under this local folder instead")
    p.add_argument("--prefix", default="incoming/", help="S3 prefix (default incoming/)")
    p.add_argument("--endpoint-url", default=None, help=f"S3 endpoint (default ${ENDPOINT_ENV}, else AWS)")
    p.add_argument("--create-bucket", action="store_true", help="create the bucket if missing (local stack)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    skus = make_skus(args.skus, start=args.sku_start, prefix=args.sku_prefix)
    batch = generate_batch(
        args.batch_id,
        skus,
        args.images_per_sku,
        seed=args.seed,
        image_size=args.image_size,
        inject=args.inject,
        created_at=args.created_at,
        workers=args.workers,
    )
    t_gen = time.perf_counter() - t0
    if args.bucket:
        import boto3

        endpoint = args.endpoint_url or os.environ.get(ENDPOINT_ENV) or None
        client = boto3.client("s3", endpoint_url=endpoint)
        if args.create_bucket:
            try:
                client.create_bucket(Bucket=args.bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
        upload_batch(client, args.bucket, batch, prefix=args.prefix)
        where = f"s3://{args.bucket}/{_batch_prefix(args.prefix, args.batch_id)}"
        skipped: list[str] = []
    else:
        skipped = write_batch_to_dir(args.out_dir, batch)
        where = str(Path(args.out_dir) / args.batch_id) + "/"
    total = time.perf_counter() - t0
    n_good = len(batch.good_keys)
    print(
        f"wrote {len(batch.files)} image files ({n_good} good, {len(batch.files) - n_good} injected) "
        f"for {len(skus)} SKUs to {where} in {total:.2f}s (rendering {t_gen:.2f}s, "
        f"{n_good / t_gen if t_gen else 0:.0f} img/s); manifest: {'yes' if batch.manifest_bytes is not None else 'no'}, "
        f"_SUCCESS: {'yes' if batch.write_success else 'no'}"
    )
    for rel, kind in batch.expected_bad.items():
        print(f"  bad: {kind:<26} {ascii(rel)}")
    if skipped:
        print(f"  skipped {len(skipped)} key(s) not representable locally: {', '.join(map(ascii, skipped))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
