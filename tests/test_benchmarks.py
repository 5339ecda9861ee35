"""The benchmarks run end to end and print the ratios their own measurements give.

They are what the README's Performance figures come from; these tests check the scripts, not the speeds (speed
goals are measured by running the benchmarks, not by timed tests). benchmarks/gpu_check.py: tests/test_gpu.py.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark, printed_ratio_tolerance

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "label_throughput.py"
TRAIN_SCRIPT = REPO / "benchmarks" / "train_throughput.py"
RATE = re.compile(r"^(\(.+?)\s+([\d.]+) posters/s\s+peak RSS\s+(\d+) MiB$")


def measurements(stdout: str) -> dict[str, list[tuple[float, int]]]:
    """(a), (b), (c) and the 10x run's posters/s and peak RSS, in the order printed."""
    found: dict[str, list[tuple[float, int]]] = {"a": [], "b": [], "c": [], "10x": []}
    for line in stdout.splitlines():
        match = RATE.match(line.strip())
        if match:
            name = "10x" if "at 10x" in match[1] else match[1][1]
            found[name].append((float(match[2]), int(match[3])))
    return found


@pytest.fixture(scope="module")
def run() -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "cnn", "--posters", "24", "--repeats", "2",
                             "--scale"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_every_measurement_is_printed_with_a_positive_rate_and_rss(run):
    found = measurements(run)
    assert [len(found[k]) for k in ("a", "b", "c", "10x")] == [2, 1, 2, 1], run
    for rate, rss in sum(found.values(), []):
        assert rate > 0 and rss > 100, run  # every run's process tree holds at least a Python with torch


@pytest.mark.slow
def test_ratios_are_the_medians_of_the_measured_runs(run):
    found = measurements(run)
    pairs = list(zip([a for a, _ in found["a"]], [c for c, _ in found["c"]], strict=True))
    summary = next(line for line in run.splitlines() if line.startswith("(c) = "))
    ratio_a, runs, ratio_b = re.search(r"\(c\)/\(a\) = ([\d.]+) \(runs: ([\d., ]+)\)\s+\(c\)/\(b\) = ([\d.]+)",
                                       summary).groups()
    assert [float(r) for r in runs.split(", ")] == [round(c / a, 2) for a, c in pairs]
    assert float(ratio_a) == pytest.approx(statistics.median(c / a for a, c in pairs), abs=0.006)
    median_c, b = statistics.median(c for _, c in pairs), found["b"][0][0]
    assert float(ratio_b) == pytest.approx(median_c / b, abs=printed_ratio_tolerance(median_c, b))


def test_without_start_up_takes_the_fixed_cost_out_of_each_runs_time():
    # 3000 posters at 150 and 160 posters/s with a 4 s fixed cost: 20.0 - 4 and 18.75 - 4 seconds remain.
    without_start_up = load_benchmark("label_throughput").without_start_up
    line = without_start_up(50.0, [(200.0, 150.0), (210.0, 160.0)], fixed=4.0, scored=3000)
    steady = [3000 / 16.0, 3000 / 14.75]
    assert line == (f"without it (c) = {statistics.median(steady):.1f} posters/s: (c)/(a) = "
                    f"{statistics.median([steady[0] / 200, steady[1] / 210]):.2f} (runs: "
                    f"{steady[0] / 200:.2f}, {steady[1] / 210:.2f})   (c)/(b) = {statistics.median(steady) / 50:.2f}")


def test_without_start_up_refuses_runs_no_longer_than_the_fixed_cost():
    # 24 posters at 7.4 posters/s took 3.2 s, less than a 4 s fixed cost: no (negative) rate.
    line = load_benchmark("label_throughput").without_start_up(50.0, [(200.0, 7.4)], fixed=4.0, scored=24)
    assert "too few posters" in line and "posters/s" not in line


@pytest.mark.slow
def test_scale_mode_compares_the_peak_rss_of_n_and_10n(run):
    found = measurements(run)
    rss_n, rss_10n = max(rss for _, rss in found["c"]), found["10x"][0][1]
    line = next(line for line in run.splitlines() if line.startswith("peak RSS at N"))
    printed_n, printed_10n, ratio = re.fullmatch(r"peak RSS at N (\d+) MiB, at 10N (\d+) MiB: ratio ([\d.]+)",
                                                 line).groups()
    assert (int(printed_n), int(printed_10n)) == (rss_n, rss_10n)
    assert float(ratio) == pytest.approx(rss_10n / rss_n, abs=0.011)  # MiB print rounded


@pytest.mark.slow
def test_train_benchmark_prints_both_loops_and_their_ratio():
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--arch", "cnn", "--movies", "40", "--epochs", "2",
                             "--batch-size", "8", "--image-size", "64"], capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    plain = re.search(r"^\(a\) plain loop.*last epoch\s+([\d.]+) samples/s\s+\(every epoch: ([\d. ]+);",
                      result.stdout, re.M)
    ray_train = re.search(r"^\(b\) Ray Train, 2 workers\s+last epoch\s+([\d.]+) samples/s", result.stdout, re.M)
    ratio = re.search(r"^\(b\)/\(a\) = ([\d.]+)$", result.stdout, re.M)
    assert plain and ray_train and ratio, result.stdout
    epochs = [float(rate) for rate in plain[2].split()]
    assert len(epochs) == 2 and epochs[-1] == float(plain[1]) and min(epochs) > 0
    a, b = float(plain[1]), float(ray_train[1])
    assert b > 0
    assert float(ratio[1]) == pytest.approx(b / a, abs=printed_ratio_tolerance(b, a))


def test_linear_probe_baseline_prints_both_threshold_rows(sample_catalog):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "linear_probe.py"), "--catalog",
                             str(sample_catalog), "--val-fraction", "0.25"], capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "features of" in result.stdout and "288x432 px" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("linear probe")]
    assert len(lines) == 2 and "threshold 0.3 (0.30)" in lines[0] and "micro-tuned" in lines[1]
    map_at_1 = [float(re.search(r"map_at_1=([\d.]+)", line)[1]) for line in lines]
    assert map_at_1[0] == map_at_1[1] > 0.6  # ranking ignores thresholds; frozen features see the sample's marks


def test_linear_probe_scores_a_one_class_genre_with_its_share():
    probe = load_benchmark("linear_probe")
    rng = np.random.default_rng(0)
    train_y = np.zeros((40, 3))
    train_y[:20, 0] = 1  # genre 0 learnable from feature 0; genre 1 never present; genre 2 always present
    train_y[:, 2] = 1
    train_x = rng.normal(size=(40, 4))
    train_x[:20, 0] += 3
    scores = probe.probe_scores(train_x, train_y, train_x[[0, 39]], c=1.0)
    assert scores[0, 0] > 0.8 > 0.2 > scores[1, 0]
    assert scores[:, 1].tolist() == [0.0, 0.0] and scores[:, 2].tolist() == [1.0, 1.0]
