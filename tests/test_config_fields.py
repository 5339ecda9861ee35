"""genre_pipeline.config_fields: a config built in Python is held to the same rules as its command line."""

from __future__ import annotations

import dataclasses

import pytest

from genre_pipeline.config_fields import AT_LEAST_1, FRACTION, ISO_DATE, NON_NEGATIVE, POSITIVE, option_fields
from genre_pipeline.errors import ConfigError
from genre_pipeline.evaluate.evaluation import EvaluateConfig
from genre_pipeline.label.pipeline import LabelConfig
from genre_pipeline.signals.ratings import RatingsConfig
from genre_pipeline.signals.titles import TitleEmbeddingConfig
from genre_pipeline.train.driver import TrainJobConfig
from genre_pipeline.train.fusion_driver import FusionJobConfig

LABEL = {"catalog": "c", "model": "m", "output": "o"}
TRAIN = {"catalog": "c", "storage_path": "s", "name": "n"}
FUSION = {**TRAIN, "title_embeddings": "t"}


@pytest.mark.parametrize(("check", "good", "bad", "message"), [
    (AT_LEAST_1, 1, 0, "must be at least 1, got 0"),
    (POSITIVE, 0.5, 0.0, "must be more than 0, got 0.0"),
    (NON_NEGATIVE, 0.0, -1, "must be 0 or more, got -1"),
    (FRACTION, 1.0, 1.5, "must be between 0 and 1, got 1.5"),
    (ISO_DATE, "2026-12-03", "2026-13-01", "must be a date YYYY-MM-DD, got 2026-13-01"),
])
def test_each_rule_keeps_its_good_value_and_names_the_bad_one(check, good, bad, message):
    assert check.problem(good) is None
    assert check.problem(bad) == message


@pytest.mark.parametrize(("config_class", "required", "field", "value", "message"), [
    (LabelConfig, LABEL, "batch_size", 0, "LabelConfig.batch_size: must be at least 1, got 0"),
    (LabelConfig, LABEL, "max_failed_fraction", 1.5, "LabelConfig.max_failed_fraction: must be between 0 and 1"),
    (LabelConfig, LABEL, "run_date", "yesterday", "LabelConfig.run_date: must be a date YYYY-MM-DD"),
    (LabelConfig, LABEL, "num_gpus_per_actor", -1.0, "LabelConfig.num_gpus_per_actor: must be 0 or more"),
    (TrainJobConfig, TRAIN, "start_timeout", 0.0, "TrainJobConfig.start_timeout: must be more than 0"),
    (FusionJobConfig, FUSION, "dropout", 2.0, "FusionJobConfig.dropout: must be between 0 and 1"),
    (EvaluateConfig, {"labels": "l", "catalog": "c"}, "run_date", "2026-1-1",
     "EvaluateConfig.run_date: must be a date YYYY-MM-DD"),
    (RatingsConfig, {"ratings": "r", "out": "o"}, "oversampling", -1, "RatingsConfig.oversampling: must be 0 or more"),
    (TitleEmbeddingConfig, {"catalog": "c", "out": "o"}, "batch_size", 0, "TitleEmbeddingConfig.batch_size"),
])
def test_a_config_built_in_python_is_refused_naming_the_field(config_class, required, field, value, message):
    assert field in {f.name for f in option_fields(config_class)}
    config_class(**required)  # the defaults keep every rule
    with pytest.raises(ConfigError, match=message.replace(".", r"\.", 1)):
        config_class(**required, **{field: value})


def test_a_fusion_config_without_two_signals_is_refused():
    with pytest.raises(ConfigError, match="a fusion model needs at least two of poster"):
        FusionJobConfig(**TRAIN, poster=False, title_embeddings="t")


def test_none_leaves_a_setting_to_the_job():
    config = LabelConfig(**LABEL, batch_size=None, actors=None)
    assert dataclasses.replace(config, batch_size=8).batch_size == 8
