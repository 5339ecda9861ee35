"""Labelling throughput: genre_pipeline against the model's ceiling and a plain-PyTorch peer, in one run.

    python benchmarks/label_throughput.py --arch cnn --posters 2000
    python benchmarks/label_throughput.py --arch resnet50 --posters 300 --scale   # also 10x posters: peak RSS

On the same generated posters (JPEGs of real poster size, 300x450) and the same randomly initialised model:
  (a) ceiling: the model alone, forward passes on preloaded tensors, at the job's batch size and settings;
  (b) peer: the plain script users write instead: a DataLoader with PIL decoding, one worker per core, fp32,
      default memory format, writing the same Parquet;
  (c) genre_pipeline: `label_catalog`, Parquet in, Parquet out, on a local Ray that has run one small job
      before (Ray Data starts its own actors on a Ray's first job: a cluster has them from its first night).
Prints posters/s for each, (c)/(a), (c)/(b) and peak RSS of each run's process tree (driver plus workers).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from genre_pipeline.cluster import ActorResources  # noqa: E402
from genre_pipeline.data.catalog import write_catalog  # noqa: E402
from genre_pipeline.data.images import PreprocessSpec, decode_poster  # noqa: E402
from genre_pipeline.data.sample import build_sample_catalog  # noqa: E402
from genre_pipeline.genres import GENRES  # noqa: E402
from genre_pipeline.label.night import label_catalog  # noqa: E402
from genre_pipeline.label.pipeline import LabelConfig, resolve_actor_resources, resolve_batch_size  # noqa: E402
from genre_pipeline.model.architectures import build_model, default_preprocess  # noqa: E402
from genre_pipeline.model.checkpoints import ModelMeta, load_checkpoint, save_checkpoint  # noqa: E402
from genre_pipeline.model.predictor import PRECISIONS, load_predictor  # noqa: E402
from genre_pipeline.runtime import job_runtime_env  # noqa: E402

MIB = 2**20


class PeakRss:
    """Peak summed RSS of this process and all its descendants (Ray workers included), sampled every 100 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, tree_rss(os.getpid()))


def tree_rss(root: int) -> int:
    """Bytes: every process whose ancestry reaches `root` (Ray's raylet and workers descend from the driver)."""
    parents, rss = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False

    return sum(size for pid, size in rss.items() if descends(pid))


def make_inputs(root: Path, arch: str, posters: int, *, model: bool = True) -> tuple[str, str]:
    table = build_sample_catalog(str(root), posters, seed=1)
    write_catalog(table, str(root / "catalog.parquet"))
    if not model:
        return str(root / "catalog.parquet"), ""
    torch.manual_seed(0)  # the same weights in every run
    meta = ModelMeta(arch=arch, genres=list(GENRES), preprocess=default_preprocess(arch),
                     thresholds=[0.3] * len(GENRES))
    save_checkpoint(root / "model", build_model(arch=arch, num_genres=len(GENRES)), meta)
    return str(root / "catalog.parquet"), str(root / "model")


def job_config(catalog: str, model: str, out: Path, args: argparse.Namespace) -> LabelConfig:
    """The label job exactly as `jobs/label_catalog.py --full` would run it with these flags: every run scores
    every poster (a repeated night would otherwise carry the unchanged rows over)."""
    return LabelConfig(catalog=catalog, model=model, output=str(out / "labels"), run_date="2026-01-01",
                       batch_size=args.batch_size, actors=args.actors, precision=args.precision, full=True)


def ceiling(config: LabelConfig, resources: ActorResources) -> float:
    """(a) The model alone on preloaded, decoded posters, as one PosterLabeller actor runs it (same threads,
    batch size and precision), times the job's actors: single-threaded processes scoring at once each keep the
    speed of one alone (docs/performance.md)."""
    predictor = load_predictor(config.model, num_threads=resources.threads, precision=config.precision)
    size, batch_size = predictor.spec.shape, resolve_batch_size(config)
    uris = [u for u in pq.read_table(config.catalog, columns=["poster_uri"])["poster_uri"].to_pylist() if u]
    images = np.stack([decode_poster(Path(u).read_bytes(), size) for u in uris])
    predictor.predict(images[:batch_size])  # warm-up: first-call allocations
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        predictor.predict(images[start:start + batch_size])
    return resources.actors * len(images) / (time.perf_counter() - started)


