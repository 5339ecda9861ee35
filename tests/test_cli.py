"""Every job's flags come from one definition, its config dataclass: each field has exactly one flag, the other flags
are the object storage flags (and `--pushgateway` where the job pushes metrics), and the flags' defaults are the
dataclass's defaults."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from conftest import load_job

from genre_pipeline.cli import PUSHGATEWAY_FLAG, STORAGE_FLAGS, flag_name
from genre_pipeline.commands.build_catalog import CatalogConfig
from genre_pipeline.config_fields import option_fields as flag_fields
from genre_pipeline.data.storage import StorageOptions
from genre_pipeline.evaluate.evaluation import EvaluateConfig
from genre_pipeline.label.migrate import MigrateConfig
from genre_pipeline.label.pipeline import LabelConfig
from genre_pipeline.signals.ratings import RatingsConfig
from genre_pipeline.signals.titles import TitleEmbeddingConfig
from genre_pipeline.train.driver import TrainJobConfig
from genre_pipeline.train.fusion_driver import FusionJobConfig

# job -> (its config class; the least argv it accepts; the config's required fields for that argv)
JOBS = {
    "build_catalog": (CatalogConfig, ["--out", "o", "--sample", "5"], {"out": "o", "sample": 5}),
    "label_catalog": (LabelConfig, ["--catalog", "c", "--model", "m", "--output", "o"],
                      {"catalog": "c", "model": "m", "output": "o"}),
    "train_genre_model": (TrainJobConfig, ["--catalog", "c", "--storage-path", "s", "--name", "n"],
                          {"catalog": "c", "storage_path": "s", "name": "n"}),
    "evaluate": (EvaluateConfig, ["--labels", "l", "--catalog", "c"], {"labels": "l", "catalog": "c"}),
    "embed_titles": (TitleEmbeddingConfig, ["--catalog", "c", "--out", "o"], {"catalog": "c", "out": "o"}),
    "embed_ratings": (RatingsConfig, ["--ratings", "r", "--out", "o"], {"ratings": "r", "out": "o"}),
    "migrate_labels": (MigrateConfig, ["--from", "f", "--output", "o"], {"source": "f", "output": "o"}),
    "train_fusion_model": (FusionJobConfig, ["--catalog", "c", "--storage-path", "s", "--name", "n",
                                              "--title-embeddings", "t"],
                           {"catalog": "c", "storage_path": "s", "name": "n", "title_embeddings": "t"}),
}
NOT_FLAGS = {"storage_options"}  # built from the storage flags
PUSHING_JOBS = {"label_catalog", "train_genre_model", "train_fusion_model"}  # these add --pushgateway


def option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings and action.dest != "help"]


@pytest.mark.parametrize("name", JOBS)
def test_every_config_field_has_one_flag_and_the_other_flags_are_storage_or_pushgateway(name):
    job = load_job(name)
    config = JOBS[name][0]
    actions = option_actions(job.build_parser())
    fields = {field.name for field in dataclasses.fields(config)}
    assert fields - {field.name for field in flag_fields(config)} == NOT_FLAGS
    for field in flag_fields(config):
        (action,) = [action for action in actions if action.dest == field.name]
        assert action.option_strings[0] == flag_name(field) and action.help
    flags = [action.option_strings[0] for action in actions]  # a BooleanOptionalAction also has its --no- form
    assert len(flags) == len(set(flags))
    other_flags = set(flags) - {flag_name(field) for field in flag_fields(config)}
    assert other_flags == set(STORAGE_FLAGS) | ({PUSHGATEWAY_FLAG} if name in PUSHING_JOBS else set())


@pytest.mark.parametrize("name", JOBS)
def test_the_flags_defaults_are_the_configs_defaults(name):
    job = load_job(name)
    _, argv, required = JOBS[name]
    parsed = job.parse_config(argv)
    config = parsed[0] if isinstance(parsed, tuple) else parsed
    assert config == JOBS[name][0](**required)
    assert config.storage_options == StorageOptions()


def test_renamed_and_repeatable_flags_reach_their_fields():
    config, _ = load_job("label_catalog").parse_config(
        ["--catalog", "c", "--model", "m", "--output", "o", "--compile", "--poster-root", "/a", "--poster-root", "/b",
         "--endpoint-url", "http://minio:9000", "--anonymous"])
    assert config.compile_model and config.poster_roots == ("/a", "/b")
    assert config.storage_options == StorageOptions(endpoint_url="http://minio:9000", anonymous=True)


def test_boolean_optional_flags_keep_their_negative_form():
    job = load_job("train_genre_model")
    argv = ["--catalog", "c", "--storage-path", "s", "--name", "n"]
    config, _ = job.parse_config([*argv, "--no-pretrained", "--class-weighting", "--use-gpu"])
    assert (config.pretrained, config.class_weighting, config.use_gpu) == (False, True, True)
    assert job.parse_config(argv)[0].pretrained is None


def test_the_catalogue_job_parses_a_poster_size_and_needs_one_source(capsys):
    job = load_job("build_catalog")
    assert job.parse_config(["--out", "o", "--sample", "3", "--poster-size", "48x72"]).poster_size == (48, 72)
    with pytest.raises(SystemExit):
        job.parse_config(["--out", "o", "--sample", "3", "--poster-size", "4x"])
    assert "argument --poster-size: '4x' is not WIDTHxHEIGHT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.parse_config(["--out", "o"])
    assert "one of the arguments --movielens-dir --sample is required" in capsys.readouterr().err
