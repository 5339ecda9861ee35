"""Training throughput: the Ray Train job with 2 workers against a plain single-process PyTorch loop.

    python benchmarks/train_throughput.py --arch cnn --movies 600 --epochs 3 --batch-size 32

Both train the same model (random initial weights, same seed) on the same generated posters (JPEGs of real
poster size, 300x450), with the same global batch, loss, optimiser and augmentation (decode, random resized
crop, flip, colour jitter), for the same epochs:
  (a) plain loop: one process, torch threads = cores; each batch is read, decoded and augmented in line;
  (b) genre_pipeline: `TorchTrainer` with 2 DDP workers (batch/2 each), fed by Ray Data's streaming
      decode+augment tasks, exactly as `jobs/train_genre_model.py` runs it.
Prints samples/s of each in the last epoch (the first pays start-up) and (b)/(a).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from genre_pipeline.data.catalog import write_catalog  # noqa: E402
from genre_pipeline.data.posters import fetch_posters  # noqa: E402
from genre_pipeline.data.sample import build_sample_catalog  # noqa: E402
from genre_pipeline.genres import GENRES, encode_many  # noqa: E402
from genre_pipeline.model.architectures import build_model, default_preprocess  # noqa: E402
from genre_pipeline.runtime import job_runtime_env  # noqa: E402
from genre_pipeline.train.driver import TrainJobConfig, build_trainer, loop_config  # noqa: E402
from genre_pipeline.train.loop import make_optimizer, train_one_epoch  # noqa: E402
from genre_pipeline.train.rows import (  # noqa: E402
    load_training_rows,
    prepare_training_batch,
    split_rows,
)

SEED = 0


def job_config(catalog: str, root: Path, args: argparse.Namespace) -> TrainJobConfig:
    return TrainJobConfig(catalog=catalog, storage_path=str(root / "runs"), name="bench", arch=args.arch,
                          epochs=args.epochs, batch_size=args.batch_size // args.workers, lr=1e-3,
                          num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                          val_fraction=args.val_fraction, image_size=args.image_size, class_weighting=True,
                          seed=SEED)


def plain_batches(rows: pa.Table, batch_size: int, image_size: int):
    """What a plain script does per step: read, decode and augment the batch's posters, in line."""
    targets = encode_many(rows["genres"].to_pylist(), GENRES)
    uris = rows["poster_uri"].to_pylist()
    order = np.random.default_rng(SEED).permutation(len(uris))
    for start in range(0, len(order), batch_size):
        picked = order[start:start + batch_size]
        batch = {"poster_uri": np.array([uris[i] for i in picked], dtype=object),
                 "target": targets[picked]}
        prepared = prepare_training_batch(fetch_posters(batch), image_size=image_size, augment=True)
        yield {"image": torch.from_numpy(prepared["image"]), "target": torch.from_numpy(prepared["target"])}


def plain_loop(config: TrainJobConfig, image_size: int) -> list[float]:
    """(a) samples/s of each epoch of the single-process loop."""
    torch.set_num_threads(os.cpu_count() or 1)
    train_rows, val_rows = split_rows(load_training_rows(config.catalog, config.storage_options),
                                      config.val_fraction)
    loop = loop_config(config, train_rows, val_rows)  # the job's own optimiser settings and class weights
    torch.manual_seed(SEED)
    model = build_model(arch=config.arch, num_genres=len(GENRES))
    optimizer, _ = make_optimizer(model, loop)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(loop.pos_weight))
    rates = []
    for _ in range(config.epochs):
        batches = plain_batches(train_rows, config.batch_size * config.num_workers, image_size)
        epoch = train_one_epoch(model, batches, optimizer, loss_fn, loop)
        rates.append(epoch.rows / epoch.seconds)
    return rates


def plain_line(rates: list[float], seconds: float) -> str:
    return (f"(a) plain loop, 1 process   last epoch {rates[-1]:7.1f} samples/s   (every epoch: "
            f"{' '.join(f'{r:.1f}' for r in rates)}; {seconds:.0f} s in all)")


def ray_train_line(workers: int, rate: float, seconds: float) -> str:
    return (f"(b) Ray Train, {workers} workers   last epoch {rate:7.1f} samples/s   "
            f"({seconds:.0f} s in all, with start-up, validation and checkpoints)")


def ratio(plain_rates: list[float], ray_rate: float) -> float:
    """(b)/(a) in the last epoch: the first epoch of each pays its start-up."""
    return ray_rate / plain_rates[-1]


def ray_train(config: TrainJobConfig) -> float:
    """(b) samples/s of the last epoch, as the job's workers report it (all workers' rows / rank 0's time)."""
    trainer, _ = build_trainer(config)
    return float(trainer.fit().metrics["train_samples_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["cnn", "resnet50"], default="cnn")
    parser.add_argument("--movies", type=int, default=600, help="generated movies (about 93%% have a poster)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split across the workers)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the arch's")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5,
                        help="Ray CPUs per worker; the rest is left to Ray Data's decode+augment tasks")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    args = parser.parse_args()
    args.image_size = args.image_size or default_preprocess(args.arch).image_size
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, runtime_env=job_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"{args.arch} at {args.image_size}px, {args.movies} movies, global batch {args.batch_size}, "
          f"{args.epochs} epochs, {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_catalog(build_sample_catalog(str(root / "sample"), args.movies, seed=1), str(root / "catalog.parquet"))
        config = job_config(str(root / "catalog.parquet"), root, args)
        started = time.perf_counter()
        a = plain_loop(config, args.image_size)
        print(plain_line(a, time.perf_counter() - started), flush=True)
        started = time.perf_counter()
        b = ray_train(config)
        print(ray_train_line(args.workers, b, time.perf_counter() - started), flush=True)
        print(f"(b)/(a) = {ratio(a, b):.2f}")


if __name__ == "__main__":
    main()
