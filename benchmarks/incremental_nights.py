"""Incremental nights: what a night costs when nothing or 1% of the posters changed, against a full night.

    python benchmarks/incremental_nights.py --movies 20000 --report incremental_nights.json

On a generated catalogue of --movies movies (small posters, generated once into --work-dir and reused) and one
model with a random head (--arch, default the demo's EfficientNet-Lite0 at 128 px, its ImageNet backbone from its
package), on one local Ray with this machine's CPUs, `label_catalog` runs four nights into a new labels table:
  (a) full: the table is empty, every movie is scored;
  (b) unchanged: nothing changed, nothing is scored (every row is carried over);
  (c) changed: --changed-fraction of the posters got a new version (a byte appended: new size and mtime);
  (d) one changed: one poster got a new version.
Two small nights run first on a table of their own (the catalogue's first 64 movies): the first because Ray
Data starts its own actors on a Ray's first job (a cluster has them from its first night on, so (a) does not pay
for them), the second, where nothing changed, to measure the pipeline's start-up.

Prints each night's rows by origin, its set-up (`setup_seconds`: pinning, counting the catalogue, opening the
table) and the rest (the Ray Data pipeline: reading, input keys, joins, scoring, writing, commit). Every night's
rest includes a fixed start-up, reported apart: the pipeline's (the small unchanged night's rest: Ray starting
the worker processes of the night's tasks, each importing the package) and, on a night that scores anything,
the scoring's ((d)'s rest less (b)'s: starting the labeller actors, importing torch and loading the model into
each). Then (c)'s rest over (a)'s, as measured and with both less the fixed start-up (target: at most 5%), and
whether (b) and the small start-up night scored nothing.
--report writes it all as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from genre_pipeline.data.catalog import write_catalog  # noqa: E402
from genre_pipeline.data.sample import build_sample_catalog  # noqa: E402
from genre_pipeline.genres import GENRES  # noqa: E402
from genre_pipeline.label.night import label_catalog  # noqa: E402
from genre_pipeline.label.origins import ORIGIN_CARRIED, ORIGIN_SCORED, ORIGINS  # noqa: E402
from genre_pipeline.label.pipeline import LabelConfig  # noqa: E402
from genre_pipeline.runtime import job_runtime_env  # noqa: E402

# Small posters: decoding and resizing them is cheap beside the model, so the full night's time is mostly the
# model's, as it is for real posters on the GPU path; 20,000 of them take about 60 MB.
POSTER_SIZE = (96, 144)
TARGET_SCORING_RATIO = 0.05  # (c)'s pipeline time over (a)'s: an incremental night costs its changes, not the catalogue
WARM_UP_MOVIES = 64  # one block: enough for Ray Data to start its own actors
NIGHTS = {"full": ("(a)", "2026-01-01"), "unchanged": ("(b)", "2026-01-02"), "changed": ("(c)", "2026-01-03"),
          "one_changed": ("(d)", "2026-01-04")}
SEED = 11
# Outside the repository; the generated catalogues are kept here between runs.
WORK_DIR = Path(tempfile.gettempdir()) / "genre_pipeline_incremental_nights"


class NightSummary(Protocol):
    """What the report needs of a LabelSummary (tests give plain objects)."""

    rows_by_origin: dict[str, int]
    setup_seconds: float
    seconds: float


def night_entry(summary: NightSummary) -> dict:
    """One night's numbers: rows by origin (every origin, zeros included) and its time split in two."""
    return {"rows_by_origin": {origin: int(summary.rows_by_origin.get(origin, 0)) for origin in ORIGINS},
            "setup_seconds": summary.setup_seconds,
            "scoring_seconds": summary.seconds - summary.setup_seconds,
            "seconds": summary.seconds}


