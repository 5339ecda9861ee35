"""Shared fixtures: one real local Ray for the session, small generated catalogues in tmp dirs."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without running C++ static destructors once the verdict is printed. Ray 2.60 keeps each session's
    OpenTelemetry metric reader thread running after ray.shutdown(); one that exports while the interpreter's
    exit destroys spdlog's registry segfaults the process (seen in CI: exit 139 after every test passed, the
    reader in OpenTelemetryMetricExporter::Export, the main thread in torch's static destructors)."""
    if EXIT_STATUS in config.stash and "ray" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])


def load_job(name: str) -> ModuleType:
    """The job `name`'s command module, genre_pipeline.commands.<name> (what jobs/<name>.py runs)."""
    return importlib.import_module(f"genre_pipeline.commands.{name}")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with this machine's 2 CPUs, shared by every test that needs one."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_catalog(tmp_path_factory) -> Path:
    """400 generated movies with small posters (the learnable sample), built once per session. 400, not fewer:
    its validation set (87 movies at --val-fraction 0.25) must tell a model that learned from the prior."""
    from genre_pipeline.data.catalog import write_catalog
    from genre_pipeline.data.sample import build_sample_catalog

    root = tmp_path_factory.mktemp("sample")
    table = build_sample_catalog(str(root), 400, seed=7, poster_size=(96, 144))
    write_catalog(table, str(root / "catalog.parquet"))
    return root / "catalog.parquet"


def save_random_model(directory: Path, *, image_size: int = 32, thresholds: list[float] | None = None,
                      epoch: int = 1) -> str:
    """A cnn checkpoint with seeded random weights: the label job's input when learning is not the point."""
    import torch

    from genre_pipeline.data.images import PreprocessSpec
    from genre_pipeline.genres import GENRES
    from genre_pipeline.model.architectures import build_model
    from genre_pipeline.model.checkpoints import ModelMeta, save_checkpoint

    torch.manual_seed(0)
    meta = ModelMeta(arch="cnn", genres=list(GENRES), preprocess=PreprocessSpec(image_size=image_size),
                     thresholds=thresholds or [0.5] * len(GENRES), epoch=epoch)
    save_checkpoint(directory, build_model(arch="cnn", num_genres=len(GENRES)), meta)
    return str(directory)


def write_sample_parts(root: Path, movies: int, parts: int, *, seed: int) -> str:
    """A generated catalogue written as `parts` Parquet files, as large catalogues are; returns its folder."""
    from genre_pipeline.data.catalog import write_catalog
    from genre_pipeline.data.sample import build_sample_catalog

    table = build_sample_catalog(str(root), movies, seed=seed, poster_size=(48, 72))
    rows = movies // parts
    for part in range(parts):
        write_catalog(table.slice(part * rows, rows), str(root / "catalog" / f"part-{part:02d}.parquet"))
    return str(root / "catalog")


def labels_table(output: Path | str):
    """The label job's Iceberg table under `output` (its embedded catalog)."""
    from genre_pipeline.label.table import TableSettings, load_table

    return load_table(TableSettings(str(output)))


def read_night(output: Path | str, run_date: str | None = None):
    """The rows of the night `run_date` (default: the latest) of the labels table under `output`."""
    from genre_pipeline.label.table import night_snapshot

    table = labels_table(output)
    return table.scan(snapshot_id=night_snapshot(table, run_date).snapshot_id).to_arrow()
