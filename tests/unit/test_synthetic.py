"""The synthetic batch generator: determinism, decodable images, faults, upload order, learnability."""

from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from PIL import Image

from sku_contracts.ids import is_valid_id
from sku_dev import synthetic
from sku_dev.synthetic import (
    ACCEPTED_BY_CONTENT,
    BATCH_FAULTS,
    EMPTY_BATCH_KEY,
    FAULT_KINDS,
    IMAGE_FAULTS,
    SkuSpec,
    generate_batch,
    make_skus,
    upload_batch,
    write_batch_to_dir,
)
from sku_retraining.image_check import ImageFacts, ImageProblem, inspect_image
from sku_retraining.manifest import ManifestError, parse_manifest

CREATED = datetime(2026, 11, 1, 6, 0, tzinfo=UTC)
SIZE = 64  # small images keep the suite fast; one test checks the 256 px default


@pytest.fixture(scope="module")
def skus() -> list[SkuSpec]:
    return make_skus(4)


@pytest.fixture(scope="module")
def clean(skus):
    return generate_batch("2026-11", skus, 6, seed=1, image_size=SIZE, created_at=CREATED)


@pytest.fixture(scope="module")
def faulty(skus):
    return generate_batch(
        "2026-11", skus, 6, seed=1, image_size=SIZE, created_at=CREATED, inject=IMAGE_FAULTS
    )


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _bad_of(batch, kind: str) -> list[str]:
    return [k for k, v in batch.expected_bad.items() if v == kind]


# -- SKUs ---------------------------------------------------------------------------------------


def test_make_skus_ids_are_valid_and_stable():
    many = make_skus(40)
    assert [s.sku_id for s in many[:3]] == ["SKU-000000", "SKU-000001", "SKU-000002"]
    assert all(is_valid_id(s.sku_id) for s in many)
    assert all(s.name and s.brand and s.category for s in many)
    # SKU number n is the same spec however it is asked for.
    assert make_skus(5, start=123) == make_skus(200)[123:128]
    assert make_skus(3, start=7) == many[7:10]
    # Brands are shared across SKUs (the brand alone cannot identify a product).
    assert len({s.brand for s in many}) < len(many) / 2
    assert make_skus(1, start=5, prefix="P")[0].sku_id == "P-000005"


def test_designs_share_shapes_and_colours():
    designs = [synthetic._design(s) for s in make_skus(20)]
    assert len({d.shape for d in designs}) < len(designs)
    assert len({d.logo for d in designs}) < len(designs)


# -- determinism and images -----------------------------------------------------------------


def test_same_seed_same_bytes_any_worker_count(skus, clean):
    again = generate_batch("2026-11", skus, 6, seed=1, image_size=SIZE, created_at=CREATED, workers=2)
    assert list(again.files) == list(clean.files)
    assert again.files == clean.files
    assert again.manifest_bytes == clean.manifest_bytes


def test_different_seed_different_bytes(skus, clean):
    other = generate_batch("2026-11", skus, 6, seed=2, image_size=SIZE, created_at=CREATED)
    differing = [k for k in clean.files if other.files.get(k) != clean.files[k]]
    # Extensions can differ between seeds (JPEG vs PNG), so compare by content hash.
    assert len(differing) == len(clean.files)
    assert not {hashlib.sha256(v).digest() for v in clean.files.values()} & {
        hashlib.sha256(v).digest() for v in other.files.values()
    }


def test_good_images_decode_at_requested_size(clean, skus):
    assert len(clean.files) == 6 * len(skus)
    assert clean.expected_bad == {} and clean.write_success
    formats = set()
    for key, data in clean.files.items():
        _, sku_id, name = key.split("/")
        assert sku_id in {s.sku_id for s in skus}
        assert re.fullmatch(r"img_\d{4}\.(jpg|png)", name)
        img = _open(data)
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        assert img.format == {"jpg": "JPEG", "png": "PNG"}[name.rsplit(".", 1)[1]]
        formats.add(img.format)
        if img.format == "PNG":  # no time/text chunks that would break determinism
            assert b"tIME" not in data and b"tEXt" not in data
    assert formats == {"JPEG", "PNG"}
    assert all(isinstance(inspect_image(d), ImageFacts) for d in clean.files.values())


def test_default_image_size_is_256():
    batch = generate_batch("b", make_skus(1), 2, seed=0)
    assert {_open(d).size for d in batch.files.values()} == {(256, 256)}


