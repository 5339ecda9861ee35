"""What each label-job worker process imports before its first task: every import is paid again in every new
worker of every night, so the modules that Ray Data's tasks and the labeller actors load stay free of what they
do not use (torch takes seconds, pyiceberg and sqlalchemy most of one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(name for name in ("torch", "pyiceberg", "sqlalchemy") if name in sys.modules)))
"""


def heavy_imports(module: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["genre_pipeline.label.incremental", "genre_pipeline.label.catalog_ids",
                                    "genre_pipeline.data.posters"])
def test_the_ray_data_tasks_modules_import_neither_torch_nor_the_table(module):
    assert heavy_imports(module) == []


def test_the_labeller_actor_imports_torch_but_not_the_table():
    assert heavy_imports("genre_pipeline.label.actor") == ["torch"]


def test_the_write_tasks_sink_imports_the_table_but_not_torch():
    assert heavy_imports("genre_pipeline.label.sink") == ["pyiceberg"]
