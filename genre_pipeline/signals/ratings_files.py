"""The ratings the "ratings" signal is computed from: listed, fingerprinted and read as (user_id, movie_id) rows.

Input: Parquet (columns user_id, movie_id, rating, optional timestamp; others ignored) or MovieLens `ratings.dat`
text (`UserID::MovieID::Rating::Timestamp`, optionally `.dat.gz`), a file or a folder, local or s3://, chosen by
suffix. A malformed file fails the run with a `RatingsError` naming the file and the line (text) or column
(Parquet); no row is dropped silently.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FileBasedDatasource

from genre_pipeline.data import storage
from genre_pipeline.errors import JobInputError

TEXT_SUFFIXES = (".dat", ".dat.gz")
PARQUET_SUFFIX = ".parquet"
DAT_COLUMNS = ["user_id", "movie_id", "rating", "timestamp"]
REQUIRED_COLUMNS = ("user_id", "movie_id", "rating")
CHUNK_BYTES = 8 << 20  # text read in chunks of whole lines: a file of any size streams in bounded memory


class RatingsError(JobInputError, ValueError):
    """Ratings that cannot be used; the message names the file and the line or column."""


def list_inputs(uri: str, options: storage.StorageOptions) -> tuple[str, list[dict]]:
    """(format, files with name/size/mtime-or-ETag) of a file or folder; one format per run."""
    with storage.reporting_errors(uri, "list the ratings"):
        fs, path = storage.fsspec_filesystem(uri, options)
        if fs.isdir(path):
            entries = [entry for entry in fs.find(path, detail=True).values() if entry["type"] == "file"]
        else:
            entries = [fs.info(path)]
    entries = [entry for entry in entries if not entry["name"].rsplit("/", 1)[-1].startswith(("_", "."))]
    formats = {input_format(entry["name"]) for entry in entries}
    if not entries:
        raise RatingsError(f"{uri}: no ratings files")
    if len(formats) != 1 or None in formats:
        names = ", ".join(sorted(entry["name"] for entry in entries)[:5])
        raise RatingsError(f"{uri}: want only *.parquet or only *.dat[.gz] files, found {names}")
    return formats.pop(), sorted(entries, key=lambda entry: entry["name"])


def input_format(name: str) -> str | None:
    if name.endswith(PARQUET_SUFFIX):
        return "parquet"
    return "dat" if name.endswith(TEXT_SUFFIXES) else None


def fingerprint(entries: list[dict], params: dict) -> str:
    """Names, sizes and mtimes (ETags on S3) of the inputs plus the parameters: cheap, no byte is read."""
    files = [[entry["name"], entry.get("size"), file_stamp(entry)]
             for entry in entries]
    return hashlib.sha256(json.dumps({"files": files, "params": params}, sort_keys=True).encode()).hexdigest()[:16]


def file_stamp(entry: dict) -> str:
    return str(entry.get("ETag") or entry.get("mtime") or entry.get("LastModified"))


def full_uri(uri: str, name: str) -> str:
    return f"s3://{name}" if storage.is_remote(uri) else name


class RatingsDatDatasource(FileBasedDatasource):
    """MovieLens `UserID::MovieID::Rating::Timestamp` lines, streamed in chunks (gzip by suffix: Ray opens the
    file decompressing); every line of every chunk is parsed or the read fails naming the file and line."""

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        carry, first_line = b"", 1
        while True:
            chunk = f.read(CHUNK_BYTES)
            data = carry + chunk
            if not chunk:
                if data.strip():
                    yield parse_dat_lines(data, path, first_line)
                return
            end = data.rfind(b"\n") + 1
            carry = data[end:]
            if end:
                yield parse_dat_lines(data[:end], path, first_line)
                first_line += data.count(b"\n", 0, end)


def parse_dat_lines(data: bytes, path: str, first_line: int) -> pa.Table:
    """Fast path: pyarrow's CSV parser on ':'-separated lines (every `::` becomes `:`); on any error, Python finds
    the first bad line so the message can name it."""
    options = pacsv.ConvertOptions(column_types={"user_id": pa.int64(), "movie_id": pa.int64(),
                                                 "rating": pa.float32(), "timestamp": pa.int64()})
    try:
        table = pacsv.read_csv(io.BytesIO(data.replace(b"::", b":")),
                               read_options=pacsv.ReadOptions(column_names=DAT_COLUMNS),
                               parse_options=pacsv.ParseOptions(delimiter=":"), convert_options=options)
    except pa.ArrowInvalid:
        raise first_bad_line(data, path, first_line) from None
    if any(table.column(name).null_count for name in table.column_names):
        raise first_bad_line(data, path, first_line)
    return table


def first_bad_line(data: bytes, path: str, first_line: int) -> RatingsError:
    for number, line in enumerate(data.splitlines(), start=first_line):
        fields = line.split(b"::")
        problem = dat_line_problem(fields)
        if problem:
            return RatingsError(f"{path}: line {number}: {problem}: {line[:200]!r}")
    return RatingsError(f"{path}: lines {first_line}+: cannot parse")


def dat_line_problem(fields: list[bytes]) -> str | None:
    if len(fields) != 4:
        return f"want 4 fields UserID::MovieID::Rating::Timestamp, got {len(fields)}"
    for name, value in zip(("UserID", "MovieID", "Timestamp"), (fields[0], fields[1], fields[3]), strict=True):
        if not value.strip().lstrip(b"-").isdigit():
            return f"field {name} is not an integer"
    try:
        float(fields[2])
    except ValueError:
        return "field Rating is not a number"
    return None


def check_parquet_schemas(uri: str, entries: list[dict], options: storage.StorageOptions) -> None:
    """Each file's footer: the required columns exist, the ids are integers (a float id would be truncated)."""
    fs, _ = storage.arrow_filesystem(uri, options)
    for entry in entries:
        name = full_uri(uri, entry["name"])
        try:
            schema = pq.read_schema(storage.arrow_filesystem(name, options)[1], filesystem=fs)
        except (OSError, pa.ArrowInvalid) as error:
            raise RatingsError(f"{name}: cannot read the Parquet footer: {error}") from None
        missing = [column for column in REQUIRED_COLUMNS if column not in schema.names]
        if missing:
            raise RatingsError(f"{name}: no column {', '.join(missing)} (has {', '.join(schema.names)})")
        for column in ("user_id", "movie_id"):
            if not pa.types.is_integer(schema.field(column).type):
                raise RatingsError(f"{name}: column {column} must be an integer type, is {schema.field(column).type}")


