"""Shared fixtures: one real local Ray for the session, small generated catalogues in tmp dirs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_job(name: str) -> ModuleType:
    """Import jobs/<name>.py as a module (jobs/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
    """200 generated movies with small posters (the learnable sample), built once per session."""
    from genre_pipeline.catalog import write_catalog
    from genre_pipeline.sample import build_sample_catalog

    root = tmp_path_factory.mktemp("sample")
    table = build_sample_catalog(str(root), 200, seed=7, poster_size=(96, 144))
    write_catalog(table, str(root / "catalog.parquet"))
    return root / "catalog.parquet"
