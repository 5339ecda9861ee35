"""The catalogue contract: schema, MovieLens-1M ingestion, validation and de-duplication."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from genre_pipeline.data import storage
from genre_pipeline.errors import JobInputError
from genre_pipeline.genres import GENRES

logger = logging.getLogger(__name__)

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("movie_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("year", pa.int32()),
        pa.field("genres", pa.list_(pa.string())),
        pa.field("poster_uri", pa.string()),
        pa.field("split", pa.string()),
    ]
)
# The label job can run on a catalogue of new movies: genres, year and split may be absent.
REQUIRED_COLUMNS = ("movie_id", "title", "poster_uri")
DEFAULT_POSTER_PATTERN = "{movie_id}.jpg"

# "Title (Year)" where the title itself may hold parentheses: "City of Lost Children, The (Cité ...) (1995)".
_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")


class CatalogError(JobInputError, ValueError):
    """A malformed catalogue or source file; the message names the file, row/line and column."""


@dataclass(frozen=True)
class Movie:
    movie_id: int
    title: str
    year: int | None
    genres: list[str]


def is_validation(movie_id: int, fraction: float) -> bool:
    """Whether training holds this train-split movie out for validation. Stable across runs, machines and
    catalogue order (a hash of the id, not a random draw), so evaluation can find the same rows again."""
    return zlib.crc32(f"val:{movie_id}".encode()) % 10_000 < fraction * 10_000


def parse_title_year(text: str) -> tuple[str, int | None]:
    """Split MovieLens' `Title (Year)`; the year is the last parenthesised 4-digit group."""
    match = _TITLE_YEAR.match(text.strip())
    if match is None:
        return text.strip(), None
    return match.group("title"), int(match.group("year"))


def parse_movies_line(line: str, *, source: str, line_number: int) -> Movie:
    parts = line.rstrip("\r\n").split("::")
    if len(parts) != 3:
        raise CatalogError(f"{source}:{line_number}: expected 'MovieID::Title (Year)::Genres', got {line!r}")
    raw_id, raw_title, raw_genres = parts
    try:
        movie_id = int(raw_id)
    except ValueError:
        raise CatalogError(f"{source}:{line_number}: MovieID {raw_id!r} is not an integer") from None
    genres = [g for g in raw_genres.split("|") if g]
    unknown = [g for g in genres if g not in GENRES]
    if unknown:
        raise CatalogError(f"{source}:{line_number}: unknown genre(s) {unknown}")
    title, year = parse_title_year(raw_title)
    return Movie(movie_id, title, year, genres)