class PosterFiles(torch.utils.data.Dataset):
    """The peer's dataset: PIL decode, resize, normalise, one poster at a time."""

    def __init__(self, uris: list[str], spec: PreprocessSpec) -> None:
        self.uris, self.spec = uris, spec

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.uris[index]) as image:
            rgb = image.convert("RGB").resize(self.spec.shape[::-1])
        array = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (array - torch.tensor(self.spec.mean).view(3, 1, 1)) / torch.tensor(self.spec.std).view(3, 1, 1)


def peer(catalog: str, model_uri: str, batch_size: int, out: Path) -> float:
    """(b) The plain PyTorch script: DataLoader, a worker per core, fp32, default memory format."""
    started = time.perf_counter()
    model, meta = load_checkpoint(model_uri)
    rows = pq.read_table(catalog, columns=["movie_id", "poster_uri"]).to_pylist()
    rows = [r for r in rows if r["poster_uri"]]
    loader = torch.utils.data.DataLoader(PosterFiles([r["poster_uri"] for r in rows], meta.preprocess),
                                         batch_size=batch_size, num_workers=os.cpu_count())
    scores = []
    with torch.no_grad():
        for batch in loader:
            scores.append(torch.sigmoid(model(batch)).numpy())
    matrix = np.concatenate(scores)
    table = pa.table({"movie_id": [r["movie_id"] for r in rows],
                      **{g: matrix[:, i] for i, g in enumerate(meta.genres)}})
    pq.write_table(table, out / "peer.parquet")
    return len(rows) / (time.perf_counter() - started)


def pipeline(config: LabelConfig) -> float:
    """(c) label_catalog end to end, start-up included (Ray and Ray Data's own actors are already running, as on
    a cluster after its first job)."""
    summary = label_catalog(config)
    return summary.rows_by_status.get("ok", 0) / summary.seconds


def start_up_seconds(root: Path, model: str, args: argparse.Namespace, actors: int) -> float:
    """The job's fixed cost (checks, actor start, model load, first read, commit): its time for 8 posters with
    the measured run's pool size."""
    catalog, _ = make_inputs(root, args.arch, 8, model=False)
    return label_catalog(replace(job_config(catalog, model, root, args), actors=actors)).seconds


def in_fresh_process(function: Callable[..., float], *args: object) -> float:
    """Run (a) or (b) in a process of its own. (c)'s driver is this process and its peak RSS counts it: what the
    ceiling's preloaded posters leave in this heap would count in (c), and again in each of the peer's DataLoader
    workers forked from it in (b) (docs/performance.md, Memory)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def measured_line(name: str, rate: float, peak_bytes: int) -> str:
    return f"{name:<40} {rate:8.1f} posters/s   peak RSS {peak_bytes / MIB:8.0f} MiB"


def measured(name: str, run: Callable[[], float]) -> tuple[float, int]:
    with PeakRss() as rss:
        rate = run()
    print(measured_line(name, rate, rss.peak), flush=True)
    return rate, rss.peak


def measure_all(config: LabelConfig, resources: ActorResources, catalog: str, model: str, root: Path,
                args: argparse.Namespace) -> tuple[float, list[tuple[float, float]], int]:
    """(b), then (a) and (c) --repeats times in turn (a VM's speed drifts between minutes: each (c) is compared
    with the ceiling measured just before it); returns (b), the (a, c) pairs and (c)'s peak RSS."""
    pairs, peak = [], 0
    a, _ = measured("(a) ceiling: model alone", lambda: in_fresh_process(ceiling, config, resources))
    b, _ = measured("(b) peer: DataLoader + PIL, fp32",
                    lambda: in_fresh_process(peer, catalog, model, resolve_batch_size(config), root))
    # Ray Data starts its own actors (stats, autoscaling, actor locations) on a Ray's first job and keeps them:
    # one small job first, so (c) is a job on a running cluster, as every night after the first.
    start_up_seconds(root / "warm-up", model, args, resources.actors)
    for run in range(1, args.repeats + 1):
        if run > 1:
            a, _ = measured(f"(a) ceiling, run {run}", lambda: in_fresh_process(ceiling, config, resources))
        c, rss = measured("(c) genre_pipeline label_catalog" + (f", run {run}" if run > 1 else ""),
                          lambda: pipeline(config))
        pairs.append((a, c))
        peak = max(peak, rss)
    return b, pairs, peak


