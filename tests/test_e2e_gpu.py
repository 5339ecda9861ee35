"""CUDA: prediction agrees with the CPU, training steps run, and benchmarks/gpu_check.py passes.

The `gpu` tests compare CUDA's output with the CPU's and skip, saying so, where there is no CUDA device. The others
run everywhere: the GPU check's whole logic on the CPU (so a session on a lent GPU meets only CUDA's own problems),
that its comparison fails on scores that differ, and that the script says so and exits 3 without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

from genre_pipeline.genres import GENRES
from genre_pipeline.model.predictor import load_predictor

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the gpu tests run on CUDA and compare it with the CPU")
SMALL = 64  # model input side: enough for the models' pooling, small enough to keep the CPU reference quick


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return load_benchmark("gpu_check")


@pytest.fixture(scope="module")
def posters(gpu_check, tmp_path_factory):
    """16 generated posters of real size, decoded at SMALL, and a random-weight cnn checkpoint."""
    built = gpu_check.make_posters(tmp_path_factory.mktemp("gpu"), "cnn", 16, image_size=SMALL)
    return built, gpu_check.decode_many(built.read_all(), SMALL, workers=2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["cnn", "resnet50"])
def test_predictor_on_cuda_agrees_with_cpu(gpu_check, posters, tmp_path, arch):
    built, images = posters
    model_uri = built.model_uri if arch == "cnn" else gpu_check.make_posters(tmp_path, arch, 1, SMALL).model_uri
    check = gpu_check.predict_check(model_uri, images, torch.device("cuda"))
    assert check.passed, check.detail


@pytest.mark.gpu
@needs_cuda
def test_fp32_scores_on_cuda_match_the_cpus(gpu_check, posters):
    built, images = posters
    on_cpu = load_predictor(built.model_uri, device="cpu", precision="fp32")
    on_cuda = load_predictor(built.model_uri, device="cuda", precision="fp32")
    assert on_cuda.device.type == "cuda" and all(p.is_cuda for p in on_cuda.model.parameters())
    assert on_cpu.device.type == "cpu" and not any(p.is_cuda for p in on_cpu.model.parameters())
    expected = on_cpu.predict(images)
    with gpu_check.strict_fp32():  # TF32 (cuDNN's default) would round the convolutions' inputs
        got = on_cuda.predict(images)
    assert got.shape == expected.shape == (len(images), len(GENRES))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert not np.allclose(expected, expected.mean())  # scores that vary: the comparison can see a difference


@pytest.mark.gpu
@needs_cuda
def test_training_steps_on_cuda_are_finite_and_lower_the_loss(gpu_check, posters):
    built, images = posters
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = gpu_check.training_model("cnn", device)
    batch, target = torch.from_numpy(images).to(device), torch.from_numpy(built.targets).to(device)
    losses = gpu_check.train_steps(model, batch, target, built.spec, steps=10)
    assert np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0], losses  # a fixed batch: ten AdamW steps must fit it better


@pytest.mark.gpu
@needs_cuda
def test_one_fp32_training_step_matches_the_cpu(gpu_check, posters):
    built, images = posters
    check = gpu_check.train_step_check("cnn", images[:8], built.targets[:8], built.spec, torch.device("cuda"))
    assert check.passed, check.detail


@pytest.mark.gpu
@needs_cuda
def test_gpu_check_script_passes(gpu_check, capsys):
    code = gpu_check.main(["--arch", "cnn", "--posters", "16", "--batch-size", "8", "--image-size", str(SMALL),
                           "--train-batch-size", "8", "--train-steps", "2"])
    out = capsys.readouterr().out
    assert code == gpu_check.EXIT_OK, out
    for line in ("GPU ", "ceiling:", "end to end:", "check predict:", "check train step:", "all 2 checks passed"):
        assert line in out, out


def test_gpu_check_runs_every_measurement_and_check_on_a_cpu(gpu_check, capsys):
    """The script's whole logic; on a CPU its comparisons are the CPU against itself, so they prove nothing here
    (the `gpu` tests above compare CUDA with the CPU)."""
    args = gpu_check.parse_args(["--arch", "cnn", "--posters", "12", "--batch-size", "4", "--image-size", str(SMALL),
                                 "--train-batch-size", "4", "--train-steps", "1"])
    checks = gpu_check.run(args, torch.device("cpu"))
    out = capsys.readouterr().out
    assert [check.name for check in checks] == ["predict", "train step"], out
    assert checks[0].detail.startswith("cpu vs cpu on 12 posters: max |score diff| "), checks[0].detail
    for line in ("device cpu (no GPU)", "ceiling: GenrePredictor.predict on cpu", "CPU decode + resize from memory:",
                 "end to end: read + CPU decode", "JPEG decode + antialiased resize on cpu", "training on cpu"):
        assert line in out, out


def test_the_predict_check_fails_when_the_devices_scores_differ(gpu_check, posters, monkeypatch):
    """The comparison itself: scores moved on the checked device by more than MAX_SCORE_DIFF fail the check."""
    built, images = posters

    def shifted(*args, precision: str = "auto", **kwargs):
        """Scores 0.2 higher, except for the CPU reference (which predict_check asks for in fp32)."""
        predictor = load_predictor(*args, precision=precision, **kwargs)
        shift = np.float32(0.0 if precision == "fp32" else 0.2)
        unshifted = predictor.predict
        predictor.predict = lambda batch: unshifted(batch) + shift
        return predictor

    assert gpu_check.predict_check(built.model_uri, images, torch.device("cpu")).passed
    monkeypatch.setattr(gpu_check, "load_predictor", shifted)
    check = gpu_check.predict_check(built.model_uri, images, torch.device("cpu"))
    assert not check.passed, check.detail
    assert "max |score diff| 0.2000" in check.detail, check.detail


def test_gpu_check_without_cuda_says_so_and_exits_3():
    # Hide any GPU so this holds on every machine: the script must be harmless to call from CPU-only CI.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(SCRIPT), "--posters", "4"], capture_output=True, text=True,
                            env=env, timeout=300, cwd=REPO)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.strip() == "no CUDA device: nothing to check", result.stdout + result.stderr
