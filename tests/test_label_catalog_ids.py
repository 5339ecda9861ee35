"""Counting the catalogue and checking its movie ids on a real local Ray: per-block ranges, and the shuffle when
ranges overlap."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genre_pipeline.data import storage
from genre_pipeline.data.catalog import CatalogError
from genre_pipeline.label.catalog_ids import EmptyCatalogError, block_id_stats, count_catalog, ranges_overlap


def write_files(folder, *id_lists):
    """One catalogue file per list of ids, in a folder (each file at least one block)."""
    folder.mkdir()
    for index, ids in enumerate(id_lists):
        table = pa.table({"movie_id": pa.array(ids, pa.int64()), "title": pa.array([f"t{i}" for i in ids], pa.string()),
                          "poster_uri": pa.nulls(len(ids), pa.string())})
        pq.write_table(table, folder / f"part-{index}.parquet")
    return str(folder)


def test_block_stats_give_the_range_and_name_the_repeated_ids():
    stats = block_id_stats(pa.table({"movie_id": pa.array([7, None, 3, 7, 9, 3, 3], pa.int64())})).to_pylist()
    assert stats == [{"rows": 7, "nulls": 1, "low": 3, "high": 9, "repeated": [7, 3]}]


def test_ranges_overlap_only_when_two_ranges_share_a_value():
    assert not ranges_overlap([{"low": 5, "high": 9}, {"low": 1, "high": 4}, {"low": None, "high": None}])
    assert ranges_overlap([{"low": 5, "high": 9}, {"low": 1, "high": 5}])
    assert ranges_overlap([{"low": 1, "high": 10}, {"low": 4, "high": 6}])


def test_files_with_disjoint_ids_are_counted(ray_local, tmp_path):
    catalog = write_files(tmp_path / "catalog", [4, 5, 6], [1, 2, 3], [10, 20])
    assert count_catalog(catalog, storage.StorageOptions()) == 8


def test_interleaved_unique_ids_pass_the_shuffle(ray_local, tmp_path):
    catalog = write_files(tmp_path / "catalog", [1, 3, 5], [2, 4, 6, 8])
    assert count_catalog(catalog, storage.StorageOptions()) == 7


def test_an_id_in_two_files_is_found_by_the_shuffle_and_named(ray_local, tmp_path):
    catalog = write_files(tmp_path / "catalog", [1, 2, 3], [3, 4])
    with pytest.raises(CatalogError, match=r"catalog: column 'movie_id' must be unique and not null; found 3 \(2 rows"):
        count_catalog(catalog, storage.StorageOptions())


def test_nulls_and_repeats_within_a_file_are_named(ray_local, tmp_path):
    nulls = write_files(tmp_path / "nulls", [1, None, 2], [5, None])
    with pytest.raises(CatalogError, match="found 2 null$"):
        count_catalog(nulls, storage.StorageOptions())
    repeats = write_files(tmp_path / "repeats", [1, 2, 2], [5])
    with pytest.raises(CatalogError, match=r"found 2 \((repeated|2 rows)\)$"):  # in one block or two
        count_catalog(repeats, storage.StorageOptions())


def test_an_empty_catalogue_is_refused(ray_local, tmp_path):
    catalog = write_files(tmp_path / "catalog", [])
    with pytest.raises(EmptyCatalogError, match="the catalogue has no rows"):
        count_catalog(catalog, storage.StorageOptions())
