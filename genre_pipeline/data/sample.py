"""A deterministic synthetic catalogue whose posters carry learnable genre cues (demo and tests).

Each genre has its own colour and shape; a poster draws one mark per genre of the movie at a random place and
size over a noisy background, plus a grey distractor. A small CNN learns this in a few epochs; a model that
learns nothing scores like the frequency prior. Genre frequencies follow MovieLens-1M's, so the sample is
imbalanced like the real catalogue.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from genre_pipeline.data import storage
from genre_pipeline.data.catalog import CATALOG_SCHEMA
from genre_pipeline.genres import GENRES

# Fraction of MovieLens-1M movies carrying each genre (ML-1M order), rounded.
GENRE_FREQUENCY = (0.13, 0.07, 0.03, 0.07, 0.30, 0.06, 0.03, 0.41, 0.02, 0.01,
                   0.09, 0.03, 0.03, 0.12, 0.07, 0.13, 0.04, 0.02)
_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
            (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128))
_SHAPES = ("ellipse", "rectangle", "triangle", "bars", "diamond", "cross")
POSTER_SIZE = (300, 450)  # width, height: the size of MovieLens posters
MISSING_POSTER_FRACTION = 0.02  # like a real catalogue, a few movies have no poster yet
TEST_FRACTION = 0.2


def sample_genres(rng: np.random.Generator) -> list[str]:
    chosen = [g for g, p in zip(GENRES, GENRE_FREQUENCY, strict=True) if rng.random() < p]
    if not chosen:
        weights = np.asarray(GENRE_FREQUENCY) / sum(GENRE_FREQUENCY)
        chosen = [GENRES[rng.choice(len(GENRES), p=weights)]]
    return chosen


def _draw_mark(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    left, top, right, bottom = box
    cx, cy = (left + right) // 2, (top + bottom) // 2
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=colour)
    elif shape == "bars":
        step = max(2, (bottom - top) // 5)
        for y in range(top, bottom, 2 * step):
            draw.rectangle((left, y, right, y + step - 1), fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=colour)
    else:
        third_w, third_h = (right - left) // 3, (bottom - top) // 3
        draw.rectangle((left + third_w, top, right - third_w, bottom), fill=colour)
        draw.rectangle((left, top + third_h, right, bottom - third_h), fill=colour)


def _random_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    side = int(rng.uniform(0.22, 0.4) * width)
    left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    return left, top, left + side, top + side


def draw_poster(genres: Sequence[str], rng: np.random.Generator, size: tuple[int, int] = POSTER_SIZE) -> Image.Image:
    width, height = size
    base = rng.integers(10, 70, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    background = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    grey = int(rng.integers(90, 160))
    _draw_mark(draw, _SHAPES[int(rng.integers(len(_SHAPES)))], _random_box(rng, width, height), (grey,) * 3)
    for genre in genres:
        index = GENRES.index(genre)
        _draw_mark(draw, _SHAPES[index % len(_SHAPES)], _random_box(rng, width, height), _PALETTE[index])
    return image


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def split_of(movie_id: int) -> str:
    """Stable train/test assignment from a hash of the id, independent of catalogue order and size."""
    return "test" if zlib.crc32(f"split:{movie_id}".encode()) % 1000 < TEST_FRACTION * 1000 else "train"


def build_sample_catalog(
    out_dir: str, num_movies: int, *, seed: int = 0, poster_size: tuple[int, int] = POSTER_SIZE,
    options: storage.StorageOptions = storage.StorageOptions(),
) -> pa.Table:
    """Write posters under `<out_dir>/posters/` and return the catalogue table pointing at them."""
    posters = storage.join(out_dir, "posters")
    rows: dict[str, list] = {name: [] for name in CATALOG_SCHEMA.names}
    for movie_id in range(1, num_movies + 1):
        rng = np.random.default_rng([seed, movie_id])
        genres = sample_genres(rng)
        poster_uri = None
        if rng.random() >= MISSING_POSTER_FRACTION:
            poster_uri = storage.join(posters, f"{movie_id}.jpg")
            storage.write_bytes(poster_uri, jpeg_bytes(draw_poster(genres, rng, poster_size)), options)
        rows["movie_id"].append(movie_id)
        rows["title"].append(f"Sample Movie {movie_id}")
        rows["year"].append(int(rng.integers(1950, 2021)))
        rows["genres"].append(genres)
        rows["poster_uri"].append(poster_uri)
        rows["split"].append(split_of(movie_id))
    return pa.table(rows, schema=CATALOG_SCHEMA)
