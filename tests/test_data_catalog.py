import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genre_pipeline.data.catalog import (
    CATALOG_SCHEMA,
    CatalogError,
    movies_to_table,
    parse_title_year,
    read_catalog,
    read_movies_dat,
)


@pytest.mark.parametrize(
    ("raw", "title", "year"),
    [
        ("Toy Story (1995)", "Toy Story", 1995),
        ("City of Lost Children, The (Cité des enfants perdus, La) (1995)",
         "City of Lost Children, The (Cité des enfants perdus, La)", 1995),
        ("Seven (Se7en) (1995)", "Seven (Se7en)", 1995),
        ("Untitled", "Untitled", None),
    ],
)
def test_title_and_year(raw, title, year):
    assert parse_title_year(raw) == (title, year)


def write_movies(path, lines):
    path.write_bytes("\n".join(lines).encode("latin-1"))
    return str(path)


def test_movies_dat_latin1_duplicates_keep_first(tmp_path):
    uri = write_movies(tmp_path / "movies.dat", [
        "1::Toy Story (1995)::Animation|Children's|Comedy",
        "29::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi",
        "1::Toy Story again (1999)::Drama",
    ])
    movies = read_movies_dat(uri)
    assert [m.movie_id for m in movies] == [1, 29]
    assert movies[0].title == "Toy Story" and movies[0].genres == ["Animation", "Children's", "Comedy"]
    assert movies[1].title.endswith("(Cité des enfants perdus, La)")


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [("2::Jumanji (1995)", "expected 'MovieID::Title"), ("x::Jumanji (1995)::Comedy", "MovieID .x. is not an integer"),
     ("2::Jumanji (1995)::Comedy|Cartoon", "unknown genre")],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, reason):
    uri = write_movies(tmp_path / "movies.dat", ["1::Toy Story (1995)::Comedy", bad_line])
    with pytest.raises(CatalogError, match=rf"movies.dat:2: {reason}"):
        read_movies_dat(uri)


def test_movie_without_poster_keeps_a_null_uri(tmp_path):
    uri = write_movies(tmp_path / "movies.dat", ["1::A (1990)::Drama", "2::B (1991)::Comedy"])
    table = movies_to_table(read_movies_dat(uri), poster_location=str(tmp_path / "posters"),
                            pattern="{movie_id}.jpg", present={"2.jpg"}, splits={1: "train", 2: "test"})
    assert table.schema == CATALOG_SCHEMA
    rows = table.to_pylist()
    assert rows[0]["poster_uri"] is None
    assert rows[1]["poster_uri"] == str(tmp_path / "posters" / "2.jpg")
    assert [r["split"] for r in rows] == ["train", "test"]


def test_missing_column_and_duplicates_are_named(tmp_path):
    no_poster = pa.table({"movie_id": [1, 2], "title": ["a", "b"]})
    pq.write_table(no_poster, tmp_path / "a.parquet")
    with pytest.raises(CatalogError, match=r"a.parquet: missing required column\(s\) \['poster_uri'\]"):
        read_catalog(str(tmp_path / "a.parquet"))
    duplicated = pa.table({"movie_id": [1, 2, 1], "title": ["a", "b", "c"], "poster_uri": [None, None, None]},
                          schema=pa.schema([("movie_id", pa.int64()), ("title", pa.string()),
                                            ("poster_uri", pa.string())]))
    pq.write_table(duplicated, tmp_path / "b.parquet")
    with pytest.raises(CatalogError, match=r"b.parquet: column 'movie_id' value 1 is duplicated \(rows \[0, 2\]\)"):
        read_catalog(str(tmp_path / "b.parquet"))


def test_wrong_column_type_is_named(tmp_path):
    table = pa.table({"movie_id": ["1"], "title": ["a"], "poster_uri": ["x"]})
    pq.write_table(table, tmp_path / "c.parquet")
    with pytest.raises(CatalogError, match="column 'movie_id' has type string, expected int64"):
        read_catalog(str(tmp_path / "c.parquet"))
