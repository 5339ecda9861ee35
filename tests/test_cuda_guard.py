"""The CUDA-driver guard: its decisions from given probes (no GPU needed), where it reads the driver version, and
the three GPU jobs refusing to start (exit 2, naming the driver found) on a real local Ray whose one GPU is only
declared (`ray.init(num_gpus=1)` on a CPU machine): Ray schedules the probe on it, and torch finds no CUDA there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO, save_random_model, write_sample_parts

from genre_pipeline.cuda_guard import (
    NO_DRIVER,
    CudaUnavailableError,
    GpuProbe,
    check_gpu_workers,
    cuda_problem,
    driver_branch,
    driver_from_proc,
    minimum_driver,
    read_driver_version,
)
from genre_pipeline.errors import JobInputError

NODE = "10.0.3.7"


def probe(**changes) -> GpuProbe:
    fields = {"node": NODE, "cuda_available": False, "driver_version": None, "torch_cuda": "13.0"}
    return GpuProbe(**(fields | changes))


# ---------------------------------------------------------------- decisions


def test_a_node_where_cuda_works_passes_whatever_the_driver():
    assert cuda_problem(probe(cuda_available=True, driver_version="580.65.06")) is None
    # CUDA working is what counts: a forward-compatible setup on an older branch passes too
    assert cuda_problem(probe(cuda_available=True, driver_version="535.183.01")) is None


def test_a_driver_older_than_the_images_cuda_names_both_and_the_cu12_build():
    problem = cuda_problem(probe(driver_version="535.183.01", detail="The NVIDIA driver on your system is too old"))
    assert problem.startswith(f"CUDA is not available on GPU node {NODE} (driver 535.183.01; the image's torch is "
                              "built for CUDA 13.0): CUDA 13.0 needs driver R580 or newer"), problem
    assert "--build-arg CUDA=cu128; runs on R525+" in problem
    assert problem.endswith("(torch: The NVIDIA driver on your system is too old)")
    # a CUDA 12 image runs on the same node's R535
    assert "needs driver" not in cuda_problem(probe(driver_version="535.183.01", torch_cuda="12.8"))


def test_no_driver_at_all_says_so():
    problem = cuda_problem(probe(driver_version=None))
    assert f"({NO_DRIVER}; the image's torch is built for CUDA 13.0)" in problem
    assert "the container sees no NVIDIA driver" in problem and "nvidia.com/gpu" in problem


def test_a_new_enough_driver_without_cuda_points_at_the_device_not_the_driver():
    problem = cuda_problem(probe(driver_version="580.65.06"))
    assert "(driver 580.65.06;" in problem and "needs driver" not in problem
    assert "does not see the GPU" in problem


def test_a_cpu_build_of_torch_on_a_gpu_node_names_the_image():
    problem = cuda_problem(probe(torch_cuda=None, driver_version="580.65.06"))
    assert problem == (f"GPU node {NODE} (driver 580.65.06): this image's torch is a CPU build; GPU workers need the "
                       "GPU image (Dockerfile, TORCH=gpu)")


@pytest.mark.parametrize(("torch_cuda", "branch"), [("13.0", 580), ("13.2", 580), ("12.8", 525), ("12.6", 525),
                                                    ("11.8", 450), ("14.0", None), (None, None), ("", None)])
def test_minimum_driver_per_cuda_release(torch_cuda, branch):
    assert minimum_driver(torch_cuda) == branch


def test_driver_branch():
    assert driver_branch("535.183.01") == 535
    assert driver_branch("580.65.06") == 580
    assert driver_branch(None) is None and driver_branch("unknown") is None


# ---------------------------------------------------------------- where the driver version comes from


def test_the_kernel_modules_version_file_is_read_in_both_formats(tmp_path):
    proprietary = tmp_path / "proprietary"
    proprietary.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
                           "GCC version:  gcc version 11.4.0\n")
    assert driver_from_proc(proprietary) == "535.183.01"
    open_module = tmp_path / "open"
    open_module.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
                           "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 07:09:27 UTC 2025\n")
    assert driver_from_proc(open_module) == "580.65.06"
    assert driver_from_proc(tmp_path / "missing") is None


def test_the_first_source_that_knows_the_driver_wins():
    calls = []

    def source(answer):
        def read():
            calls.append(answer)
            return answer
        return read

    assert read_driver_version([source(None), source("550.127.05"), source("999.0")]) == "550.127.05"
    assert calls == [None, "550.127.05"]  # later sources are not asked
    assert read_driver_version([source(None), source("")]) is None


def test_the_error_is_a_job_input_error_so_the_jobs_exit_2():
    assert issubclass(CudaUnavailableError, JobInputError)


def test_a_cluster_without_gpus_cannot_be_checked(ray_local):
    with pytest.raises(CudaUnavailableError, match="no live Ray node offers a GPU to check CUDA on"):
        check_gpu_workers(timeout=1)


# ---------------------------------------------------------------- the jobs, on a Ray with one declared GPU

# A driver of its own (the tests' session Ray stays as it is): a local Ray that declares one GPU, then each GPU
# job's main() as its entry point runs it, with what each logged at ERROR; then the guard while another task
# holds the GPU. RESULT is the last line.
DRIVER = textwrap.dedent("""
    import json, logging, os, sys
    sys.path.insert(0, "tests")
    import ray
    from conftest import load_job
    from genre_pipeline.cuda_guard import check_gpu_workers

    class Errors(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []
        def emit(self, record):
            self.messages.append((record.levelname, record.getMessage()))

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    for job, argv in json.loads(sys.argv[1]).items():
        handler = Errors()
        logging.getLogger().addHandler(handler)
        try:
            results[job] = {"code": load_job(job).main(argv), "logged": handler.messages}
        finally:
            logging.getLogger().removeHandler(handler)

    @ray.remote(num_gpus=1, num_cpus=0)
    class Holder:
        def ready(self):
            return True
    holder = Holder.remote()
    ray.get(holder.ready.remote())
    handler = Errors()
    logging.getLogger().addHandler(handler)
    results["held"] = {"probes": len(check_gpu_workers(timeout=2)), "logged": handler.messages}
    print("RESULT " + json.dumps(results), flush=True)
    os._exit(0)  # past Ray's exporter threads (conftest.pytest_unconfigure)
""")


@pytest.fixture(scope="module")
def jobs_on_a_declared_gpu(tmp_path_factory) -> dict:
    from genre_pipeline.data.catalog import read_catalog
    from genre_pipeline.signals.embeddings import EmbeddingMeta, write_embeddings

    root = tmp_path_factory.mktemp("declared-gpu")
    catalog = write_sample_parts(root, 40, 1, seed=5)
    ids = read_catalog(catalog)["movie_id"].to_numpy()
    meta = EmbeddingMeta(signal="title", dim=4, method="generated", params={}, source_fingerprint="test-title",
                         rows=len(ids))
    titles = write_embeddings(str(root / "titles"), ids, np.random.default_rng(0).normal(size=(len(ids), 4)), meta)
    gpu_training = ["--num-workers", "1", "--cpus-per-worker", "1", "--use-gpu", "--epochs", "1", "--image-size",
                    "32", "--val-fraction", "0.25", "--storage-path", str(root / "runs")]
    argv = {
        "label_catalog": ["--catalog", catalog, "--model", save_random_model(root / "model"), "--output",
                          str(root / "labels"), "--run-date", "2026-01-01", "--actors", "1",
                          "--num-gpus-per-actor", "1"],
        "train_genre_model": ["--catalog", catalog, "--name", "gpu", "--arch", "cnn", "--no-pretrained",
                              *gpu_training],
        "train_fusion_model": ["--catalog", catalog, "--name", "fusion", "--title-embeddings", titles,
                               *gpu_training],
    }
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"driver failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow
@pytest.mark.parametrize("job", ["label_catalog", "train_genre_model", "train_fusion_model"])
def test_each_gpu_job_exits_2_naming_the_driver_it_found(jobs_on_a_declared_gpu, job):
    outcome = jobs_on_a_declared_gpu[job]
    errors = [message for level, message in outcome["logged"] if level == "ERROR"]
    assert outcome["code"] == 2, outcome
    (error,) = errors
    assert error.startswith("CUDA is not available on GPU node "), error
    assert f"({NO_DRIVER}; the image's torch is built for CUDA " in error, error
    assert error.endswith("nothing was started (k8s/README.md, 'GPU drivers')"), error


@pytest.mark.slow
def test_a_gpu_another_job_holds_is_left_unchecked_not_waited_for(jobs_on_a_declared_gpu):
    held = jobs_on_a_declared_gpu["held"]
    assert held["probes"] == 0
    assert any(level == "WARNING" and "CUDA not checked on GPU node" in message and "within 2 s" in message
               for level, message in held["logged"]), held

