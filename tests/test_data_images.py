import io
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from genre_pipeline.data.images import (
    IMAGENET_MEAN,
    PosterDecodeError,
    PreprocessSpec,
    decode_poster,
    resize_rgb,
)
from genre_pipeline.data.posters import decode_posters
from genre_pipeline.data.tensors import to_model_input
from genre_pipeline.train.augmentation import augment_batch, training_augmentation


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def red_left_blue_right(mode: str = "RGB", size=(60, 90)) -> Image.Image:
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:, : size[0] // 2] = (220, 20, 20)
    array[:, size[0] // 2 :] = (20, 20, 220)
    return Image.fromarray(array, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(array, "RGB")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("jpeg", lambda: encoded(red_left_blue_right(), "JPEG", quality=95)),
        ("progressive jpeg", lambda: encoded(red_left_blue_right(), "JPEG", quality=95, progressive=True)),
        ("png", lambda: encoded(red_left_blue_right(), "PNG")),
        ("webp", lambda: encoded(red_left_blue_right(), "WEBP", lossless=True)),
        ("cmyk jpeg", lambda: encoded(red_left_blue_right("CMYK"), "JPEG", quality=95)),
        ("palette png", lambda: encoded(red_left_blue_right("P"), "PNG")),
    ],
)
def test_colour_images_decode_to_rgb(name, data):
    image = decode_poster(data(), 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    left, right = image[:, :12].mean(axis=(0, 1)), image[:, 20:].mean(axis=(0, 1))
    assert left[0] > 150 and left[2] < 80, f"{name}: left half should stay red, got {left}"
    assert right[2] > 150 and right[0] < 80, f"{name}: right half should stay blue, got {right}"


def test_grey_image_becomes_three_equal_channels():
    grey = Image.fromarray(np.full((40, 30), 77, dtype=np.uint8), "L")
    image = decode_poster(encoded(grey, "JPEG", quality=100), 16)
    assert image.shape == (16, 16, 3)
    assert np.abs(image.astype(int) - 77).max() <= 2


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    image = decode_poster(encoded(rgba, "PNG"), 8)
    assert (image == 255).all()
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert (decode_poster(encoded(palette, "PNG", transparency=0), 8) == 255).all()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"this is not an image", "cannot decode"),
        (encoded(red_left_blue_right(size=(200, 300)), "JPEG")[:400], "cannot decode"),  # truncated
    ],
)
def test_bad_bytes_raise_decode_error(data, message):
    with pytest.raises(PosterDecodeError, match=message):
        decode_poster(data, 32)


def dds_header_only() -> bytes:
    """128 bytes that Pillow opens as a DDS texture and then cannot decode (it raises NotImplementedError)."""
    header = bytearray(128)
    header[:4] = b"DDS "
    struct.pack_into("<7I", header, 4, 124, 0x1007, 4, 4, 0, 0, 0)  # size, flags, height 4, width 4
    struct.pack_into("<2I4s", header, 76, 32, 0x4, b"ZZZZ")  # a pixel format with an unknown FourCC
    return bytes(header)


def test_any_decoder_failure_is_a_decode_error_of_that_poster():
    with pytest.raises(PosterDecodeError, match="cannot decode image: NotImplementedError"):
        decode_poster(dds_header_only(), 32)


def test_a_png_bomb_is_refused_from_its_header():
    bomb = io.BytesIO()
    Image.new("1", (13_000, 13_000)).save(bomb, "PNG")  # ~20 KB that would decode to 169 million pixels
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(PosterDecodeError, match="13000x13000 pixels is more than a poster's 40,000,000"):
        decode_poster(bomb.getvalue(), 32)


def test_model_input_is_normalised_channels_last():
    images = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    batch = to_model_input(images, PreprocessSpec(image_size=8))
    assert batch.shape == (2, 3, 8, 8)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    expected_red = (1.0 - IMAGENET_MEAN[0]) / 0.229
    assert torch.allclose(batch[:, 0], torch.full((2, 8, 8), expected_red), atol=1e-5)


