"""What every job entry point shares: logging, Ray start-up, storage flags."""

from __future__ import annotations

import argparse
import logging
import os

import ray

from genre_pipeline.data.storage import StorageOptions

# For the processes that run torch (label actors, training workers), read when the process starts. glibc
# serves allocations over 32 MB (a batch's activations) with mmap in threads other than the main one, and Ray
# runs our code in such threads: each batch page-faulted and zeroed its activations afresh (a third of the
# CPU time, measured). One arena with high thresholds keeps freed buffers for the next batch. OpenMP threads
# spinning between forward passes would take the cores that decoding threads need.
KEEP_FREED_BYTES = 1 << 30  # glibc's mmap and trim thresholds for torch processes
TORCH_WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(KEEP_FREED_BYTES),
                    "MALLOC_TRIM_THRESHOLD_": str(KEEP_FREED_BYTES), "OMP_WAIT_POLICY": "PASSIVE"}


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray() -> None:
    """Join the cluster under `ray job submit` (RAY_ADDRESS is set) or start a local Ray on a laptop.

    Object-store credentials are deliberately not forwarded in a `runtime_env`: Ray keeps runtime envs in its job
    table and shows and logs them (dashboard, raylet logs). A local Ray's workers inherit this process's
    environment, AWS_* included; on a cluster each node takes them from its own AWS chain (the pods' Secret, an
    instance or pod role). The endpoint, region and `--anonymous` travel with the jobs' StorageOptions.
    """
    if ray.is_initialized():
        return
    # Jobs log their own progress; Ray Data's per-operator progress bars would flood CI logs and job logs.
    ray.data.DataContext.get_current().enable_progress_bars = bool(os.environ.get("GENRE_PIPELINE_PROGRESS"))
    ray.init(log_to_driver=True)


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("object storage (credentials come from the standard AWS chain)")
    group.add_argument("--endpoint-url", default=None,
                       help="S3-compatible endpoint (MinIO, moto, ...); default: AWS_ENDPOINT_URL or AWS itself")
    group.add_argument("--anonymous", action="store_true", help="unsigned requests, for public buckets")
    group.add_argument("--region", default=None, help="S3 region; default: the AWS chain's")


def storage_options_from(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(endpoint_url=args.endpoint_url, anonymous=args.anonymous, region=args.region)
