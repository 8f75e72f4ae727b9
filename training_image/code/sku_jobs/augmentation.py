"""Augmentation job: N deterministic, till-like variants of every train original, on FSx.

Runs inside the training container (SageMaker training-container contract, see ``sm_env``);
never imports Airflow or torch.

Inputs
    channel ``images``     the FSx mount root (read-write); all paths are relative to it.
    channel ``manifests``  a folder with ``augment_inputs.csv`` (``path,sha256,sku_id,output_dir``).
Outputs (in ``SM_OUTPUT_DATA_DIR``, one set per host)
    ``augmentation_manifest-<host>.csv``, ``skipped-<host>.csv``, ``summary-<host>.json``.
Variants
    ``<images>/<output_dir>/<source stem>__v<kk>.jpg`` for k in 1..N, byte-identical on any
    host and run: every random number comes from ``random.Random(sha256(f"{sha}:{k}:{seed}"))``.

Library choice (measured by ``bench/augment_bench.py``, 512x512 q90 JPEGs, variants at
``max_side`` 342, 1 core of a 2-vCPU AMD EPYC VM; figures in bench/README.md): the geometry
(crop + rotation + flip + perspective) is composed into ONE projective map and resampled once
with OpenCV's bilinear ``warpAffine``/``warpPerspective``, the blur is OpenCV's Gaussian, and
white balance + brightness + contrast + saturation are ONE 3x4 colour matrix
(``cv2.transform``), rounded and clipped once. Decoding (JPEG ``draft()``, EXIF orientation)
and encoding stay with Pillow. Rendering a variant this way took ~1.5 ms against ~6.4 ms for
the previous Pillow-only renderer (the same map through ``Image.transform``) and ~17 ms for
torchvision.transforms.v2 functional ops on PIL images with the same parameters, at a higher
PSNR against a single-pass bicubic reference (one resampling and one clipping instead of one
per op). No torch in the workers (a 4-8 s import).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from PIL import Image, ImageOps, ImageStat

from sku_contracts.files import (
    AUGMENT_INPUT_COLUMNS as INPUT_COLUMNS,
)
from sku_contracts.files import (
    AUGMENT_INPUTS_FILE as INPUTS_FILE,
)
from sku_contracts.files import (
    AUGMENTATION_MANIFEST_COLUMNS as MANIFEST_COLUMNS,
)
from sku_contracts.files import (
    AUGMENTATION_MANIFEST_PREFIX,
    AUGMENTATION_SKIPPED_PREFIX,
)
from sku_contracts.files import (
    AUGMENTATION_SKIPPED_COLUMNS as SKIPPED_COLUMNS,
)
from sku_jobs.sm_env import JobEnv

# The augmentation policy (what a till camera does to a product photo).
CROP_SCALE = (0.6, 1.0)              # fraction of the source area kept by the random crop
CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
MAX_ANGLE = 20.0                     # degrees, either way
P_HFLIP = 0.5
P_PERSPECTIVE = 0.3
PERSPECTIVE_MAX = 0.1                # corner moves inward by up to 10% of the side (distortion 0.2)
BRIGHTNESS = (0.7, 1.3)
CONTRAST = (0.7, 1.3)
SATURATION = (0.7, 1.3)
WHITE_BALANCE = (0.92, 1.08)         # per-channel gain: the colour cast of the till's lamps
P_BLUR = 0.25
BLUR_SIGMA = (0.75, 1.75)            # pixels of the output

_LUMA = (0.299, 0.587, 0.114)        # ITU-R 601, the weights PIL's "L" conversion uses
# Source pixels per output pixel from which the warp reads an area-reduced source: a bilinear
# warp reads 2x2 pixels, so it starts to alias beyond a 2x reduction. The JPEG draft() scale
# keeps the decoded source below 2x of the output for most variants, so this is rare.
_PRESCALE_MIN = 2.0
_HALF_PIXEL_IN = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
_HALF_PIXEL_OUT = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])


class AugmentationError(RuntimeError):
    """The job cannot do its work (missing channel / input list, nothing processable)."""


@dataclass(frozen=True)
class Settings:
    """Decoded hyperparameters."""

    variants_per_image: int = 4
    seed: int = 0
    jpeg_quality: int = 90
    max_side: int = 512
    workers: int = 1
    log_every_seconds: float = 10.0

    @classmethod
    def from_hyperparameters(cls, hps: dict[str, object], default_workers: int) -> Settings:
        return cls(
            variants_per_image=_int_hp(hps, "variants_per_image", 4, 1, 99),  # kk is two digits
            seed=_int_hp(hps, "seed", 0, 0, 2**63),
            jpeg_quality=_int_hp(hps, "jpeg_quality", 90, 1, 100),
            max_side=_int_hp(hps, "max_side", 512, 16, 65535),
            workers=_int_hp(hps, "workers", max(1, default_workers), 1, 1024),
            log_every_seconds=_float_hp(hps, "log_every_seconds", 10.0),
        )


def _int_hp(hps: dict[str, object], name: str, default: int, lo: int, hi: int) -> int:
    raw = hps.get(name, default)
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
    except (TypeError, ValueError):
        value = None
    if value is None or not lo <= value <= hi:
        raise AugmentationError(f"hyperparameter {name}={raw!r}: expected an integer in [{lo}, {hi}]")
    return value


def _float_hp(hps: dict[str, object], name: str, default: float) -> float:
    raw = hps.get(name, default)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = -1.0
    if isinstance(raw, bool) or not value > 0 or math.isinf(value):
        raise AugmentationError(f"hyperparameter {name}={raw!r}: expected a positive number")
    return value


# --------------------------------------------------------------------------- parameters


def variant_rng(source_sha256: str, k: int, seed: int) -> random.Random:
    """The per-variant RNG; Python's int seeding is stable across hosts and versions."""
    digest = hashlib.sha256(f"{source_sha256}:{k}:{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest, "big"))  # noqa: S311 - augmentation, not crypto


def draw_params(rng: random.Random) -> dict:
    """Draw one variant's transform parameters (rounded, and used exactly as recorded).

    Everything is relative to the source (the crop in fractions of its width and height), so
    the drawing needs neither the pixels nor the size and is the same on every host.
    """
    # RandomResizedCrop's rejection sampling, but with the aspect ratio relative to the
    # source's: with absolute ratios in [3/4, 4/3] a 16:9 or wider photo almost always falls
    # through to the same centre crop, so all its variants would share one framing.
    for _ in range(10):
        scale = rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*CROP_LOG_RATIO))
        w, h = math.sqrt(scale * ratio), math.sqrt(scale / ratio)
        if w <= 1 and h <= 1:
            x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            break
    else:  # ten misses (rare): the whole image
        w = h = 1.0
        x0 = y0 = 0.0
    wn, hn = min(round(w, 4), 1.0), min(round(h, 4), 1.0)
    crop = [min(round(x0, 4), round(1 - wn, 4)), min(round(y0, 4), round(1 - hn, 4)), wn, hn]

    params: dict = {"crop": crop, "angle": round(rng.uniform(-MAX_ANGLE, MAX_ANGLE), 2)}
    params["hflip"] = rng.random() < P_HFLIP
    params["perspective"] = (
        [round(rng.uniform(0, PERSPECTIVE_MAX), 4) for _ in range(8)] if rng.random() < P_PERSPECTIVE else None
    )
    params["brightness"] = round(rng.uniform(*BRIGHTNESS), 3)
    params["contrast"] = round(rng.uniform(*CONTRAST), 3)
    params["saturation"] = round(rng.uniform(*SATURATION), 3)
    params["white_balance"] = [round(rng.uniform(*WHITE_BALANCE), 3) for _ in range(3)]
    params["blur_sigma"] = round(rng.uniform(*BLUR_SIGMA), 2) if rng.random() < P_BLUR else None
    return params