def build_report(summaries: Mapping[str, NightSummary], *, movies: int, changed_posters: int,
                 start_up_night: NightSummary, target_ratio: float = TARGET_SCORING_RATIO) -> dict:
    """The four nights (`full`, `unchanged`, `changed`, `one_changed`), the fixed start-up every night pays
    (the pipeline's: `start_up_night`, an unchanged night of WARM_UP_MOVIES; the scoring's: (d) less (b)), the
    changed night's rest over the full night's (as measured, and with both less the fixed start-up), and whether
    each night scored exactly the movies it had to."""
    nights = {name: night_entry(summaries[name]) for name in NIGHTS}
    full, unchanged, changed, one_changed = (nights[name] for name in NIGHTS)
    start_up = night_entry(start_up_night)
    pipeline_startup = start_up["scoring_seconds"]
    scoring_startup = one_changed["scoring_seconds"] - unchanged["scoring_seconds"]
    startup = pipeline_startup + scoring_startup
    ratio = (changed["scoring_seconds"] - startup) / (full["scoring_seconds"] - startup)
    scored = {name: night["rows_by_origin"][ORIGIN_SCORED] for name, night in nights.items()}
    return {
        "movies": movies,
        "changed_posters": changed_posters,
        "nights": nights,
        "start_up_night": start_up,
        "pipeline_startup_seconds": pipeline_startup,  # starting the night's Ray Data tasks: a tiny night's rest
        "scoring_startup_seconds": scoring_startup,  # (d) less (b): starting the actors, loading the model
        "startup_seconds": startup,
        "measured_ratio": changed["scoring_seconds"] / full["scoring_seconds"],  # (c) over (a), set-up excluded
        "scoring_ratio": ratio,  # the same, both less the fixed start-up
        "target_scoring_ratio": target_ratio,
        "scoring_ratio_met": ratio <= target_ratio,
        # The cost of a night that scores nothing, over a full night's: the floor under any incremental night.
        "unchanged_scoring_ratio": unchanged["scoring_seconds"] / full["scoring_seconds"],
        "scored_exactly": {
            "full": scored["full"] == movies,
            "unchanged": scored["unchanged"] == 0 and unchanged["rows_by_origin"][ORIGIN_CARRIED] == movies,
            "changed": scored["changed"] == changed_posters,
            "one_changed": scored["one_changed"] == 1,
            # The start-up night is only the pipeline's start-up if it scored nothing.
            "start_up": start_up["rows_by_origin"][ORIGIN_SCORED] == 0
            and start_up["rows_by_origin"][ORIGIN_CARRIED] == WARM_UP_MOVIES,
        },
    }


def format_report(report: dict) -> list[str]:
    """The lines main prints: one per night, then the start-up, the ratio and the checks."""
    lines = []
    for name, (label, _) in NIGHTS.items():
        night = report["nights"][name]
        origins = ", ".join(f"{origin} {count}" for origin, count in night["rows_by_origin"].items())
        lines.append(f"{label} {name:<9} {origins:<36} setup {night['setup_seconds']:7.1f} s   "
                     f"rest (scoring part) {night['scoring_seconds']:7.1f} s   total {night['seconds']:7.1f} s")
    met = "met" if report["scoring_ratio_met"] else "NOT met"
    lines.append(f"fixed start-up: {report['startup_seconds']:.1f} s = pipeline "
                 f"{report['pipeline_startup_seconds']:.1f} s (an unchanged night of {WARM_UP_MOVIES} movies) "
                 f"+ scoring {report['scoring_startup_seconds']:.1f} s ((d) less (b))")
    lines.append(f"(c)/(a) rest: {report['measured_ratio']:.3f} as measured, {report['scoring_ratio']:.3f} both less "
                 f"the fixed start-up, for {report['changed_posters']} changed posters "
                 f"(target <= {report['target_scoring_ratio']:g}: {met}); (b)/(a) rest: "
                 f"{report['unchanged_scoring_ratio']:.3f}")
    scored = report["nights"]["unchanged"]["rows_by_origin"][ORIGIN_SCORED]
    lines.append(f"(b) scored {scored} posters ({'none, as it should' if scored == 0 else 'expected none'})")
    wrong = [name for name, exact in report["scored_exactly"].items() if not exact]
    lines.append("scored counts: " + (f"WRONG for {', '.join(wrong)}" if wrong else "exact in every night"))
    return lines


def machine_info() -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}


def make_catalog(work_dir: Path, movies: int, poster_size: tuple[int, int]) -> Path:
    """The generated catalogue and its posters, built on the first run into a folder of their own."""
    folder = work_dir / f"catalog-{movies}-{poster_size[0]}x{poster_size[1]}"
    catalog = folder / "catalog.parquet"
    if not catalog.exists():  # written last: its presence means the posters are complete
        started = time.monotonic()
        table = build_sample_catalog(str(folder), movies, seed=SEED, poster_size=poster_size)
        write_catalog(table, str(catalog))
        print(f"generated {movies} movies in {time.monotonic() - started:.0f} s into {folder}", flush=True)
    return catalog


def save_model(directory: Path, arch: str, image_size: int) -> tuple[str, str]:
    """A checkpoint of `arch` as training starts it (a Lite's ImageNet backbone from its package) with a seeded
    random head; cnn when the Lite's weights are not installed. Returns its URI and the arch it has."""
    import torch

    from genre_pipeline.model.architectures import (
        PRETRAINED_ARCHS,
        WeightsUnavailableError,
        build_model,
        default_preprocess,
        weights_source,
    )
    from genre_pipeline.model.checkpoints import ModelMeta, save_checkpoint

    torch.manual_seed(SEED)
    pretrained = arch in PRETRAINED_ARCHS
    try:
        network = build_model(arch=arch, num_genres=len(GENRES), pretrained=pretrained)
        source = weights_source(arch=arch, pretrained=pretrained, weights=None)
    except (WeightsUnavailableError, ImportError) as error:
        print(f"{arch} unavailable ({error}): falling back to cnn", flush=True)
        arch, network, source = "cnn", build_model(arch="cnn", num_genres=len(GENRES)), {"kind": "random"}
    meta = ModelMeta(arch=arch, genres=list(GENRES), preprocess=default_preprocess(arch, image_size),
                     thresholds=[0.5] * len(GENRES), weights_source=source)
    save_checkpoint(directory, network, meta)
    return str(directory), arch