@dataclass(frozen=True)
class Ratios:
    """(c) against (a) and (b) over one or more runs."""

    rate: float  # median (c), posters/s
    to_ceiling: float  # median of the runs' (c)/(a)
    runs: tuple[float, ...]  # each run's (c)/(a), against the ceiling measured just before it
    to_peer: float  # median (c) / (b)


def ratios(b: float, pairs: Sequence[tuple[float, float]]) -> Ratios:
    """The (a, c) pairs' ratios; medians, so one disturbed run moves them least."""
    runs = tuple(c / a for a, c in pairs)
    rate = statistics.median(c for _, c in pairs)
    return Ratios(rate, statistics.median(runs), runs, rate / b)


def ratios_line(label: str, found: Ratios) -> str:
    """(c) and its ratios to (a) and (b); with several runs, each run's (c)/(a) too."""
    runs = f" (runs: {', '.join(f'{r:.2f}' for r in found.runs)})" if len(found.runs) > 1 else ""
    return (f"{label}(c) = {found.rate:.1f} posters/s: (c)/(a) = {found.to_ceiling:.2f}{runs}   "
            f"(c)/(b) = {found.to_peer:.2f}")


def steady_pairs(pairs: Sequence[tuple[float, float]], fixed: float,
                 scored: int) -> list[tuple[float, float]] | None:
    """Each run's (a), and its (c) with the job's fixed cost taken out of its time; None when a run took no
    longer than that cost (too few posters to tell)."""
    remaining = [scored / c - fixed for _, c in pairs]  # seconds each run spent past its fixed cost
    if min(remaining) <= 0:
        return None
    return [(a, scored / seconds) for (a, _), seconds in zip(pairs, remaining, strict=True)]


def without_start_up(b: float, pairs: list[tuple[float, float]], fixed: float, scored: int) -> str:
    """The ratios with the job's fixed cost taken out of each run's time, or why they cannot be."""
    steady = steady_pairs(pairs, fixed, scored)
    if steady is None:
        return "a run took no longer than that: too few posters to measure the job without it"
    return ratios_line("without it ", ratios(b, steady))


def rss_line(rss_n: int, rss_10n: int) -> str:
    """Peak RSS at N and 10N posters: streaming keeps their ratio near 1."""
    return f"peak RSS at N {rss_n / MIB:.0f} MiB, at 10N {rss_10n / MIB:.0f} MiB: ratio {rss_10n / rss_n:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["cnn", "resnet50"], default="cnn", help="model to label with")
    parser.add_argument("--posters", type=int, default=1000, help="posters per run")
    parser.add_argument("--batch-size", type=int, default=None, help="the job's --batch-size (default: the job's)")
    parser.add_argument("--actors", type=int, default=None, help="the job's --actors (default: the job's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="the job's --precision")
    parser.add_argument("--scale", action="store_true", help="also label 10x posters and compare peak RSS")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure (a) and (c) this many times in turn and print medians (default 1)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, runtime_env=job_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalog, model = make_inputs(root / "n", args.arch, args.posters)
        config = job_config(catalog, model, root / "n", args)
        resources = resolve_actor_resources(config, args.posters)
        print(f"{args.arch}, {args.posters} posters of 300x450, batch {resolve_batch_size(config)}, "
              f"precision {args.precision}, {resources.actors} actor(s) x {resources.threads} threads, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}", flush=True)
        b, rates, rss_n = measure_all(config, resources, catalog, model, root, args)
        print(ratios_line("", ratios(b, rates)))
        fixed = start_up_seconds(root / "tiny", model, args, resources.actors)
        scored = len(pq.read_table(catalog, columns=["poster_uri"])["poster_uri"].drop_null())  # rows (c) counts
        print(f"start-up (the job on 8 posters): {fixed:.1f} s; " + without_start_up(b, rates, fixed, scored))
        if args.scale:
            big_catalog, _ = make_inputs(root / "10n", args.arch, 10 * args.posters)
            _, rss_10n = measured(f"(c) at 10x = {10 * args.posters} posters",
                                  lambda: pipeline(job_config(big_catalog, model, root / "10n", args)))
            print(rss_line(rss_n, rss_10n))


if __name__ == "__main__":
    main()