def test_images_vary_within_a_sku(clean, skus):
    arrays = [
        np.asarray(_open(d).convert("RGB"), dtype=np.float32)
        for k, d in clean.files.items()
        if skus[0].sku_id in k
    ]
    assert min(np.abs(a - b).mean() for i, a in enumerate(arrays) for b in arrays[i + 1 :]) > 5


# -- manifest -----------------------------------------------------------------------------------


def test_manifest_fields(clean, skus):
    m = clean.manifest
    assert m["batch_id"] == "2026-11"
    assert m["created_at"] == "2026-11-01T06:00:00Z"
    assert datetime.fromisoformat(m["created_at"]).utcoffset() == timedelta(0)
    assert m["skus"] == [
        {"sku_id": s.sku_id, "name": s.name, "brand": s.brand, "category": s.category} for s in skus
    ]
    assert json.loads(clean.manifest_bytes) == m
    # The project's own schema and rules accept it.
    assert parse_manifest("2026-11", clean.manifest_bytes).sku_ids == {s.sku_id for s in skus}


def test_created_at_defaults_to_now_utc_and_rejects_naive(skus):
    batch = generate_batch("b", skus[:1], 1, image_size=SIZE)
    created = datetime.fromisoformat(batch.manifest["created_at"])
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=1)
    other_tz = generate_batch(
        "b",
        skus[:1],
        1,
        image_size=SIZE,
        created_at=datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
    )
    assert other_tz.manifest["created_at"] == "2026-01-01T00:00:00Z"
    with pytest.raises(ValueError, match="timezone"):
        generate_batch("b", skus[:1], 1, image_size=SIZE, created_at=datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_id": "../x"}, "batch_id"),
        ({"skus": [SkuSpec("bad sku", "n", "b", "c")]}, "sku_id"),
        ({"skus": [SkuSpec("A", "n", "b", "c")] * 2}, "unique"),
        ({"skus": []}, "at least one"),
        ({"images_per_sku": 0}, "images_per_sku"),
        ({"inject": ["nope"]}, "unknown fault"),
        ({"inject": ["missing_manifest", "bad_manifest_json"]}, "at most one manifest fault"),
        ({"inject": ["empty_batch", "zero_byte"]}, "empty_batch"),
        ({"inject": "duplicate_across_skus", "skus": [SkuSpec("A", "n", "b", "c")]}, "2 SKUs"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    args = {"batch_id": "b", "skus": make_skus(2), "images_per_sku": 1, "image_size": SIZE} | kwargs
    with pytest.raises(ValueError, match=message):
        generate_batch(args.pop("batch_id"), args.pop("skus"), args.pop("images_per_sku"), **args)


# -- image-level faults -----------------------------------------------------------------------


def test_faults_never_change_good_images(clean, faulty):
    for key, data in clean.files.items():
        assert faulty.files[key] == data
    assert set(faulty.good_keys) == set(clean.files)
    assert set(faulty.expected_bad.values()) == set(IMAGE_FAULTS)
    assert set(faulty.expected_bad) <= set(faulty.files)
    # Injection order does not matter.
    reordered = generate_batch(
        "2026-11",
        make_skus(4),
        6,
        seed=1,
        image_size=SIZE,
        created_at=CREATED,
        inject=",".join(reversed(IMAGE_FAULTS)),
    )
    assert reordered.files == faulty.files and reordered.expected_bad == faulty.expected_bad


def test_corrupt_truncated_zero_and_non_image_fail_to_decode(faulty):
    for kind in ("corrupt_jpeg", "truncated_jpeg", "zero_byte", "non_image"):
        (key,) = _bad_of(faulty, kind)
        assert key.endswith(".jpg")
        data = faulty.files[key]
        with pytest.raises((OSError, SyntaxError)):  # UnidentifiedImageError is an OSError
            _open(data)
        assert isinstance(inspect_image(data), ImageProblem)
    assert faulty.files[_bad_of(faulty, "corrupt_jpeg")[0]][:4] == b"\xff\xd8\xff\xe0"
    assert faulty.files[_bad_of(faulty, "zero_byte")[0]] == b""
    truncated = faulty.files[_bad_of(faulty, "truncated_jpeg")[0]]
    assert Image.open(io.BytesIO(truncated)).format == "JPEG"  # header intact, data cut
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(truncated)).load()


def test_wrong_extension_files_are_formats_we_do_not_accept(faulty):
    keys = _bad_of(faulty, "wrong_extension")
    assert sorted(k.rsplit(".", 1)[1] for k in keys) == ["bmp", "gif", "txt"]
    for key in keys:
        result = inspect_image(faulty.files[key])
        assert isinstance(result, ImageProblem)


def test_png_as_jpg_is_readable_and_accepted_by_content(faulty):
    (key,) = _bad_of(faulty, "png_as_jpg")
    assert key.endswith(".jpg") and "png_as_jpg" in ACCEPTED_BY_CONTENT
    img = _open(faulty.files[key])
    assert img.format == "PNG" and img.size == (SIZE, SIZE)
    assert isinstance(inspect_image(faulty.files[key]), ImageFacts)
    assert key not in faulty.rejected_keys


def test_duplicate_across_skus_has_identical_bytes_under_two_skus(faulty):
    (copy_key,) = _bad_of(faulty, "duplicate_across_skus")
    original = faulty.duplicate_of[copy_key]
    assert original in faulty.good_keys
    assert copy_key.split("/")[1] != original.split("/")[1]
    assert hashlib.sha256(faulty.files[copy_key]).digest() == hashlib.sha256(faulty.files[original]).digest()


def test_hostile_paths(faulty, skus):
    keys = _bad_of(faulty, "hostile_path")
    folders = {k.split("/")[1] for k in keys}
    assert {"..", "bad sku", "SKU\u2215evil", "SKU-UNLISTED"} <= folders
    fullwidth = next(f for f in folders if f.startswith("\uff33\uff2b\uff35"))
    assert unicodedata.normalize("NFKC", fullwidth) == skus[0].sku_id  # collides after NFKC
    assert "SKU-UNLISTED" not in {s.sku_id for s in skus}
    for key in keys:
        key.encode("utf-8")  # any UTF-8 is a valid S3 key
        assert len(key.encode()) <= 1024
        assert _open(faulty.files[key]).format == "JPEG"  # only the path is wrong


def test_decompression_bomb_is_small_and_refused_by_default_limits(faulty):
    (key,) = _bad_of(faulty, "decompression_bomb")
    data = faulty.files[key]
    assert key.endswith(".png") and len(data) < 100_000
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's default: nothing in the suite changed it
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    assert inspect_image(data).code == "decompression_bomb"


# -- batch-level faults -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", BATCH_FAULTS)
def test_batch_level_faults(kind, skus):
    batch = generate_batch("2026-11", skus, 2, seed=1, image_size=SIZE, created_at=CREATED, inject=[kind])
    objects = dict(batch.objects())
    if kind == "missing_manifest":
        assert batch.manifest is None and "manifest.json" not in objects
    elif kind == "bad_manifest_json":
        assert batch.manifest is None
        with pytest.raises(json.JSONDecodeError):
            json.loads(objects["manifest.json"])
    elif kind == "manifest_schema_violation":
        assert "name" not in batch.manifest["skus"][0]
        assert batch.manifest["batch_id"] != "2026-11"
    elif kind == "hostile_manifest_sku":
        assert "../../etc" in [s["sku_id"] for s in json.loads(objects["manifest.json"])["skus"]]
    elif kind == "empty_batch":
        assert batch.files == {} and batch.expected_bad == {EMPTY_BATCH_KEY: kind}
        assert parse_manifest("2026-11", batch.manifest_bytes)  # the manifest itself is fine
    elif kind == "no_success_marker":
        assert not batch.write_success and batch.expected_bad == {"_SUCCESS": kind}
    if kind in {"missing_manifest", "bad_manifest_json", "manifest_schema_violation", "hostile_manifest_sku"}:
        assert batch.expected_bad == {"manifest.json": kind}
        with pytest.raises(ManifestError):
            parse_manifest("2026-11", objects.get("manifest.json"))
    if kind != "empty_batch":
        assert len(batch.files) == 2 * len(skus)


def test_every_kind_is_documented_and_known():
    assert set(FAULT_KINDS) == set(IMAGE_FAULTS) | set(BATCH_FAULTS)
    for kind in FAULT_KINDS:
        assert hasattr(synthetic._Injector, kind)


# -- writing ----------------------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch):
    for name in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_SESSION_TOKEN",
        synthetic.ENDPOINT_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _recording_client():
    import boto3

    client = boto3.client("s3", region_name="us-east-1")
    order: list[str] = []
    client.meta.events.register(
        "before-parameter-build.s3.PutObject", lambda params, **_: order.append(params["Key"])
    )
    return client, order


def test_upload_batch_writes_success_last(aws_env, faulty):
    from moto import mock_aws

    with mock_aws():
        client, order = _recording_client()
        client.create_bucket(Bucket="sku-retraining-data")
        written = upload_batch(client, "sku-retraining-data", faulty)
        prefix = "incoming/2026-11/"
        assert order[-1] == prefix + "_SUCCESS" and order[-2] == prefix + "manifest.json"
        assert sorted(written) == sorted(order)
        stored = {
            o["Key"]: o["Size"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket="sku-retraining-data")
            for o in page["Contents"]
        }
        expected = {prefix + k: len(v) for k, v in faulty.files.items()}
        expected |= {prefix + "manifest.json": len(faulty.manifest_bytes), prefix + "_SUCCESS": 0}
        assert stored == expected  # hostile keys stored verbatim, nothing normalised
        body = client.get_object(Bucket="sku-retraining-data", Key=prefix + "images/../img_0000.jpg")[
            "Body"
        ].read()
        assert body == faulty.files["images/../img_0000.jpg"]


def test_upload_batch_without_marker_or_manifest(aws_env, skus):
    from moto import mock_aws

    batch = generate_batch("b2", skus[:1], 1, image_size=SIZE, inject="no_success_marker,missing_manifest")
    with mock_aws():
        client, order = _recording_client()
        client.create_bucket(Bucket="data-bucket")
        upload_batch(client, "data-bucket", batch, prefix="")
        assert order == ["b2/" + k for k in batch.files]


def test_write_batch_to_dir_never_escapes(tmp_path, faulty):
    root = tmp_path / "out"
    skipped = write_batch_to_dir(root, faulty)
    # ".." resolves out of the batch; a 300-character name is over NAME_MAX (S3 keys hold it).
    too_long = [k for k in faulty.files if any(len(p.encode()) > 255 for p in k.split("/"))]
    assert len(too_long) == 1 and len(too_long[0].rsplit("/", 1)[1]) == 300
    assert sorted(skipped) == sorted(["images/../img_0000.jpg", *too_long])
    written = {
        p.relative_to(root / "2026-11").as_posix() for p in (root / "2026-11").rglob("*") if p.is_file()
    }
    assert written == (set(faulty.files) - set(skipped)) | {"manifest.json", "_SUCCESS"}
    assert not any(p.is_file() for p in tmp_path.iterdir())  # nothing beside root
    assert (root / "2026-11" / "images" / "bad sku" / "img_0001.jpg").read_bytes() == faulty.files[
        "images/bad sku/img_0001.jpg"
    ]


def test_cli_to_dir_and_to_s3(tmp_path, capsys, aws_env):
    from moto import mock_aws

    argv = [
        "--batch-id",
        "2026-11",
        "--skus",
        "2",
        "--images-per-sku",
        "2",
        "--seed",
        "1",
        "--image-size",
        "48",
    ]
    assert synthetic.main([*argv, "--out-dir", str(tmp_path), "--inject", "zero_byte,no_success_marker"]) == 0
    out = capsys.readouterr().out
    assert "4 good, 1 injected" in out and "zero_byte" in out
    assert not (tmp_path / "2026-11" / "_SUCCESS").exists()
    assert (tmp_path / "2026-11" / "manifest.json").exists()

    with mock_aws():
        assert synthetic.main([*argv, "--bucket", "sku-retraining-data", "--create-bucket"]) == 0
        import boto3

        keys = [
            o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="sku-retraining-data")["Contents"]
        ]
        assert "incoming/2026-11/_SUCCESS" in keys and len(keys) == 6
    assert "s3://sku-retraining-data/incoming/2026-11/" in capsys.readouterr().out


# -- learnability -------------------------------------------------------------------------------


def test_classes_are_learnable_but_not_trivial():
    """Nearest centroid on 16x16 pixels: well above chance (10%), far from perfect.

    A pixel-space centroid is a weak learner (no translation or rotation invariance), so
    ~40-50% here means a small CNN has plenty to learn from; ~100% would mean the task is
    trivial (e.g. a solid colour per SKU and nothing else).
    """
    skus = make_skus(10)
    batch = generate_batch("learn", skus, 20, seed=0, image_size=96, created_at=CREATED)
    feats: dict[str, list[np.ndarray]] = {s.sku_id: [] for s in skus}
    for key, data in batch.files.items():
        small = _open(data).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
        feats[key.split("/")[1]].append(np.asarray(small, dtype=np.float32).ravel() / 255)
    ids = list(feats)
    centroids = np.stack([np.mean(feats[i][:10], axis=0) for i in ids])
    hits = [
        int(np.argmin(((centroids - x) ** 2).sum(axis=1)) == c)
        for c, i in enumerate(ids)
        for x in feats[i][10:]
    ]
    accuracy = sum(hits) / len(hits)
    assert 0.3 < accuracy < 0.9, accuracy