def read_movies_dat(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> list[Movie]:
    """Parse movies.dat (latin-1), keeping the first occurrence of a duplicated MovieID."""
    text = storage.read_bytes(uri, options).decode("latin-1")
    movies: dict[int, Movie] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        movie = parse_movies_line(line, source=uri, line_number=number)
        if movie.movie_id in movies:
            logger.warning("%s:%d: duplicate MovieID %d, keeping the first", uri, number, movie.movie_id)
            continue
        movies[movie.movie_id] = movie
    return list(movies.values())


def read_split_file(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> dict[int, str]:
    """`movie_id,split` CSV -> {movie_id: split}."""
    text = storage.read_bytes(uri, options).decode("utf-8")
    splits: dict[int, str] = {}
    for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        try:
            splits.setdefault(int(row["movie_id"]), row["split"].strip())
        except (KeyError, TypeError, ValueError):
            raise CatalogError(f"{uri}:{number}: expected columns movie_id,split; got {row}") from None
    return splits


def list_posters(location: str, options: storage.StorageOptions = storage.StorageOptions()) -> set[str]:
    """File names present under a poster folder or s3:// prefix (one listing, not one request per movie)."""
    fs, path = storage.fsspec_filesystem(location, options)
    if not fs.exists(path):
        raise CatalogError(f"{location}: poster location does not exist")
    return {entry.rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}


def movies_to_table(
    movies: Iterable[Movie], *, poster_location: str | None, pattern: str, present: set[str] | None,
    splits: dict[int, str] | None,
) -> pa.Table:
    if poster_location is not None and not storage.is_remote(poster_location):
        # Absolute, so the catalogue stays valid wherever the jobs run (a Ray worker's cwd is not the user's).
        poster_location = os.path.abspath(poster_location)
    rows: dict[str, list] = {name: [] for name in CATALOG_SCHEMA.names}
    for movie in movies:
        name = pattern.format(movie_id=movie.movie_id)
        has_poster = poster_location is not None and (present is None or name in present)
        rows["movie_id"].append(movie.movie_id)
        rows["title"].append(movie.title)
        rows["year"].append(movie.year)
        rows["genres"].append(movie.genres)
        rows["poster_uri"].append(storage.join(poster_location, name) if has_poster else None)
        rows["split"].append(splits.get(movie.movie_id) if splits is not None else None)
    return pa.table(rows, schema=CATALOG_SCHEMA)


def read_catalog(uri: str, options: storage.StorageOptions = storage.StorageOptions(),
                 columns: Sequence[str] | None = None) -> pa.Table:
    """Read a catalogue file or directory of Parquet into memory (small catalogues: tests, evaluation)."""
    fs, path = storage.arrow_filesystem(uri, options)
    try:
        table = pq.read_table(path, filesystem=fs, columns=list(columns) if columns else None)
    except (OSError, pa.ArrowInvalid) as error:
        raise CatalogError(f"{uri}: cannot read the catalogue: {error}") from None
    validate_catalog(table, source=uri)
    return table


def validate_schema(schema: pa.Schema, *, source: str, required: Sequence[str] = REQUIRED_COLUMNS) -> None:
    """Fail fast on a missing column or a column of the wrong type, naming both."""
    missing = [name for name in required if name not in schema.names]
    if missing:
        raise CatalogError(f"{source}: missing required column(s) {missing}; has {schema.names}")
    for field in CATALOG_SCHEMA:
        if field.name in schema.names and not _compatible(schema.field(field.name).type, field.type):
            raise CatalogError(
                f"{source}: column {field.name!r} has type {schema.field(field.name).type}, expected {field.type}"
            )


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _compatible(
            actual.value_type, expected.value_type
        )
    return actual == expected


def validate_catalog(table: pa.Table, *, source: str) -> None:
    """Schema, non-null unique movie_id: the checks a whole-table reader can afford."""
    validate_schema(table.schema, source=source)
    check_movie_ids(table.column("movie_id"), source=source)


def check_movie_ids(ids: pa.ChunkedArray, *, source: str) -> None:
    """movie_id must be non-null and unique: it is the key of every label row."""
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise CatalogError(f"{source}: row {row}: column 'movie_id' is null")
    counts = pc.value_counts(ids)
    duplicated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(duplicated):
        value = duplicated[0]["values"].as_py()
        rows = pc.indices_nonzero(pc.equal(ids, value)).to_pylist()
        raise CatalogError(f"{source}: column 'movie_id' value {value} is duplicated (rows {rows[:5]})")


def count_catalog_rows(uri: str, options: storage.StorageOptions = storage.StorageOptions(),
                       required: Sequence[str] = REQUIRED_COLUMNS) -> int:
    """Fail fast on a malformed catalogue (the `required` columns, unique movie_ids), reading only the id column;
    its rows."""
    fs, path = storage.arrow_filesystem(uri, options)
    try:
        dataset = pq.ParquetDataset(path, filesystem=fs)
        schema = dataset.schema
    except (OSError, ValueError) as error:
        raise CatalogError(f"{uri}: cannot read the catalogue: {error}") from None
    validate_schema(schema, source=uri, required=required)
    ids = dataset.read(columns=["movie_id"]).column("movie_id")
    check_movie_ids(ids, source=uri)
    return len(ids)


def write_catalog(table: pa.Table, uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> None:
    validate_catalog(table, source=uri)
    fs, path = storage.arrow_filesystem(uri, options)
    if not storage.is_remote(uri):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def catalog_dataset(path: str, filesystem: pafs.FileSystem, *, num_cpus: float = 1.0) -> ray.data.Dataset:
    """The catalogue through Ray Data's first Parquet reader.

    Ray 2.60's default reader (DataSource V2) lists a read by opening every file's footer on a pool of 32
    actors, a worker process each, even for a one-file catalogue: on a small node that delays the label actors'
    start (docs/performance.md). The first reader reads footers in the calling process (in tasks for many
    files) and reads the same rows; the flag is read only when the read is planned.
    """
    context = ray.data.DataContext.get_current()
    default_reader = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(path, filesystem=filesystem, num_cpus=num_cpus)
    finally:
        context.use_datasource_v2 = default_reader
