import numpy as np
import pytest

from genre_pipeline.genres import (
    GENRES,
    UnknownGenreError,
    column_name,
    encode,
    labels_from_scores,
    top_genres,
)


def test_vocabulary_is_ml1m_in_order():
    assert len(GENRES) == 18
    assert GENRES[0] == "Action" and GENRES[3] == "Children's" and GENRES[-1] == "Western"


@pytest.mark.parametrize(("genre", "column"), [("Children's", "score_childrens"), ("Film-Noir", "score_film_noir"),
                                              ("Sci-Fi", "score_sci_fi"), ("Action", "score_action")])
def test_column_names_are_sql_friendly(genre, column):
    assert column_name(genre) == column


def test_encode_is_multi_hot_in_vocabulary_order():
    vector = encode(["Drama", "Action", "Western"])
    assert vector.dtype == np.float32
    assert np.flatnonzero(vector).tolist() == [0, 7, 17]
    assert vector.sum() == 3
    assert encode(None).sum() == 0


def test_unknown_genre_is_named():
    with pytest.raises(UnknownGenreError, match="'Cartoon'"):
        encode(["Comedy", "Cartoon"])


def test_labels_from_scores_use_per_genre_thresholds():
    scores = np.array([[0.5, 0.2, 0.9], [0.1, 0.35, 0.2]])
    thresholds = np.array([0.6, 0.3, 0.5])
    assert labels_from_scores(scores, thresholds, ["A", "B", "C"]) == [["C"], ["B"]]
    assert top_genres(scores, ["A", "B", "C"]) == ["C", "B"]
