"""jobs/train_fusion_model.py run again under a run name: refused (exit 2, naming what differs) unless its
settings, data and embedding tables are those of the run's checkpoint, as jobs/train_genre_model.py refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_job

from genre_pipeline.data.catalog import write_catalog
from genre_pipeline.data.sample import build_sample_catalog
from genre_pipeline.genres import GENRES, encode_many
from genre_pipeline.model.checkpoints import read_meta
from genre_pipeline.signals.embeddings import EmbeddingMeta, write_embeddings

MOVIES = 120
DIMS = {"title": 6, "ratings": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """A catalogue and title and ratings tables whose vectors are noisy images of each movie's genres."""
    root = tmp_path_factory.mktemp("fusion-resume")
    table = build_sample_catalog(str(root), MOVIES, seed=5, poster_size=(24, 36))
    write_catalog(table, str(root / "catalog.parquet"))
    ids, targets = table["movie_id"].to_numpy(), encode_many(table["genres"].to_pylist(), GENRES)
    world = {"root": str(root), "catalog": str(root / "catalog.parquet")}
    for seed, (signal, dim) in enumerate(DIMS.items()):
        rng = np.random.default_rng(seed)
        vectors = targets @ rng.normal(size=(len(GENRES), dim)) + rng.normal(size=(len(ids), dim))
        meta = EmbeddingMeta(signal=signal, dim=dim, method="generated", params={"seed": seed},
                             source_fingerprint=f"test-{signal}", rows=len(ids))
        world[signal] = write_embeddings(str(root / "embeddings" / signal), ids, vectors, meta)
    return world


def command(world: dict[str, str], runs: Path, *extra: str) -> list[str]:
    """A quick run without the poster signal: no backbone to run."""
    return ["--catalog", world["catalog"], "--storage-path", str(runs), "--name", "rerun", "--no-poster",
            "--title-embeddings", world["title"], "--ratings-embeddings", world["ratings"], "--epochs", "3",
            "--num-workers", "1", "--cpus-per-worker", "0.5", "--val-fraction", "0.25", *extra]


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.slow
def test_a_fusion_run_is_rerun_only_with_its_settings_data_and_tables(ray_local, world, tmp_path, caplog):
    job = load_job("train_fusion_model")
    runs = tmp_path / "runs"
    assert job.main(command(world, runs)) == 0
    first = read_meta(str(runs / "rerun" / "model"))
    before = listing(runs)
    title_version = first.fusion["embeddings"]["title"]["version"]
    ratings_version = first.fusion["embeddings"]["ratings"]["version"]
    other_ratings = EmbeddingMeta(signal="ratings", dim=DIMS["ratings"], method="generated", params={"seed": 1},
                                  source_fingerprint="another-ratings-run", rows=MOVIES)
    ids = np.arange(1, MOVIES + 1)
    other = write_embeddings(str(tmp_path / "ratings"), ids, np.ones((MOVIES, DIMS["ratings"])), other_ratings)
    refused = {
        "hidden: 256 -> 64": ["--hidden", "64"],
        "epochs: 3 -> 4": ["--epochs", "4"],
        "data_fingerprint: ": ["--val-fraction", "0.3"],
        f"embeddings: {{'ratings': '{ratings_version}', 'title': '{title_version}'}} -> {{'ratings': "
        f"'{other_ratings.version}', 'title': '{title_version}'}}": ["--ratings-embeddings", other],
        "signals: ['title', 'ratings'] -> ['poster', 'title', 'ratings']": ["--poster"],
    }
    for difference, flags in refused.items():
        caplog.clear()
        assert job.main(command(world, runs, *flags)) == 2, difference
        assert difference in caplog.text and "another --name" in caplog.text, caplog.text
    assert listing(runs) == before  # nothing trained or published

    assert job.main(command(world, runs)) == 0  # its own settings, data and tables: it runs again
    again = read_meta(str(runs / "rerun" / "model"))
    assert (again.data_fingerprint, again.recipe, again.fusion["embeddings"]) == (
        first.data_fingerprint, first.recipe, first.fusion["embeddings"])
