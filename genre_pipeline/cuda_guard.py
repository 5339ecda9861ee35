"""Whether the GPU workers can run CUDA, checked when a GPU job starts.

A pod on a GPU node whose NVIDIA driver is older than the CUDA of the image's torch wheels schedules and starts
like any other; torch then fails at its first CUDA call, after the cluster is up and the data is read. So a job
that asks for GPUs first runs one tiny task per GPU node (`num_gpus=1`, pinned to the node) that asks torch
whether CUDA works and reads the node's driver version, and refuses to start (exit 2) when it does not, naming
the node, the driver it found ("no NVIDIA driver" when none) and the driver the image needs.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from genre_pipeline.errors import JobInputError

logger = logging.getLogger(__name__)

# The oldest Linux driver branch that runs each CUDA major release, with CUDA's minor-version compatibility
# (any 12.x runtime on R525+, any 13.x on R580+): what the image's torch wheels need from the node.
MINIMUM_DRIVER = {11: 450, 12: 525, 13: 580}
# How long the check waits for a GPU to run on: a joined cluster's GPU nodes are up (the job's resource check
# saw them), so a probe that cannot start within this is waiting for a GPU another job holds.
PROBE_TIMEOUT_SECONDS = 300.0
NO_DRIVER = "no NVIDIA driver"
PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")


class CudaUnavailableError(JobInputError, RuntimeError):
    """A GPU node on which the job's torch cannot use CUDA: a driver too old for the image, or none at all."""


@dataclass(frozen=True)
class GpuProbe:
    """What one GPU node's check found."""

    node: str  # the node's IP address
    cuda_available: bool  # torch.cuda.is_available() in a process Ray gave a GPU
    driver_version: str | None  # the NVIDIA driver, e.g. "535.183.01"; None: no driver was found
    torch_cuda: str | None  # torch.version.cuda, e.g. "13.0"; None: a CPU build of torch
    detail: str = ""  # torch's own warning when CUDA failed to initialise, if any


def driver_branch(version: str | None) -> int | None:
    """The driver's branch ("535.183.01" -> 535), or None when unknown."""
    found = re.match(r"(\d+)\.", version or "")
    return int(found.group(1)) if found else None


def minimum_driver(torch_cuda: str | None) -> int | None:
    """The oldest driver branch that runs this CUDA release, or None when unknown (or no CUDA)."""
    found = re.match(r"(\d+)\.", torch_cuda or "")
    return MINIMUM_DRIVER.get(int(found.group(1))) if found else None


def cuda_problem(probe: GpuProbe) -> str | None:
    """Why the job cannot use CUDA on this node, or None when it can."""
    if probe.cuda_available:
        return None
    found = f"driver {probe.driver_version}" if probe.driver_version else NO_DRIVER
    if probe.torch_cuda is None:
        return (f"GPU node {probe.node} ({found}): this image's torch is a CPU build; GPU workers need the GPU "
                "image (Dockerfile, TORCH=gpu)")
    needed = minimum_driver(probe.torch_cuda)
    branch = driver_branch(probe.driver_version)
    if probe.driver_version is None:
        why = ("the container sees no NVIDIA driver: run GPU workers on GPU nodes with the NVIDIA device plugin "
               "(or GPU operator) and an nvidia.com/gpu request")
    elif needed and branch is not None and branch < needed:
        why = (f"CUDA {probe.torch_cuda} needs driver R{needed} or newer: use GPU nodes with a newer driver, or "
               f"build the image for CUDA 12 (docker build --build-arg CUDA=cu128; runs on R{MINIMUM_DRIVER[12]}+)")
    else:
        why = "the driver is new enough, so the process does not see the GPU (device plugin, CUDA_VISIBLE_DEVICES)"
    detail = f" (torch: {probe.detail})" if probe.detail else ""
    return (f"CUDA is not available on GPU node {probe.node} ({found}; the image's torch is built for CUDA "
            f"{probe.torch_cuda}): {why}{detail}")


def driver_from_nvml() -> str | None:
    """The driver version from NVML (nvidia-ml-py, or the copy Ray ships for its own GPU detection)."""
    for module in ("pynvml", "ray._private.thirdparty.pynvml"):
        try:
            nvml = __import__(module, fromlist=["nvmlInit"])
        except ImportError:
            continue
        try:
            nvml.nvmlInit()
        except Exception:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no usable driver here
            return None
        try:
            version = nvml.nvmlSystemGetDriverVersion()
        finally:
            nvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    return None


def driver_from_proc(path: Path = PROC_DRIVER_VERSION) -> str | None:
    """The loaded kernel module's version: "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01 ..."."""
    try:
        text = path.read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else None


def driver_from_nvidia_smi() -> str | None:
    """nvidia-smi, which the NVIDIA container toolkit mounts into GPU containers."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


DRIVER_SOURCES: tuple[Callable[[], str | None], ...] = (driver_from_nvml, driver_from_proc, driver_from_nvidia_smi)


def read_driver_version(sources: Sequence[Callable[[], str | None]] = DRIVER_SOURCES) -> str | None:
    """The first driver version any source reports, or None when the node has no NVIDIA driver."""
    for source in sources:
        version = source()
        if version:
            return version
    return None


def probe_node() -> GpuProbe:
    """Run in a Ray task that holds one GPU: does torch see CUDA here, and which driver does the node have?"""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    detail = "; ".join(str(w.message).strip() for w in caught if "CUDA" in str(w.message))
    return GpuProbe(node=ray.util.get_node_ip_address(), cuda_available=available,
                    driver_version=read_driver_version(), torch_cuda=torch.version.cuda,
                    detail="" if available else detail)


def gpu_nodes() -> dict[str, str]:
    """Node id -> IP address of every live node that offers at least one whole GPU."""
    return {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in ray.nodes()
            if node.get("Alive") and node["Resources"].get("GPU", 0) >= 1}


def check_gpu_workers(timeout: float = PROBE_TIMEOUT_SECONDS) -> list[GpuProbe]:
    """Probe every GPU node of the live cluster once; raise CudaUnavailableError if any cannot run CUDA.

    A node whose GPUs are all held by another job within `timeout` is left unchecked (logged): the job's own
    start timeout then decides whether it can ever place its workers there."""
    nodes = gpu_nodes()
    if not nodes:
        raise CudaUnavailableError("no live Ray node offers a GPU to check CUDA on: give the cluster GPU workers, "
                                   "or run the job without GPUs")
    task = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(probe_node)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(): node_id
            for node_id in nodes}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    for ref in pending:
        ray.cancel(ref, force=True)
        logger.warning("CUDA not checked on GPU node %s: none of its GPUs was free within %.0f s",
                       nodes[refs[ref]], timeout)
    probes = ray.get(ready)
    problems = [problem for problem in map(cuda_problem, probes) if problem]
    if problems:
        raise CudaUnavailableError("; ".join(problems) + "; nothing was started (k8s/README.md, 'GPU drivers')")
    for probe in probes:
        logger.info("CUDA %s works on GPU node %s (driver %s)", probe.torch_cuda, probe.node, probe.driver_version)
    return probes

