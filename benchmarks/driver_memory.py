"""The label job's driver memory against the catalogue's size: it should not grow with the movies.

    python benchmarks/driver_memory.py --movies 20000 200000 --report driver_memory.json

For each size, a generated catalogue of movies without posters (status missing_poster: nothing is fetched or
decoded, so the run is cheap, but every row is read, keyed, joined, labelled and written) runs two nights in a
fresh subprocess of its own: the first scores every movie, the second carries every movie over (the joins with
the previous night). The driver's peak RSS is that subprocess's `ru_maxrss`: Ray's workers are processes of
their own and do not count. Prints each size's peak, its growth over the peak before the first night (imports
and ray.init), and the largest size's peak over the smallest's (target: within 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from genre_pipeline.data.catalog import CATALOG_SCHEMA  # noqa: E402
from genre_pipeline.data.sample import split_of  # noqa: E402

TARGET_PEAK_RATIO = 1.10  # the largest catalogue's driver peak over the smallest's
NIGHTS = ("2026-01-01", "2026-01-02")  # first: every movie scored; second: every movie carried over
MiB = 2**20
RESULT_PREFIX = "RESULT "  # the line a night process prints its measurements on
# Outside the repository; the generated catalogues are kept here between runs.
WORK_DIR = Path(tempfile.gettempdir()) / "genre_pipeline_driver_memory"


def write_catalog_without_posters(path: Path, movies: int) -> None:
    """`movies` rows of the catalogue contract, poster_uri null; written by pyarrow in one go (no posters to
    draw, so 200,000 rows take a second)."""
    ids = pa.array(range(1, movies + 1), pa.int64())
    table = pa.table({"movie_id": ids, "title": pa.array([f"Movie {i}" for i in range(1, movies + 1)]),
                      "year": pa.array([1950 + i % 70 for i in range(movies)], pa.int32()),
                      "genres": pa.array([["Drama"]] * movies, pa.list_(pa.string())),
                      "poster_uri": pa.nulls(movies, pa.string()),
                      "split": pa.array([split_of(i) for i in range(1, movies + 1)])}, schema=CATALOG_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def save_model(directory: Path) -> str:
    """The smallest model the job takes: no poster is scored, so the model only has to load."""
    import torch

    from genre_pipeline.data.images import PreprocessSpec
    from genre_pipeline.genres import GENRES
    from genre_pipeline.model.architectures import build_model
    from genre_pipeline.model.checkpoints import ModelMeta, save_checkpoint

    torch.manual_seed(0)
    meta = ModelMeta(arch="cnn", genres=list(GENRES), preprocess=PreprocessSpec(image_size=32),
                     thresholds=[0.5] * len(GENRES))
    save_checkpoint(directory, build_model(arch="cnn", num_genres=len(GENRES)), meta)
    return str(directory)


def peak_rss() -> int:
    """This process's peak resident set in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_nights_in_this_process(catalog: str, model: str, output: str) -> dict:
    """The night process: ray.init, then both nights in process; the driver's RSS after each step."""
    import ray

    from genre_pipeline.label.night import label_catalog
    from genre_pipeline.label.pipeline import LabelConfig
    from genre_pipeline.runtime import job_runtime_env

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=job_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    result = {"peak_before_nights": peak_rss(), "nights": []}
    for run_date in NIGHTS:
        summary = label_catalog(LabelConfig(catalog=catalog, model=model, output=output, run_date=run_date))
        result["nights"].append({"run_date": run_date, "rows_by_origin": dict(summary.rows_by_origin),
                                 "rows_by_status": dict(summary.rows_by_status), "seconds": summary.seconds,
                                 "setup_seconds": summary.setup_seconds, "peak_rss": peak_rss(),
                                 "rss": current_rss()})
    result["peak_rss"] = peak_rss()
    return result


