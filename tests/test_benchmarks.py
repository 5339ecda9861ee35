"""The benchmarks' arithmetic on given numbers, and that each script runs and prints its report.

They are what docs/performance.md's figures come from; these tests check the scripts, not the speeds (speed goals
are measured by running the benchmarks, not by timed tests). The runs check the report's form, never values the
script rounded for printing. benchmarks/gpu_check.py: tests/test_e2e_gpu.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "label_throughput.py"
TRAIN_SCRIPT = REPO / "benchmarks" / "train_throughput.py"
RATE = r"\d+\.\d posters/s"
MEASURED = rf"^{{name}} +{RATE} +peak RSS +\d+ MiB$"


@pytest.fixture(scope="module")
def label_bench():
    return load_benchmark("label_throughput")


@pytest.fixture(scope="module")
def train_bench():
    return load_benchmark("train_throughput")


# --- label_throughput's arithmetic ------------------------------------------------------------------------------


def test_ratios_are_the_medians_of_the_runs_not_ratios_of_medians(label_bench):
    # three runs, each (c) against the ceiling measured just before it; the third ceiling was slow
    found = label_bench.ratios(50.0, [(200.0, 150.0), (210.0, 160.0), (100.0, 90.0)])
    assert found.runs == pytest.approx((0.75, 160 / 210, 0.9))
    assert found.to_ceiling == pytest.approx(160 / 210)  # the median run; 150 / 200 would be a ratio of medians
    assert found.rate == 150.0 and found.to_peer == pytest.approx(3.0)
    assert label_bench.ratios(40.0, [(100.0, 60.0)]) == label_bench.Ratios(60.0, 0.6, (0.6,), 1.5)


def test_the_ratios_line_prints_each_runs_ratio_only_for_several_runs(label_bench):
    several = label_bench.Ratios(rate=150.0, to_ceiling=160 / 210, runs=(0.75, 160 / 210, 0.9), to_peer=3.0)
    assert label_bench.ratios_line("", several) == (
        "(c) = 150.0 posters/s: (c)/(a) = 0.76 (runs: 0.75, 0.76, 0.90)   (c)/(b) = 3.00")
    one = label_bench.Ratios(rate=60.0, to_ceiling=0.6, runs=(0.6,), to_peer=1.5)
    assert label_bench.ratios_line("without it ", one) == (
        "without it (c) = 60.0 posters/s: (c)/(a) = 0.60   (c)/(b) = 1.50")


def test_without_start_up_takes_the_fixed_cost_out_of_each_runs_time(label_bench):
    # 3000 posters at 150 and 160 posters/s took 20.0 and 18.75 s; less a 4 s fixed cost: 16.0 and 14.75 s
    steady = label_bench.steady_pairs([(200.0, 150.0), (210.0, 160.0)], fixed=4.0, scored=3000)
    assert steady == [(200.0, pytest.approx(187.5)), (210.0, pytest.approx(3000 / 14.75))]
    line = label_bench.without_start_up(50.0, [(200.0, 150.0), (210.0, 160.0)], fixed=4.0, scored=3000)
    assert line == label_bench.ratios_line("without it ", label_bench.ratios(50.0, steady))


def test_without_start_up_refuses_runs_no_longer_than_the_fixed_cost(label_bench):
    # 24 posters at 7.4 posters/s took 3.2 s, less than a 4 s fixed cost: no (negative) rate
    assert label_bench.steady_pairs([(200.0, 7.4)], fixed=4.0, scored=24) is None
    line = label_bench.without_start_up(50.0, [(200.0, 7.4)], fixed=4.0, scored=24)
    assert "too few posters" in line and "posters/s" not in line


def test_peak_rss_is_printed_in_mib_with_the_ratio_of_10n_to_n(label_bench):
    assert label_bench.rss_line(300 * 2**20, 330 * 2**20) == "peak RSS at N 300 MiB, at 10N 330 MiB: ratio 1.10"
    assert label_bench.measured_line("(a) ceiling: model alone", 256.25, 4 * 2**30) == (
        "(a) ceiling: model alone                    256.2 posters/s   peak RSS     4096 MiB")


# --- train_throughput's arithmetic ------------------------------------------------------------------------------


def test_the_training_ratio_compares_last_epochs(train_bench):
    # the plain loop's first epoch pays its start-up: only the last counts
    assert train_bench.ratio([10.0, 20.0, 25.0], 30.0) == pytest.approx(1.2)
    assert train_bench.plain_line([10.0, 25.04], 61.6) == (
        "(a) plain loop, 1 process   last epoch    25.0 samples/s   (every epoch: 10.0 25.0; 62 s in all)")
    assert train_bench.ray_train_line(2, 30.0, 80.2) == (
        "(b) Ray Train, 2 workers   last epoch    30.0 samples/s   (80 s in all, with start-up, validation and "
        "checkpoints)")


# --- the scripts run and print their reports --------------------------------------------------------------------


def report_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_label_benchmark_runs_and_prints_its_report():
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "cnn", "--posters", "16", "--repeats", "2",
                             "--scale"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = report_lines(result.stdout)
    expected = [
        r"^cnn, 16 posters of 300x450, batch \d+, precision auto, \d+ actor\(s\) x \d+ threads, \d+ CPUs, .+$",
        MEASURED.format(name=re.escape("(a) ceiling: model alone")),
        MEASURED.format(name=re.escape("(b) peer: DataLoader + PIL, fp32")),
        MEASURED.format(name=re.escape("(c) genre_pipeline label_catalog")),
        MEASURED.format(name=re.escape("(a) ceiling, run 2")),
        MEASURED.format(name=re.escape("(c) genre_pipeline label_catalog, run 2")),
        rf"^\(c\) = {RATE}: \(c\)/\(a\) = \d+\.\d\d \(runs: \d+\.\d\d, \d+\.\d\d\)   \(c\)/\(b\) = \d+\.\d\d$",
        r"^start-up \(the job on 8 posters\): \d+\.\d s; (without it .+|.+too few posters.+)$",
        MEASURED.format(name=re.escape("(c) at 10x = 160 posters")),
        r"^peak RSS at N \d+ MiB, at 10N \d+ MiB: ratio \d+\.\d\d$",
    ]
    assert len(lines) == len(expected), result.stdout
    for line, pattern in zip(lines, expected, strict=True):
        assert re.match(pattern, line), (pattern, line)
    rates = [float(rate) for rate in re.findall(r"(\d+\.\d) posters/s", result.stdout)]
    assert rates and min(rates) > 0, result.stdout  # every run scored posters


@pytest.mark.slow
def test_the_train_benchmark_runs_and_prints_both_loops_and_their_ratio():
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--arch", "cnn", "--movies", "40", "--epochs", "2",
                             "--batch-size", "8", "--image-size", "64"], capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = report_lines(result.stdout)
    expected = [
        r"^cnn at 64px, 40 movies, global batch 8, 2 epochs, \d+ CPUs, .+$",
        r"^\(a\) plain loop, 1 process   last epoch +\d+\.\d samples/s   "
        r"\(every epoch: \d+\.\d \d+\.\d; \d+ s in all\)$",
        r"^\(b\) Ray Train, 2 workers   last epoch +\d+\.\d samples/s   \(\d+ s in all, .+\)$",
        r"^\(b\)/\(a\) = \d+\.\d\d$",
    ]
    assert len(lines) == len(expected), result.stdout
    for line, pattern in zip(lines, expected, strict=True):
        assert re.match(pattern, line), (pattern, line)
    assert min(float(rate) for rate in re.findall(r"(\d+\.\d) samples/s", result.stdout)) > 0, result.stdout


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