def check_ids(batch: pa.Table) -> pa.Table:
    """No null ids (Parquet); the file is named, the row index of the batch too."""
    for column in ("user_id", "movie_id"):
        values = batch.column(column)
        if values.null_count:
            row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            path = batch.column("path")[row].as_py()
            raise RatingsError(f"{path}: column {column}: null value ({values.null_count} in a batch)")
    return batch.select(["user_id", "movie_id"]).cast(pa.schema([("user_id", pa.int64()), ("movie_id", pa.int64())]))


def read_ratings(uri: str, file_format: str, entries: list[dict], options: storage.StorageOptions) -> ray.data.Dataset:
    """(user_id, movie_id) int64 rows, lazily streamed from the files."""
    fs, _ = storage.arrow_filesystem(uri, options)
    paths = [storage.arrow_filesystem(full_uri(uri, entry["name"]), options)[1] for entry in entries]
    if file_format == "dat":
        return ray.data.read_datasource(RatingsDatDatasource(paths, filesystem=fs)).select_columns(
            ["user_id", "movie_id"])
    check_parquet_schemas(uri, entries, options)
    context = ray.data.DataContext.get_current()
    default_reader, context.use_datasource_v2 = context.use_datasource_v2, False  # see catalog.catalog_dataset
    try:
        ratings = ray.data.read_parquet(paths, filesystem=fs, columns=list(REQUIRED_COLUMNS), include_paths=True)
    finally:
        context.use_datasource_v2 = default_reader
    return ratings.map_batches(check_ids, batch_format="pyarrow", batch_size=None)
