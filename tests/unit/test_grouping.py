"""Near-duplicate split groups (catalogue/grouping.py) on generated near-identical photos."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image, ImageDraw, ImageEnhance

from sku_retraining.catalogue.grouping import (
    DEFAULT_MAX_DISTANCE,
    GroupInput,
    assign_groups,
    phash_to_int,
)
from sku_retraining.image_check import ImageFacts, inspect_image


def scene(seed: int, size: int = 256) -> Image.Image:
    """A product-shelf-like picture: a background and a few coloured boxes and discs."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randrange(40, 200) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = rng.randrange(size), rng.randrange(size)
        w, h = rng.randint(20, 110), rng.randint(20, 110)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x, y, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def near_copy(img: Image.Image, k: int) -> Image.Image:
    """The next frame of a burst: shifted a pixel or two, a little brighter, noisier, recompressed."""
    rng = random.Random(k)
    dx, dy = rng.randint(-3, 3), rng.randint(-3, 3)
    moved = img.transform(img.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=img.getpixel((0, 0)))
    moved = ImageEnhance.Brightness(moved).enhance(rng.uniform(0.93, 1.07))
    return Image.open(io.BytesIO(jpeg(moved, quality=rng.randint(70, 95)))).convert("RGB")


def facts(img: Image.Image) -> ImageFacts:
    result = inspect_image(jpeg(img))
    assert isinstance(result, ImageFacts) and result.phash and len(result.phash) == 16
    return result


def test_near_identical_frames_share_a_group_and_other_photos_do_not():
    items, truth = [], {}
    for s in range(6):  # 6 scenes of one SKU, 4 burst frames each
        base = scene(s)
        for k in range(4):
            f = facts(base if k == 0 else near_copy(base, 100 * s + k))
            items.append(GroupInput(f.sha256, "SKU-1", phash_to_int(f.phash)))
            truth[f.sha256] = s
    groups = assign_groups(items)
    by_scene = {}
    for sha, s in truth.items():
        by_scene.setdefault(s, set()).add(groups[sha])
    assert all(len(keys) == 1 for keys in by_scene.values()), by_scene  # each burst: one group
    assert len({next(iter(k)) for k in by_scene.values()}) == 6  # six different groups
    assert all(key.startswith("phash:") for key in groups.values())
    # The group key is the smallest content hash of the cluster: the same in any order.
    assert assign_groups(list(reversed(items))) == groups
    # Without clustering, every image is its own group.
    assert len(set(assign_groups(items, max_distance=-1).values())) == len(items)


def test_exif_rotated_upload_hashes_like_the_upright_photo():
    base = scene(7).resize((256, 192))
    sideways = base.transpose(Image.Transpose.ROTATE_90)  # stored rotated, EXIF says turn it back
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    sideways.save(out, "JPEG", quality=90, exif=exif)
    rotated = inspect_image(out.getvalue())
    upright = facts(base)
    distance = bin((phash_to_int(rotated.phash) ^ phash_to_int(upright.phash)) & (2**64 - 1)).count("1")
    assert distance <= DEFAULT_MAX_DISTANCE


def test_clusters_join_registered_groups_and_manifest_groups_within_a_sku_only():
    a, b, c = (facts(scene(s)) for s in (11, 12, 13))
    a2, b2, c2 = (facts(near_copy(scene(s), 1)) for s in (11, 12, 13))
    existing = [("SKU-1", phash_to_int(a.phash), "phash:registered-a")]
    new = [
        GroupInput(a2.sha256, "SKU-1", phash_to_int(a2.phash)),  # near-duplicate of a registered image
        GroupInput(b.sha256, "SKU-1", phash_to_int(b.phash), manifest_group="session-7"),
        GroupInput(b2.sha256, "SKU-1", phash_to_int(b2.phash)),  # near-duplicate of a labelled one
        GroupInput(c.sha256, "SKU-2", phash_to_int(a.phash)),  # same hash, other SKU: never joined
        GroupInput(c2.sha256, "SKU-2", None),  # no hash: alone
    ]
    groups = assign_groups(new, existing)
    assert groups[a2.sha256] == "phash:registered-a"
    assert groups[b.sha256] == groups[b2.sha256] == "manifest:session-7"
    assert groups[c.sha256] == f"phash:{c.sha256}"
    assert groups[c2.sha256] == f"image:{c2.sha256}"


@pytest.mark.parametrize("bad", ["", "123", "g" * 16, "1" * 17])
def test_phash_to_int_refuses_what_is_not_64_bits(bad):
    with pytest.raises(ValueError):
        phash_to_int(bad)


def test_phash_to_int_is_signed_64_bit():
    assert phash_to_int("ffffffffffffffff") == -1
    assert phash_to_int("7fffffffffffffff") == 2**63 - 1
