"""benchmarks/incremental_nights.py and benchmarks/driver_memory.py: their reports computed from given numbers,
and one small run of each script that checks the report's counts (never its timings: speed and memory goals are
measured by running the benchmarks, not by tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from benchmark_scripts import BENCHMARKS, load_benchmark

from genre_pipeline.data.catalog import CATALOG_SCHEMA, REQUIRED_COLUMNS, validate_schema

MiB = 2**20
ORIGINS = {"scored", "resumed", "carried"}


def night(origins: dict[str, int], setup: float, seconds: float) -> SimpleNamespace:
    return SimpleNamespace(rows_by_origin=origins, setup_seconds=setup, seconds=seconds)


def nights_report(changed_seconds: float = 12.0, unchanged_origins: dict | None = None,
                  changed_origins: dict | None = None) -> dict:
    # 1000 movies: the full night 5 s of setup and 200 s of the rest; 10 posters changed, then one; scoring
    # anything costs 3 s more than scoring nothing ((d)'s rest 9 s, (b)'s 6 s); the small unchanged night's
    # rest, the pipeline's start-up, is 2 s.
    return load_benchmark("incremental_nights").build_report(
        {"full": night({"scored": 1000}, 5.0, 205.0),
         "unchanged": night(unchanged_origins or {"carried": 1000}, 4.0, 10.0),
         "changed": night(changed_origins or {"scored": 10, "carried": 990}, 4.0, changed_seconds),
         "one_changed": night({"scored": 1, "carried": 999}, 4.0, 13.0)},
        movies=1000, changed_posters=10, start_up_night=night({"carried": 64}, 0.5, 2.5))


def test_each_nights_time_is_split_into_setup_and_the_rest_with_every_origin_counted():
    report = nights_report()
    assert report["nights"]["full"] == {"rows_by_origin": {"scored": 1000, "resumed": 0, "carried": 0},
                                        "setup_seconds": 5.0, "scoring_seconds": 200.0, "seconds": 205.0}
    assert report["nights"]["changed"]["rows_by_origin"] == {"scored": 10, "resumed": 0, "carried": 990}
    assert report["nights"]["changed"]["scoring_seconds"] == pytest.approx(8.0)


def test_the_ratio_is_the_changed_nights_rest_over_the_full_nights_less_start_up_and_meets_five_percent():
    report = nights_report()
    assert report["pipeline_startup_seconds"] == pytest.approx(2.0)
    assert report["scoring_startup_seconds"] == pytest.approx(3.0)
    assert report["startup_seconds"] == pytest.approx(5.0)
    assert report["measured_ratio"] == pytest.approx(8.0 / 200.0)
    assert report["scoring_ratio"] == pytest.approx(3.0 / 195.0)
    assert report["unchanged_scoring_ratio"] == pytest.approx(6.0 / 200.0)
    assert (report["target_scoring_ratio"], report["scoring_ratio_met"]) == (0.05, True)
    assert report["scored_exactly"] == {"full": True, "unchanged": True, "changed": True, "one_changed": True,
                                       "start_up": True}
    assert (report["movies"], report["changed_posters"]) == (1000, 10)


def test_a_slow_changed_night_and_wrong_counts_are_reported():
    report = nights_report(changed_seconds=27.0, unchanged_origins={"scored": 3, "carried": 997},
                           changed_origins={"scored": 11, "carried": 989})
    assert report["scoring_ratio"] == pytest.approx(18.0 / 195.0)
    assert report["scoring_ratio_met"] is False
    assert report["scored_exactly"] == {"full": True, "unchanged": False, "changed": False, "one_changed": True,
                                       "start_up": True}
    lines = load_benchmark("incremental_nights").format_report(report)
    assert ("0.115 as measured, 0.092 both less the fixed start-up, for 10 changed posters (target <= 0.05: NOT met)"
            in lines[5])
    assert lines[6] == "(b) scored 3 posters (expected none)"
    assert lines[7] == "scored counts: WRONG for unchanged, changed"


def test_a_start_up_night_that_scored_something_is_reported_as_wrong():
    report = load_benchmark("incremental_nights").build_report(
        {"full": night({"scored": 1000}, 5.0, 205.0), "unchanged": night({"carried": 1000}, 4.0, 10.0),
         "changed": night({"scored": 10, "carried": 990}, 4.0, 12.0),
         "one_changed": night({"scored": 1, "carried": 999}, 4.0, 13.0)},
        movies=1000, changed_posters=10, start_up_night=night({"scored": 2, "carried": 62}, 0.5, 2.5))
    assert report["scored_exactly"]["start_up"] is False
    assert report["start_up_night"]["rows_by_origin"] == {"scored": 2, "resumed": 0, "carried": 62}
    lines = load_benchmark("incremental_nights").format_report(report)
    assert lines[-1] == "scored counts: WRONG for start_up"


def test_the_printed_lines_carry_each_nights_origins_and_times():
    lines = load_benchmark("incremental_nights").format_report(nights_report())
    assert len(lines) == 8
    assert lines[0].startswith("(a) full") and "scored 1000, resumed 0, carried 0" in lines[0]
    assert "setup     5.0 s" in lines[0] and "rest (scoring part)   200.0 s" in lines[0]
    assert lines[2].startswith("(c) changed") and "scored 10, resumed 0, carried 990" in lines[2]
    assert lines[3].startswith("(d) one_changed") and "scored 1, resumed 0, carried 999" in lines[3]
    assert lines[4] == ("fixed start-up: 5.0 s = pipeline 2.0 s (an unchanged night of 64 movies) + scoring 3.0 s "
                        "((d) less (b))")
    assert lines[5] == ("(c)/(a) rest: 0.040 as measured, 0.015 both less the fixed start-up, for 10 changed "
                        "posters (target <= 0.05: met); (b)/(a) rest: 0.030")
    assert lines[6] == "(b) scored 0 posters (none, as it should)"


def measured(peak_mib: float, before_mib: float, movies: int) -> dict:
    nights = [{"run_date": "2026-01-01", "rows_by_origin": {"scored": movies}, "seconds": 30.0,
               "peak_rss": int(peak_mib * MiB), "rss": int(before_mib * MiB)},
              {"run_date": "2026-01-02", "rows_by_origin": {"carried": movies}, "seconds": 40.0,
               "peak_rss": int(peak_mib * MiB), "rss": int(before_mib * MiB)}]
    return {"peak_before_nights": int(before_mib * MiB), "peak_rss": int(peak_mib * MiB), "nights": nights}


def test_the_peak_ratio_is_the_largest_catalogues_driver_peak_over_the_smallests():
    build_report = load_benchmark("driver_memory").build_report
    report = build_report({200_000: measured(860, 700, 200_000), 20_000: measured(800, 700, 20_000)})
    assert list(report["sizes"]) == ["20000", "200000"]
    assert (report["smallest"], report["largest"]) == (20_000, 200_000)
    assert report["peak_ratio"] == pytest.approx(860 / 800)
    assert report["peak_ratio_met"] is True
    size = report["sizes"]["200000"]
    assert (size["peak_mib"], size["peak_before_nights_mib"], size["growth_mib"]) == (860, 700, 160)
    assert [n["peak_rss_mib"] for n in size["nights"]] == [860, 860]
    assert not build_report({20_000: measured(800, 700, 20_000), 200_000: measured(900, 700, 200_000)})[
        "peak_ratio_met"]


def test_the_driver_memory_lines_name_each_size_and_the_ratio():
    module = load_benchmark("driver_memory")
    lines = module.format_report(module.build_report({20_000: measured(800, 700, 20_000),
                                                      200_000: measured(900, 700, 200_000)}))
    assert lines[0].startswith("   20,000 movies: driver peak RSS     800 MiB (before the nights 700, growth 100)")
    assert "night 1: 30.0 s, scored 20000; night 2: 40.0 s, carried 20000" in lines[0]
    assert lines[2] == "peak at 200,000 over peak at 20,000: 1.125 (target <= 1.10: NOT met)"


def test_the_catalogue_without_posters_follows_the_contract(tmp_path):
    path = tmp_path / "catalog.parquet"
    load_benchmark("driver_memory").write_catalog_without_posters(path, 500)
    table = pq.read_table(path)
    validate_schema(table.schema, source=str(path), required=REQUIRED_COLUMNS)
    assert table.schema.equals(CATALOG_SCHEMA)
    assert table["movie_id"].to_pylist() == list(range(1, 501))
    assert table["poster_uri"].null_count == 500


def run_script(name: str, *flags: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *flags], capture_output=True,
                            text=True, timeout=1100)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_incremental_nights_scores_every_movie_then_none_then_exactly_the_changed_posters(tmp_path):
    work, report_path = tmp_path / "work", tmp_path / "report.json"
    result = run_script("incremental_nights", "--movies", "200", "--arch", "cnn", "--image-size", "32",
                        "--poster-size", "48", "72", "--work-dir", str(work), "--report", str(report_path))
    report = json.loads(report_path.read_text())
    uris = [u for u in pq.read_table(work / "catalog-200-48x72" / "catalog.parquet")["poster_uri"].to_pylist() if u]
    changed = max(1, round(0.01 * len(uris)))
    # The changed posters are the ones with a byte after the JPEG's end marker.
    assert sum(not Path(uri).read_bytes().endswith(b"\xff\xd9") for uri in uris) == report["changed_posters"]
    assert report["changed_posters"] == changed
    nights = report["nights"]
    assert nights["full"]["rows_by_origin"] == {"scored": 200, "resumed": 0, "carried": 0}
    assert nights["unchanged"]["rows_by_origin"] == {"scored": 0, "resumed": 0, "carried": 200}
    assert nights["changed"]["rows_by_origin"] == {"scored": changed, "resumed": 0, "carried": 200 - changed}
    assert nights["one_changed"]["rows_by_origin"] == {"scored": 1, "resumed": 0, "carried": 199}
    assert report["scored_exactly"] == {"full": True, "unchanged": True, "changed": True, "one_changed": True,
                                       "start_up": True}
    for entry in nights.values():
        assert entry["scoring_seconds"] == pytest.approx(entry["seconds"] - entry["setup_seconds"])
        assert 0 < entry["setup_seconds"] < entry["seconds"]
    scoring_startup = nights["one_changed"]["scoring_seconds"] - nights["unchanged"]["scoring_seconds"]
    assert report["scoring_startup_seconds"] == pytest.approx(scoring_startup)
    assert report["pipeline_startup_seconds"] > 0
    startup = report["pipeline_startup_seconds"] + scoring_startup
    assert report["scoring_ratio"] == pytest.approx((nights["changed"]["scoring_seconds"] - startup)
                                                    / (nights["full"]["scoring_seconds"] - startup))
    assert report["settings"]["arch"] == "cnn" and report["machine"]["cpus"] >= 1
    assert "(b) scored 0 posters (none, as it should)" in result.stdout
    assert "scored counts: exact in every night" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_driver_memory_runs_two_nights_per_size_and_reports_each_peak(tmp_path):
    report_path = tmp_path / "report.json"
    result = run_script("driver_memory", "--movies", "200", "2000", "--work-dir", str(tmp_path / "work"),
                        "--report", str(report_path))
    report = json.loads(report_path.read_text())
    assert set(report["sizes"]) == {"200", "2000"}
    for movies, size in report["sizes"].items():
        first, second = size["nights"]
        assert first["rows_by_origin"] == {"scored": int(movies)}
        assert first["rows_by_status"] == {"missing_poster": int(movies)}  # no poster: nothing fetched
        assert second["rows_by_origin"] == {"carried": int(movies)}
        assert size["peak_mib"] >= size["peak_before_nights_mib"] > 100  # at least a Python with Ray and torch
        # ru_maxrss only grows, and is read once more after the last night's record
        assert size["peak_mib"] >= max(n["peak_rss_mib"] for n in size["nights"])
    assert report["peak_ratio"] == pytest.approx(report["sizes"]["2000"]["peak_mib"]
                                                 / report["sizes"]["200"]["peak_mib"])
    assert "peak at 2,000 over peak at 200:" in result.stdout
