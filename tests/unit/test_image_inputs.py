"""Awkward but real image inputs at every decode point: registration's check, augmentation,
training's decode and the evaluation report's thumbnails.

A phone photo stored sideways with an EXIF orientation tag must be seen upright everywhere
(else the model trains on sideways products and registration records the wrong size); CMYK
JPEGs are accepted as RGB; 16-bit greyscale and images below the minimum side are refused
with a reason.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from sku_dev.synthetic import EXIF_ORIENTATION_TAG, EXIF_ROTATE_CW
from sku_jobs import augmentation, data, report
from sku_retraining.image_check import ImageFacts, ImageProblem, inspect_image

RED, BLUE = (220, 20, 20), (20, 20, 220)


def upright_picture(width: int = 96, height: int = 48) -> Image.Image:
    """Landscape, red on the left half and blue on the right: any rotation shows."""
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    return img


def phone_jpeg(upright: Image.Image) -> bytes:
    """``upright`` stored turned 90 degrees counter-clockwise, tagged "rotate 90 CW to show"."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = EXIF_ROTATE_CW
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def is_upright(img: Image.Image) -> bool:
    """Landscape with red on the left and blue on the right (JPEG noise tolerated)."""
    rgb = np.asarray(img.convert("RGB"), dtype=float)
    h, w, _ = rgb.shape
    left, right = rgb[:, : w // 4].mean(axis=(0, 1)), rgb[:, -w // 4 :].mean(axis=(0, 1))
    return w > h and left[0] > left[2] + 80 and right[2] > right[0] + 80


def test_the_phone_photo_is_really_stored_sideways():
    with Image.open(io.BytesIO(phone_jpeg(upright_picture()))) as stored:
        assert stored.size == (48, 96) and not is_upright(stored)


def test_registration_measures_the_upright_size():
    facts = inspect_image(phone_jpeg(upright_picture()))
    assert isinstance(facts, ImageFacts) and (facts.width, facts.height) == (96, 48)


def test_training_decodes_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(phone_jpeg(upright_picture()))
    assert is_upright(data.decode_image(path, draft_size=None))
    assert is_upright(data.decode_image(path, draft_size=24))  # the JPEG draft path too


def test_report_thumbnail_is_upright(tmp_path):
    source, target = tmp_path / "phone.jpg", tmp_path / "thumb.jpg"
    source.write_bytes(phone_jpeg(upright_picture(192, 96)))
    assert report.write_thumbnail(source, target, size=64)
    with Image.open(target) as thumb:
        assert is_upright(thumb)


def test_augmentation_renders_from_the_upright_picture(tmp_path, monkeypatch):
    raw = phone_jpeg(upright_picture(192, 96))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "phone.jpg").write_bytes(raw)
    seen = []
    real = augmentation.render_variant

    def spy(img, params, orig_size, *args, **kwargs):  # the job hands over the source's array
        seen.append((Image.fromarray(np.array(img)) if isinstance(img, np.ndarray) else img.copy(), orig_size))
        return real(img, params, orig_size, *args, **kwargs)

    monkeypatch.setattr(augmentation, "render_variant", spy)
    augmentation.init_worker(str(tmp_path), augmentation.Settings(variants_per_image=2, max_side=512))
    result = augmentation.process_source(("in/phone.jpg", hashlib.sha256(raw).hexdigest(), "out"))
    assert result["skip"] is None and result["written"] == 2
    assert [size for _, size in seen] == [(192, 96), (192, 96)]
    assert all(is_upright(img) for img, _ in seen)


def test_cmyk_jpeg_is_accepted_and_decodes_to_rgb(tmp_path):
    buf = io.BytesIO()
    upright_picture().convert("CMYK").save(buf, "JPEG", quality=95)
    assert isinstance(inspect_image(buf.getvalue()), ImageFacts)
    (tmp_path / "cmyk.jpg").write_bytes(buf.getvalue())
    decoded = data.decode_image(tmp_path / "cmyk.jpg", draft_size=None)
    assert decoded.mode == "RGB" and is_upright(decoded)


def test_sixteen_bit_greyscale_is_refused_with_a_reason():
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 40_000, dtype=np.uint16)).save(buf, "PNG")
    problem = inspect_image(buf.getvalue())
    assert isinstance(problem, ImageProblem) and problem.code == "unsupported_mode"
    assert "I;16" in problem.detail and problem.sha256


@pytest.mark.parametrize(("size", "min_side", "accepted"), [
    ((31, 200), 32, False), ((32, 32), 32, True), ((20, 20), 16, True), ((200, 10), 16, False),
])
def test_minimum_side_is_checked_and_configurable(size, min_side, accepted):
    buf = io.BytesIO()
    Image.new("RGB", size, RED).save(buf, "PNG")
    result = inspect_image(buf.getvalue(), min_side=min_side)
    if accepted:
        assert isinstance(result, ImageFacts)
    else:
        assert isinstance(result, ImageProblem) and result.code == "too_small"
        assert f"minimum side of {min_side} px" in result.detail


def test_min_side_is_read_from_configuration(tmp_path, monkeypatch):
    import json

    from sku_retraining.config import load_config

    assert load_config().intake.min_side == 32
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"intake": {"min_side": 64}}))
    monkeypatch.setenv("SKU_RETRAINING_CONFIG", str(config))
    assert load_config().intake.min_side == 64


def test_the_upright_size_decides_the_minimum_side():
    # Stored 20x96 but shown 96x20: refused for its upright short side, the same number.
    upright = upright_picture(96, 20)
    problem = inspect_image(phone_jpeg(upright), min_side=32)
    assert isinstance(problem, ImageProblem) and "96x20" in problem.detail
