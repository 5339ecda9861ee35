r"""Promote a published model version: point `<registry>/production` at it, for the nightly label job.

    python jobs/promote_model.py --registry s3://bucket/models \
        --version s3://bucket/runs/genre-lite2/versions/<model_version>

Copies nothing. The version is checked first (its meta.json reads and records a full weights sha256, which its
weights match, as the label job checks them), then `<registry>/production/pointer.json` names it, with that
digest, in one atomic write. The label job's `--model s3://bucket/models/production` then reads that version
until the next promotion, whatever training runs publish meanwhile. Given a model folder with a pointer (e.g.
runs/<name>/model), the version it names now is promoted, never the folder. Exit 0 when promoted; 2 when the
version cannot be used (missing, unreadable, changed after publishing, or a checkpoint from before full digests
were recorded: re-publish it first); the previous promotion then stays.
"""

from __future__ import annotations

import argparse
import logging
import os

from genre_pipeline.cli import add_storage_flags, storage_options_from
from genre_pipeline.data import storage
from genre_pipeline.model.checkpoints import POINTER_FILE, pin_model, write_pointer
from genre_pipeline.runtime import run_job

logger = logging.getLogger("promote_model")

STAGE = "production"  # the folder under --registry that the nightly label job's MODEL_URI names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", required=True, help=f"folder holding the promoted pointer, {STAGE}/{POINTER_FILE}")
    p.add_argument("--version", required=True,
                   help="the published version to promote: <storage-path>/<name>/versions/<model_version>")
    add_storage_flags(p)
    return p


def promote(version: str, registry: str, options: storage.StorageOptions = storage.StorageOptions()) -> str:
    """Verify `version` (meta and weights digest), then write `<registry>/production/pointer.json` naming it.
    Returns the pointer's URI."""
    pinned = pin_model(version, options)  # CheckpointError (exit 2) when unreadable, tampered with or unpinnable
    target = pinned.uri if "://" in pinned.uri else os.path.abspath(pinned.uri)
    return write_pointer(storage.join(registry, STAGE), target, pinned.meta, options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        pointer_uri = promote(args.version, args.registry, storage_options_from(args))
        print(f"promoted {args.version} -> {pointer_uri}")

    return run_job(body, logger=logger)

