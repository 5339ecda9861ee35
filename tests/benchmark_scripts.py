"""The benchmark scripts, imported as modules: benchmarks/ is a folder of scripts, not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module, registered in sys.modules (its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def printed_ratio_tolerance(numerator: float, denominator: float) -> float:
    """How far a ratio printed to 0.01 may be from one recomputed from rates printed to 0.1."""
    return 0.005 + numerator / denominator * (0.05 / numerator + 0.05 / denominator)