def test_augmentation_keeps_shape_and_changes_pixels():
    torch.manual_seed(0)
    images = np.stack([decode_poster(encoded(red_left_blue_right(), "PNG"), 32)] * 4)
    augmented = augment_batch(images, training_augmentation(32))
    assert augmented.shape == images.shape and augmented.dtype == np.uint8
    assert not np.array_equal(augmented, images)


def test_resize_matches_pil_bilinear_within_a_grey_level():
    rgb = np.random.default_rng(0).integers(0, 256, (450, 300, 3), dtype=np.uint8)
    ours = resize_rgb(rgb, 224).astype(int)
    pil = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.Resampling.BILINEAR, reducing_gap=None))
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - pil.astype(int)).max() <= 1


def test_decoding_on_a_thread_pool_gives_the_same_batch():
    rng = np.random.default_rng(1)
    posters = [encoded(Image.fromarray(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)), "JPEG")
               for _ in range(6)]
    posters[3] = b"not an image"

    def batch() -> dict:
        return {"poster_uri": np.array([f"p{i}.jpg" for i in range(6)], dtype=object),
                "poster_bytes": np.array(posters, dtype=object),
                "status": np.array(["ok"] * 6, dtype=object), "error": np.array([None] * 6, dtype=object)}

    serial = decode_posters(batch(), image_size=32)
    with ThreadPoolExecutor(2) as pool:
        pooled = decode_posters(batch(), image_size=32, pool=pool)
    np.testing.assert_array_equal(serial["image"], pooled["image"])
    assert list(pooled["status"]) == ["ok", "ok", "ok", "unreadable_poster", "ok", "ok"]
    assert pooled["error"][3].startswith("p3.jpg: cannot decode image")


def test_resize_into_a_batch_row_writes_that_row_only():
    rgb = np.random.default_rng(2).integers(0, 256, (450, 300, 3), dtype=np.uint8)
    batch = np.zeros((3, 64, 64, 3), dtype=np.uint8)
    returned = resize_rgb(rgb, 64, out=batch[1])
    assert np.shares_memory(returned, batch[1])
    assert np.array_equal(batch[1], resize_rgb(rgb, 64))
    assert not batch[0].any() and not batch[2].any()


def test_poster_shaped_sizes_resize_decode_and_augment_to_height_by_width():
    rgb = np.random.default_rng(3).integers(0, 256, (450, 300, 3), dtype=np.uint8)
    ours = resize_rgb(rgb, (96, 64)).astype(int)
    pil = np.asarray(Image.fromarray(rgb).resize((64, 96), Image.Resampling.BILINEAR, reducing_gap=None))
    assert ours.shape == (96, 64, 3) and np.abs(ours - pil.astype(int)).max() <= 1
    poster = decode_poster(encoded(red_left_blue_right(), "PNG"), (48, 32))
    assert poster.shape == (48, 32, 3)
    assert poster[:, :8, 0].min() > 200 and poster[:, -8:, 2].min() > 200  # red stays left, blue right
    batch = decode_posters({"poster_uri": np.array(["a.png"], dtype=object),
                            "poster_bytes": np.array([encoded(red_left_blue_right(), "PNG")], dtype=object),
                            "status": np.array(["ok"], dtype=object), "error": np.array([None], dtype=object)},
                           image_size=(48, 32))
    np.testing.assert_array_equal(batch["image"][0], poster)
    torch.manual_seed(0)
    augmented = augment_batch(np.stack([poster] * 3), training_augmentation((48, 32)))
    assert augmented.shape == (3, 48, 32, 3)
    spec = PreprocessSpec(image_size=32, image_height=48)
    assert spec.shape == (48, 32) and to_model_input(torch.from_numpy(augmented), spec).shape == (3, 3, 48, 32)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.from_dict({"image_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}).shape == (32, 32)