def change_posters(catalog: Path, fraction: float) -> list[str]:
    """Give `fraction` of the posters (at least one) a new version: a byte appended changes size and mtime,
    and the JPEG still decodes. Returns the changed posters' URIs."""
    uris = [uri for uri in pq.read_table(catalog, columns=["poster_uri"])["poster_uri"].to_pylist() if uri]
    count = max(1, round(fraction * len(uris)))
    changed = [uris[index] for index in np.random.default_rng(SEED).choice(len(uris), size=count, replace=False)]
    for uri in changed:
        append_byte(uri)
    return changed


def append_byte(uri: str) -> None:
    with open(uri, "ab") as poster:
        poster.write(b"\0")


def warm_up(catalog: Path, model: str, root: Path) -> NightSummary:
    """Two nights of the catalogue's first WARM_UP_MOVIES movies into a table of their own: the first starts Ray
    Data's own actors, the second (nothing changed) measures what a night's pipeline costs to start."""
    small = root / "warm-up" / "catalog.parquet"
    write_catalog(pq.read_table(catalog).slice(0, WARM_UP_MOVIES), str(small))
    for run_date in ("2026-01-01", "2026-01-02"):
        summary = label_catalog(LabelConfig(catalog=str(small), model=model, output=str(root / "warm-up" / "labels"),
                                            run_date=run_date, poster_roots=(str(catalog.parent),)))
    return summary


def run_nights(catalog: Path, model: str, output: Path, changed_fraction: float) -> tuple[dict, int]:
    """(a) to (d) into a new table at `output`; returns their summaries and how many posters changed for (c)."""
    summaries, changed = {}, []
    for name, (label, run_date) in NIGHTS.items():
        if name == "changed":
            changed = change_posters(catalog, changed_fraction)
        if name == "one_changed":  # one of (c)'s posters again: (c)'s are the only posters that ever changed
            append_byte(changed[0])
        summaries[name] = label_catalog(LabelConfig(catalog=str(catalog), model=model, output=str(output),
                                                    run_date=run_date, poster_roots=(str(catalog.parent),)))
        print(f"{label} {name}: {summaries[name].seconds:.1f} s", flush=True)
    return summaries, len(changed)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's default after its help."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--movies", type=int, default=20_000, help="movies in the generated catalogue")
    parser.add_argument("--changed-fraction", type=float, default=0.01,
                        help="fraction of the posters that change before night (c) (at least one)")
    parser.add_argument("--arch", default="efficientnet_lite0", help="model arch (random head)")
    parser.add_argument("--image-size", type=int, default=128, help="the model's input width in pixels")
    parser.add_argument("--poster-size", type=int, nargs=2, default=POSTER_SIZE, metavar=("WIDTH", "HEIGHT"),
                        help="generated posters' size")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR,
                        help="where the catalogue (kept between runs), the model and the labels go")
    parser.add_argument("--report", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args()
    if not 0 < args.changed_fraction <= 1:
        parser.error("--changed-fraction must be in (0, 1]")
    return args


def main() -> None:
    args = parse_args()
    import ray
    import torch

    machine = machine_info()
    catalog = make_catalog(args.work_dir, args.movies, tuple(args.poster_size))
    runs = args.work_dir / "run"
    shutil.rmtree(runs, ignore_errors=True)  # a new table: night (a) scores every movie
    model, arch = save_model(runs / "model", args.arch, args.image_size)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=job_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"{args.movies} movies ({args.poster_size[0]}x{args.poster_size[1]} posters), {arch} at "
          f"{args.image_size} px, {os.cpu_count()} CPUs, load average {machine['load_average'][0]:.1f}, "
          f"torch {torch.__version__}, ray {ray.__version__}", flush=True)
    start_up_night = warm_up(catalog, model, runs)
    summaries, changed = run_nights(catalog, model, runs / "labels", args.changed_fraction)
    report = build_report(summaries, movies=args.movies, changed_posters=changed, start_up_night=start_up_night)
    for line in format_report(report):
        print(line)
    report |= {"machine": machine | {"load_average_after": os.getloadavg()},
               "settings": {"arch": arch, "image_size": args.image_size, "poster_size": list(args.poster_size),
                            "changed_fraction": args.changed_fraction, "torch": torch.__version__,
                            "ray": ray.__version__}}
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