def params_json(params: dict) -> str:
    return json.dumps(params, separators=(",", ":"), sort_keys=True)


# --------------------------------------------------------------------------- geometry


def output_size(params: dict, width: int, height: int, max_side: int) -> tuple[int, int]:
    """The crop at the source's resolution, scaled down so its longer side is <= max_side."""
    cw, ch = params["crop"][2] * width, params["crop"][3] * height
    f = min(1.0, max_side / max(cw, ch))
    return max(1, round(cw * f)), max(1, round(ch * f))


def source_quad(params: dict, width: int, height: int) -> list[tuple[float, float]]:
    """Where the output's corners (TL, TR, BR, BL) sample the source, in source pixels.

    The sampling map is crop -> rotate about the crop centre -> flip -> perspective, i.e. the
    torchvision chain resized_crop, rotate, hflip, perspective; every step is projective, so
    the four corners define the whole composed map and it is resampled once.
    """
    x0, y0, wn, hn = params["crop"]
    cw, ch = wn * width, hn * height
    cx, cy = (x0 + wn / 2) * width, (y0 + hn / 2) * height
    o = params["perspective"] or [0.0] * 8
    # Perspective: the output corner samples a point moved inward (RandomPerspective's sense).
    unit = [(o[0], o[1]), (1 - o[2], o[3]), (1 - o[4], 1 - o[5]), (o[6], 1 - o[7])]
    phi = -math.radians(params["angle"])  # PIL's rotate convention: positive = counter-clockwise
    cos, sin = math.cos(phi), math.sin(phi)
    quad = []
    for a, b in unit:
        if params["hflip"]:
            a = 1 - a
        x, y = (a - 0.5) * cw, (b - 0.5) * ch
        quad.append((cx + cos * x + sin * y, cy - sin * x + cos * y))
    return quad


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (8x8: not worth numpy's import in workers)."""
    n = len(rhs)
    m = [row[:] + [v] for row, v in zip(matrix, rhs, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def transform_data(quad: Sequence[tuple[float, float]], size: tuple[int, int], perspective: bool) -> tuple:
    """PIL AFFINE (6) or PERSPECTIVE (8) coefficients mapping output pixels to ``quad``."""
    ow, oh = size
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = quad
    if not perspective:  # exact: without perspective the map is affine
        return ((x1 - x0) / ow, (x3 - x0) / oh, x0, (y1 - y0) / ow, (y3 - y0) / oh, y0)
    rows, rhs = [], []
    for (u, v), (x, y) in zip(((0, 0), (ow, 0), (ow, oh), (0, oh)), quad, strict=True):
        rows.append([u, v, 1, 0, 0, 0, -u * x, -v * x])
        rhs.append(x)
        rows.append([0, 0, 0, u, v, 1, -u * y, -v * y])
        rhs.append(y)
    return tuple(_solve(rows, rhs))


def colour_matrix(params: dict, means: Sequence[float]) -> tuple[float, ...]:
    """White balance, brightness, contrast and saturation as one 3x4 RGB matrix.

    Same maths as ImageEnhance/torchvision (contrast around the mean grey, saturation towards
    the luma grey), composed so the pixels are touched once and clipped once.
    """
    g = [params["brightness"] * wb for wb in params["white_balance"]]
    c, s = params["contrast"], params["saturation"]
    mean_grey = sum(w * gi * mu for w, gi, mu in zip(_LUMA, g, means, strict=True))
    offset = (1 - c) * mean_grey  # saturation maps grey to grey, so the offset passes through
    out: list[float] = []
    for i in range(3):
        for j in range(3):
            sat = s * (i == j) + (1 - s) * _LUMA[j]
            out.append(sat * c * g[j])
        out.append(offset)
    return tuple(out)


def decode_scale_needed(params_list: Iterable[dict], width: int, height: int, max_side: int) -> float:
    """The smallest source scale that still gives every variant full output resolution."""
    need = 0.0
    for p in params_list:
        ow, _ = output_size(p, width, height, max_side)
        need = max(need, ow / (p["crop"][2] * width))
    return min(1.0, need)


def render_variant(img: Image.Image | np.ndarray, params: dict, orig_size: tuple[int, int], max_side: int,
                   means: Sequence[float], fill: tuple[int, int, int]) -> Image.Image:
    """One variant from the decoded (possibly draft-reduced) upright RGB source: a PIL image
    or its ``HxWx3`` uint8 array (pass the array when rendering several variants of one
    source: the conversion is then paid once)."""
    arr = img if isinstance(img, np.ndarray) else np.asarray(img.convert("RGB"))
    out = warp(arr, params, orig_size, max_side, fill)
    return Image.fromarray(apply_colour(out, params, means), "RGB")


def warp(arr: np.ndarray, params: dict, orig_size: tuple[int, int], max_side: int,
         fill: tuple[int, int, int]) -> np.ndarray:
    """Crop, rotation, flip and perspective in one bilinear resampling pass, then the blur.

    Where the source has more than ``_PRESCALE_MIN`` pixels per output pixel, the bounding
    box of the sampled quad is first reduced with OpenCV's area filter (an antialiased
    downscale; the crop happens before the resize), so the bilinear warp does not alias.
    The blur is a true Gaussian of ``blur_sigma`` output pixels.
    """
    width, height = orig_size
    size = output_size(params, width, height, max_side)
    sx, sy = arr.shape[1] / width, arr.shape[0] / height
    quad = [(x * sx, y * sy) for x, y in source_quad(params, width, height)]
    step = params["crop"][2] * width * sx / size[0]
    src = arr
    if step >= _PRESCALE_MIN:
        xs, ys = [p[0] for p in quad], [p[1] for p in quad]
        x0, y0 = max(0, math.floor(min(xs)) - 2), max(0, math.floor(min(ys)) - 2)
        x1, y1 = min(arr.shape[1], math.ceil(max(xs)) + 2), min(arr.shape[0], math.ceil(max(ys)) + 2)
        iw, ih = max(1, round((x1 - x0) / step)), max(1, round((y1 - y0) / step))
        src = cv2.resize(arr[y0:y1, x0:x1], (iw, ih), interpolation=cv2.INTER_AREA)
        quad = [((x - x0) * iw / (x1 - x0), (y - y0) * ih / (y1 - y0)) for x, y in quad]
    out = warp_quad(src, quad, size, params["perspective"] is not None, fill)
    if params["blur_sigma"]:
        out = cv2.GaussianBlur(out, (0, 0), params["blur_sigma"], borderType=cv2.BORDER_REFLECT_101)
    return out


def warp_quad(src: np.ndarray, quad: Sequence[tuple[float, float]], size: tuple[int, int], perspective: bool,
              fill: tuple[int, int, int]) -> np.ndarray:
    """Bilinear resampling of ``src`` so the output's corners sample ``quad``.

    ``transform_data`` gives PIL's coefficients, which map output pixel centres (x + 0.5,
    y + 0.5) to input coordinates whose pixel centres are at +0.5; OpenCV maps pixel indices.
    So OpenCV gets ``T(-0.5) @ M @ T(+0.5)`` as the inverse map (output -> input); the result
    matches PIL's ``transform`` to ~51 dB and is ~6x faster (vectorised fixed-point bilinear).
    """
    coeffs = transform_data(quad, size, perspective)
    m = np.array([*coeffs, 1.0] if perspective else [*coeffs, 0.0, 0.0, 1.0], dtype=np.float64).reshape(3, 3)
    m = _HALF_PIXEL_OUT @ m @ _HALF_PIXEL_IN
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    border = {"borderMode": cv2.BORDER_CONSTANT, "borderValue": tuple(int(v) for v in fill)}
    if perspective:
        return cv2.warpPerspective(src, m, size, flags=flags, **border)
    return cv2.warpAffine(src, m[:2], size, flags=flags, **border)


def apply_colour(arr: np.ndarray, params: dict, means: Sequence[float]) -> np.ndarray:
    """The colour matrix (:func:`colour_matrix`) on every pixel, rounded and clipped once."""
    return cv2.transform(arr, np.array(colour_matrix(params, means), dtype=np.float32).reshape(3, 4))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- files


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write via a hidden temp file in the same directory and ``os.replace``.

    Readers (training, a re-run, Lustre clients) never see a half-written file; fsync is left
    out on purpose: a crash leaves at worst a file that fails to decode, which a re-run rewrites.
    """
    path = os.fspath(path)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def variant_name(source_path: str, k: int) -> str:
    return f"{PurePosixPath(source_path).stem}__v{k:02d}.jpg"


def _decodes(path: str) -> tuple[bytes, int, int] | None:
    """(bytes, width, height) of an existing output that fully decodes, else None."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return data, im.width, im.height
    except Exception:  # noqa: BLE001 - any failure means "rewrite it"
        return None


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """``img.size`` once its EXIF orientation is applied (orientations 5-8 swap the sides)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block means "as stored"
        orientation = 1
    width, height = img.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _reason(what: str, path: str) -> str:
    return f"{what} ({path})"


def _decode_failure(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"decompression bomb: {exc}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "cannot decode: not an image"
    text = str(exc)
    if "truncated" in text.lower():
        return "cannot decode: truncated file"
    return f"cannot decode: {type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- worker

_ROOT: str = ""
_SETTINGS: Settings = Settings()


def init_worker(images_root: str, settings: Settings) -> None:
    """Pool initializer (also used in-process): state every task needs, sent once."""
    global _ROOT, _SETTINGS
    _ROOT, _SETTINGS = images_root, settings
    cv2.setNumThreads(1)  # one process per core: OpenCV's own thread pool would oversubscribe
    if "torch" in sys.modules:  # never imported here; if a caller did, keep 1 thread per worker
        sys.modules["torch"].set_num_threads(1)


def process_source(task: tuple[str, str, str]) -> dict:
    """Augment one source; never raises (a failure is a skip with its reason)."""
    source_path, sha, output_dir = task
    st = _SETTINGS
    result: dict = {"source_path": source_path, "rows": [], "written": 0, "existing": 0, "skip": None}

    def skip(what: str) -> dict:
        result.update(rows=[], skip=_reason(what, source_path))
        return result

    try:
        with open(os.path.join(_ROOT, source_path), "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return skip("cannot read: no such file")
    except OSError as exc:
        return skip(f"cannot read: {exc.strerror or exc}")
    if not data:
        return skip("cannot decode: empty file")
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha:
        return skip(f"sha256 mismatch: manifest {sha[:12]}…, file {actual[:12]}…")

    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; both are bombs here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        stored_size = img.size
        # Phone photos are often stored sideways with an EXIF orientation tag: variants are
        # rendered from the upright picture, as registration measured it and training sees it.
        width, height = _upright_size(img)
        if width < 1 or height < 1:
            return skip("cannot decode: empty image")
    except Exception as exc:  # noqa: BLE001 - untrusted input: any decoder failure is a skip
        return skip(_decode_failure(exc))

    params = [draw_params(variant_rng(sha, k, st.seed))
              for k in range(1, st.variants_per_image + 1)]
    out_dir = os.path.join(_ROOT, output_dir)
    rows, missing = [], []
    for k, p in enumerate(params, start=1):
        name = variant_name(source_path, k)
        row = {"variant_path": f"{output_dir}/{name}", "source_path": source_path, "source_sha256": sha,
               "variant_index": k, "seed": st.seed, "params": params_json(p)}
        found = _decodes(os.path.join(out_dir, name))
        if found is None:
            missing.append((k, p, row))
        else:
            row.update(sha256=hashlib.sha256(found[0]).hexdigest(), width=found[1], height=found[2])
            result["existing"] += 1
        rows.append(row)

    if missing:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                # The draft scale comes from all N variants, not just the missing ones, so a
                # rewritten variant is byte-identical to its first rendering.
                need = decode_scale_needed(params, width, height, st.max_side)
                img.draft("RGB", tuple(math.ceil(side * need) for side in stored_size))
                img.load()
                img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                img = img.convert("RGB")
            thumb = img.reduce(max(1, min(img.size) // 64))  # mean colour: 64 px is plenty
            means = ImageStat.Stat(thumb).mean
        except Exception as exc:  # noqa: BLE001 - untrusted input: any decoder failure is a skip
            return skip(_decode_failure(exc))
        fill = tuple(round(m) for m in means)
        arr = np.asarray(img)  # one conversion, shared by the variants
        try:
            os.makedirs(out_dir, exist_ok=True)
            for k, p, row in missing:
                out = render_variant(arr, p, (width, height), st.max_side, means, fill)
                data = encode_jpeg(out, st.jpeg_quality)
                write_atomic(os.path.join(out_dir, variant_name(source_path, k)), data)
                row.update(sha256=hashlib.sha256(data).hexdigest(), width=out.width, height=out.height)
                result["written"] += 1
        except OSError as exc:
            # Variants already written stay (valid files; a re-run reports them as existing).
            return skip(f"cannot write: {exc.strerror or exc}")
    result["rows"] = rows
    return result


# --------------------------------------------------------------------------- planning


def _check_relative(value: str, what: str) -> tuple[str | None, str | None]:
    """(normalised posix path, None) or (None, reason)."""
    if not value or not value.strip():
        return None, f"invalid {what}: empty"
    if "\x00" in value or "\\" in value:
        return None, f"invalid {what}: backslash or NUL in path"
    p = PurePosixPath(value)
    if p.is_absolute():
        return None, f"invalid {what}: absolute path not allowed"
    if ".." in p.parts:
        return None, f"invalid {what}: '..' component not allowed"
    norm = p.as_posix()
    if norm == ".":
        return None, f"invalid {what}: empty"
    return norm, None


@dataclass
class Plan:
    tasks: list[tuple[str, str, str]]      # (path, sha256, output_dir) for this host
    skipped: list[tuple[str, str]]         # (source_path, reason) for this host
    inputs: int                            # rows owned by this host
    total_rows: int


def plan(rows: list[dict[str, str]], host_rank: int, num_hosts: int) -> Plan:
    """Validate every row (on every host, so all hosts agree), then keep this host's shard.

    Host i of H takes rows with ``int(sha256[:8], 16) % H == i``; rows without a usable
    sha256 go to host 0, so each skip is reported exactly once. Duplicates and two sources
    that would write the same variant names are decided over the whole list (first row wins),
    because they may hash to different hosts.
    """
    tasks: list[tuple[str, str, str]] = []
    skipped: list[tuple[str, str]] = []
    inputs = 0
    claimed: dict[tuple[str, str], str] = {}   # (output_dir, stem) -> the row that writes it
    seen: set[tuple[str, str]] = set()         # (path, output_dir)
    for row in rows:
        raw_path = (row.get("path") or "").strip()
        sha = (row.get("sha256") or "").strip().lower()
        valid_sha = len(sha) == 64 and all(ch in "0123456789abcdef" for ch in sha)
        path, reason = _check_relative(raw_path, "path")
        out_dir, why_out = _check_relative((row.get("output_dir") or "").strip(), "output_dir")
        reason = reason or why_out
        if reason is None and not valid_sha:
            reason = f"invalid sha256: {sha[:80]!r}"
        if reason is None:
            key = (out_dir, PurePosixPath(path).stem)
            if (path, out_dir) in seen:
                reason = "duplicate row"
            elif key in claimed:
                reason = f"output name collision with {claimed[key]}"
            else:
                seen.add((path, out_dir))
                claimed[key] = path
        owner = int(sha[:8], 16) % num_hosts if valid_sha else 0
        if owner != host_rank:
            continue
        inputs += 1
        if reason is None:
            tasks.append((path, sha, out_dir))
        else:
            skipped.append((raw_path, _reason(reason, raw_path)))
    return Plan(tasks=tasks, skipped=skipped, inputs=inputs, total_rows=len(rows))


def read_inputs(manifests: Path) -> list[dict[str, str]]:
    path = manifests / INPUTS_FILE
    if not path.is_file():
        raise AugmentationError(f"input list {INPUTS_FILE} not found in the manifests channel ({path})")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in INPUT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise AugmentationError(
                f"{path}: header must be {','.join(INPUT_COLUMNS)}; missing {', '.join(missing)}")
        return list(reader)


def _channel(env: JobEnv, name: str) -> Path:
    path = env.channel(name)
    if path is None:
        raise AugmentationError(
            f"input channel '{name}' is missing (set SM_CHANNEL_{name.upper()} and list it in SM_CHANNELS)")
    if not path.is_dir():
        raise AugmentationError(f"input channel '{name}' is missing: {path} is not a directory")
    return path


# --------------------------------------------------------------------------- driver


def log(message: str) -> None:
    print(f"[augment] {message}", flush=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def process_chunk(tasks: list[tuple[str, str, str]]) -> list[dict]:
    """A pool work item: several sources per round trip."""
    return [process_source(task) for task in tasks]


def _results(tasks: list[tuple[str, str, str]], root: str, st: Settings, workers: int):
    """Yield each source's result as it completes, and None on a log tick with nothing new."""
    if workers <= 1:
        init_worker(root, st)
        for task in tasks:
            yield process_source(task)
        return
    # Chunks are formed here, not by imap_unordered(chunksize=...): with chunksize > 1 it
    # returns a plain generator without next(timeout), and progress could not tick while
    # waiting. Small chunks keep the tail short; a few per worker keep the IPC cheap.
    size = max(1, min(8, len(tasks) // (workers * 32)))
    chunks = [tasks[i:i + size] for i in range(0, len(tasks), size)]
    # spawn: no locks/threads inherited from the parent, the same behaviour on every platform.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=(root, st)) as pool:
        it = pool.imap_unordered(process_chunk, chunks)
        while True:
            try:
                yield from it.next(timeout=min(1.0, st.log_every_seconds))
            except multiprocessing.TimeoutError:
                yield None
            except StopIteration:
                break
        pool.close()
        pool.join()


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


def run(env: JobEnv) -> dict:
    """The job: plan, augment in parallel, write manifest/skipped/summary; returns the summary."""
    st = Settings.from_hyperparameters(env.hyperparameters, env.num_cpus)
    manifests = _channel(env, "manifests")
    images = _channel(env, "images")
    rows = read_inputs(manifests)
    p = plan(rows, env.host_rank, env.num_hosts)
    host = env.current_host
    workers = max(1, min(st.workers, len(p.tasks)))
    log(f"host {host} ({env.host_rank + 1}/{env.num_hosts}): {p.inputs} of {p.total_rows} inputs, "
        f"{len(p.tasks)} to augment, {len(p.skipped)} invalid; {st.variants_per_image} variants each, "
        f"seed={st.seed}, quality={st.jpeg_quality}, max_side={st.max_side}, workers={workers}")
    if p.total_rows == 0:
        log("the input list is empty: nothing to do")
    elif p.inputs == 0:
        log("no inputs fall to this host's shard: nothing to do")

    start = last_log = time.monotonic()
    manifest_rows: list[dict] = []
    skipped = list(p.skipped)
    written = existing = done = 0
    total = len(p.tasks)
    for res in _results(p.tasks, str(images), st, workers):
        if res is not None:
            done += 1
            written += res["written"]
            existing += res["existing"]
            manifest_rows.extend(res["rows"])
            if res["skip"]:
                skipped.append((res["source_path"], res["skip"]))
                log(f"skipped: {res['skip']}")
        now = time.monotonic()
        if now - last_log >= st.log_every_seconds and done < total:
            last_log = now
            elapsed = now - start
            rate = (written + existing) / elapsed if elapsed > 0 else 0.0
            eta = (total - done) * elapsed / done if done else float("nan")
            log(f"progress {done}/{total} inputs, {written + existing} variants, {rate:.1f} images/s, "
                f"ETA {_fmt_eta(eta) if done else '?'}")
    seconds = time.monotonic() - start

    env.output_data_dir.mkdir(parents=True, exist_ok=True)
    manifest_rows.sort(key=lambda r: r["variant_path"])
    _write_csv(env.output_data_dir / f"{AUGMENTATION_MANIFEST_PREFIX}{host}.csv", MANIFEST_COLUMNS,
               ([r[c] for c in MANIFEST_COLUMNS] for r in manifest_rows))
    skipped.sort()
    _write_csv(env.output_data_dir / f"{AUGMENTATION_SKIPPED_PREFIX}{host}.csv", SKIPPED_COLUMNS, skipped)
    summary = {
        "host": host, "num_hosts": env.num_hosts, "total_rows": p.total_rows,
        "inputs": p.inputs, "variants_written": written, "variants_existing": existing,
        "skipped": len(skipped), "seconds": round(seconds, 3),
        "images_per_second": round((written + existing) / seconds, 2) if seconds > 0 else 0.0,
        "variants_per_image": st.variants_per_image, "seed": st.seed, "workers": workers,
    }
    write_atomic(env.output_data_dir / f"summary-{host}.json", (json.dumps(summary, indent=2) + "\n").encode())
    log("summary: " + ", ".join(f"{k}={summary[k]}" for k in (
        "inputs", "variants_written", "variants_existing", "skipped", "seconds", "images_per_second")))

    if p.inputs and not (written + existing):
        reasons = "; ".join(r for _, r in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise AugmentationError(
            f"nothing could be processed: all {p.inputs} inputs on host {host} were skipped: {reasons}{more}")
    return summary


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> dict:
    """Entry point body: hyperparameters from the environment, ``--name value`` overrides them."""
    env = JobEnv.from_environment(environ)
    overrides = _parse_overrides(list(sys.argv[1:] if argv is None else argv))
    if overrides:
        env = dataclasses.replace(env, hyperparameters={**env.hyperparameters, **overrides})
    return run(env)


_HP_NAMES = ("variants_per_image", "seed", "jpeg_quality", "max_side", "workers", "log_every_seconds")


def _parse_overrides(argv: list[str]) -> dict[str, object]:
    """SageMaker script mode passes hyperparameters as ``--name value``; unknown ones are ignored."""
    import argparse

    parser = argparse.ArgumentParser(prog="augment.py", description=__doc__.splitlines()[0])
    for name in _HP_NAMES:
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=None)
    known, _unknown = parser.parse_known_args(argv)
    return {k: v for k, v in vars(known).items() if v is not None}