def leave_without_destructors() -> None:
    """Exit 0 now, skipping C++ static destructors: Ray 2.60 keeps an OpenTelemetry metric reader thread after
    ray.shutdown() that can segfault the interpreter's exit (see tests/conftest.py pytest_unconfigure)."""
    import ray

    ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def measure_size(movies: int, work_dir: Path, model: str, timeout: float) -> dict:
    """Both nights of a `movies`-row catalogue in a fresh subprocess; its measurements."""
    folder = work_dir / f"movies-{movies}"
    catalog = folder / "catalog.parquet"
    if not catalog.exists():
        write_catalog_without_posters(catalog, movies)
    output = folder / "labels"
    shutil.rmtree(output, ignore_errors=True)  # a new table: the first night scores every movie
    command = [sys.executable, __file__, "--night-process", "--catalog", str(catalog), "--model", model,
               "--output", str(output)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"the night process for {movies} movies failed ({run.returncode}):\n"
                           f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def build_report(results: Mapping[int, dict], target_ratio: float = TARGET_PEAK_RATIO) -> dict:
    """Per size its driver peaks (MiB) and nights; the largest size's peak over the smallest's."""
    sizes = {}
    for movies, result in sorted(results.items()):
        sizes[str(movies)] = {
            "peak_mib": result["peak_rss"] / MiB,
            "peak_before_nights_mib": result["peak_before_nights"] / MiB,
            "growth_mib": (result["peak_rss"] - result["peak_before_nights"]) / MiB,  # what the nights added
            "nights": [{**night, "peak_rss_mib": night["peak_rss"] / MiB, "rss_mib": night["rss"] / MiB}
                       for night in result["nights"]],
        }
    smallest, largest = min(results), max(results)
    ratio = results[largest]["peak_rss"] / results[smallest]["peak_rss"]
    return {"sizes": sizes, "smallest": smallest, "largest": largest, "peak_ratio": ratio,
            "target_peak_ratio": target_ratio, "peak_ratio_met": ratio <= target_ratio}


def format_report(report: dict) -> list[str]:
    lines = []
    for movies, size in report["sizes"].items():
        nights = "; ".join(f"night {index + 1}: {night['seconds']:.1f} s, "
                           + ", ".join(f"{origin} {count}" for origin, count in sorted(night["rows_by_origin"].items()))
                           for index, night in enumerate(size["nights"]))
        lines.append(f"{int(movies):>9,} movies: driver peak RSS {size['peak_mib']:7.0f} MiB (before the nights "
                     f"{size['peak_before_nights_mib']:.0f}, growth {size['growth_mib']:.0f})   {nights}")
    met = "met" if report["peak_ratio_met"] else "NOT met"
    lines.append(f"peak at {report['largest']:,} over peak at {report['smallest']:,}: {report['peak_ratio']:.3f} "
                 f"(target <= {report['target_peak_ratio']:.2f}: {met})")
    return lines


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's default after its help."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--movies", type=int, nargs="+", default=[20_000, 200_000],
                        help="catalogue sizes, each measured in its own subprocess")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR,
                        help="where the catalogues (kept between runs), the model and the labels go")
    parser.add_argument("--report", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one size's subprocess may take")
    # The subprocess's own flags.
    parser.add_argument("--night-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--catalog", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.night_process and len(set(args.movies)) < 2:
        parser.error("--movies needs at least two different sizes")
    return args


def main() -> None:
    args = parse_args()
    if args.night_process:
        print(RESULT_PREFIX + json.dumps(run_nights_in_this_process(args.catalog, args.model, args.output)),
              flush=True)
        leave_without_destructors()
    machine = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
               "platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    model = save_model(args.work_dir / "model")
    results = {}
    for movies in sorted(set(args.movies)):
        results[movies] = measure_size(movies, args.work_dir, model, args.timeout)
        print(f"{movies:,} movies measured", flush=True)
    report = build_report(results)
    for line in format_report(report):
        print(line)
    report["machine"] = machine | {"load_average_after": os.getloadavg()}
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
