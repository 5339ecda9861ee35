"""Ray Train on a real local Ray: a CNN learns the sample's genre cues, and a re-run resumes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import REPO, load_job

from genre_pipeline.data.catalog import is_validation
from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.data.posters import fetch_posters
from genre_pipeline.data.storage import StorageOptions
from genre_pipeline.errors import ConfigError
from genre_pipeline.evaluate.metrics import frequency_prior, mean_average_precision_at_k, prior_scores
from genre_pipeline.failpoints import DIR_ENV_VAR, ENV_VAR
from genre_pipeline.genres import GENRES, encode_many
from genre_pipeline.model.architectures import build_model
from genre_pipeline.model.checkpoints import read_meta
from genre_pipeline.train.driver import TrainJobConfig
from genre_pipeline.train.loop import TRAIN_STATE_FILE, LoopConfig, global_rows, lr_lambdas, train_one_epoch
from genre_pipeline.train.rows import (
    fingerprint,
    load_training_rows,
    positive_weights,
    prepare_training_batch,
    split_rows,
    with_targets,
)

# Ray Train writes it when it registers a reported checkpoint: from then on a restart resumes from it.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# Small enough for a 2-core CI machine, big enough to learn: 64 px posters, 2 DDP workers sharing the CPUs
# with Ray Data's decoding tasks.
COMMON = ["--arch", "cnn", "--image-size", "64", "--batch-size", "16", "--lr", "3e-3", "--num-workers", "2",
          "--cpus-per-worker", "0.5", "--val-fraction", "0.25"]


def newest_checkpoint(run_dir: Path) -> Path:
    checkpoints = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    return max(checkpoints, key=lambda p: torch.load(p / TRAIN_STATE_FILE)["state"]["epoch"])


@pytest.mark.slow
def test_cnn_learns_beyond_the_frequency_prior(ray_local, sample_catalog, tmp_path):
    job = load_job("train_genre_model")
    code = job.main(["--catalog", str(sample_catalog), "--epochs", "10", *COMMON,
                     "--storage-path", str(tmp_path), "--name", "learn"])
    assert code == 0
    meta = read_meta(str(tmp_path / "learn" / "model"))
    train, val = split_rows(load_training_rows(str(sample_catalog), StorageOptions()), 0.25)
    y_val = encode_many(val["genres"].to_pylist())
    prior = prior_scores(frequency_prior(encode_many(train["genres"].to_pylist())), len(y_val))
    # Every validation row scored: 87 rows over 2 workers, where an equal split would drop one.
    assert meta.metrics["val_rows"] == len(y_val)
    # Six runs on 87 validation movies (2026-11-30): mAP@1 0.61-0.75, mAP@3 0.58-0.67, against the prior's 0.47 and
    # 0.47. A model that learned only the genre frequencies scores about the prior; the margin leaves room for the
    # run-to-run spread (shards reach the workers in a different order each run).
    for k in (1, 3):
        prior_map = mean_average_precision_at_k(y_val, prior, k)
        assert meta.metrics[f"val_map_at_{k}"] >= prior_map + 0.05, (k, meta.metrics, prior_map)
    assert (meta.arch, meta.genres, meta.preprocess.image_size) == ("cnn", list(GENRES), 64)
    assert len(meta.thresholds) == 18 and all(0.0 < t < 1.0 for t in meta.thresholds)
    assert meta.data_fingerprint == fingerprint(train, val)


@pytest.mark.slow
def test_running_the_same_command_again_resumes(ray_local, sample_catalog, tmp_path):
    job = load_job("train_genre_model")
    command = ["--catalog", str(sample_catalog), *COMMON, "--storage-path", str(tmp_path), "--name", "resume"]
    assert job.main([*command, "--epochs", "2"]) == 0
    after_two = newest_checkpoint(tmp_path / "resume")
    weights_two = torch.load(after_two / "model.pt")
    assert job.main([*command, "--epochs", "3"]) == 0
    latest = newest_checkpoint(tmp_path / "resume")
    state = torch.load(latest / TRAIN_STATE_FILE)["state"]
    assert (state["epoch"], state["resumed_from"]) == (3, 2)
    # One more epoch moved the weights from where epoch 2 left them (a restart would not start there).
    weights_three = torch.load(latest / "model.pt")
    assert not torch.equal(weights_two["head.0.weight"], weights_three["head.0.weight"])
    assert read_meta(str(latest)).epoch == 3


@pytest.mark.slow
def test_pretrained_recipe_trains_the_head_on_frozen_features_then_the_whole_network(ray_local, sample_catalog,
                                                                                     tmp_path):
    job = load_job("train_genre_model")
    code = job.main(["--catalog", str(sample_catalog), "--arch", "efficientnet_lite0", "--image-size", "64",
                     "--head-epochs", "30", "--head-lr", "1e-3", "--epochs", "1", "--lr", "1e-3", "--batch-size", "16",
                     "--num-workers", "2", "--cpus-per-worker", "0.5", "--val-fraction", "0.25",
                     "--storage-path", str(tmp_path), "--name", "recipe"])
    assert code == 0
    checkpoints = [path for path in (tmp_path / "recipe").glob("checkpoint_*") if path.is_dir()]
    by_epoch = {read_meta(str(path)).epoch: path for path in checkpoints}
    assert sorted(by_epoch) == [0, 1]  # the head phase's checkpoint, then one full-network epoch
    package = build_model(arch="efficientnet_lite0", num_genres=len(GENRES), pretrained=True).state_dict()
    head_phase = torch.load(by_epoch[0] / "model.pt")
    # Phase 1 moved only the head: every backbone tensor is still the package's.
    assert all(torch.equal(head_phase[key], package[key]) for key in package if key.startswith("backbone."))
    assert not torch.equal(head_phase["head.1.weight"], package["head.1.weight"])
    # Phase 2 moved the backbone's weights, but not its ImageNet batch statistics.
    full = torch.load(by_epoch[1] / "model.pt")
    assert not torch.equal(full["backbone.conv_stem.weight"], package["backbone.conv_stem.weight"])
    assert torch.equal(full["backbone.bn1.running_mean"], package["backbone.bn1.running_mean"])
    meta = read_meta(str(by_epoch[0]))
    assert meta.weights_source["kind"] == "package" and meta.weights_source["file"].endswith(".pth")
    assert (meta.threshold_objective, meta.preprocess.shape, meta.preprocess.mean) == ("micro", (96, 64),
                                                                                        (0.5, 0.5, 0.5))
    assert len(set(meta.thresholds)) == 1  # micro: one threshold for every genre
    assert meta.recipe["head_epochs"] == 30 and meta.recipe["epochs"] == 1 and meta.recipe["freeze_batch_norm"]
    train, val = split_rows(load_training_rows(str(sample_catalog), StorageOptions()), 0.25)
    y_val = encode_many(val["genres"].to_pylist())
    prior = prior_scores(frequency_prior(encode_many(train["genres"].to_pylist())), len(y_val))
    # The frozen ImageNet features alone already separate the sample's coloured shapes.
    assert meta.metrics["val_map_at_1"] >= mean_average_precision_at_k(y_val, prior, 1) + 0.15, meta.metrics


def test_validation_split_is_a_stable_hash():
    chosen = [i for i in range(1, 2001) if is_validation(i, 0.15)]
    assert 0.12 < len(chosen) / 2000 < 0.18
    assert chosen == [i for i in range(2000, 0, -1) if is_validation(i, 0.15)][::-1]


def test_positive_weights_lift_rare_genres():
    genres = pa.chunked_array([[["Drama"], ["Drama"], ["Drama", "War"], ["Comedy"]]])
    weights = positive_weights(pa.table({"genres": genres}), GENRES)
    by_genre = dict(zip(GENRES, weights, strict=True))
    assert by_genre["Drama"] == 1.0  # 3 of 4: sqrt(1/3) < 1, floored at 1
    assert by_genre["War"] == pytest.approx(np.sqrt(3.0), abs=1e-4)
    assert by_genre["Western"] == pytest.approx(2.0, abs=1e-4)  # no positives: sqrt(4/1)


def test_targets_travel_as_one_multi_hot_column_and_stay_with_their_decoded_posters(sample_catalog):
    rows = load_training_rows(str(sample_catalog), StorageOptions()).slice(0, 6)
    encoded = with_targets(rows, GENRES)
    assert "genres" not in encoded.column_names and encoded["target"].type.list_size == len(GENRES)
    targets = encode_many(rows["genres"].to_pylist(), GENRES)
    batch = {"poster_uri": np.array(rows["poster_uri"].to_pylist(), dtype=object), "target": targets.copy()}
    batch["poster_uri"][1] = str(sample_catalog.parent / "no-such-poster.jpg")
    prepared = prepare_training_batch(fetch_posters(batch), image_size=32, augment=False)
    assert prepared["image"].shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(prepared["target"], np.delete(targets, 1, axis=0))


def test_backbone_learns_at_a_fraction_of_the_heads_rate():
    config = LoopConfig(arch="resnet50", genres=list(GENRES), preprocess=PreprocessSpec(224), epochs=10,
                        batch_size=8, backbone_lr_scale=0.1)
    backbone, head = lr_lambdas(config)
    assert head(0) == 1.0 and backbone(0) == pytest.approx(0.1)
    assert backbone(4) == pytest.approx(0.1 * head(4)) and head(4) < head(0)


def test_frozen_batch_norm_keeps_the_backbones_statistics_while_the_rest_trains():
    torch.manual_seed(0)
    model = build_model(arch="cnn", num_genres=len(GENRES))
    config = LoopConfig(arch="cnn", genres=list(GENRES), preprocess=PreprocessSpec(32), epochs=1, batch_size=4,
                        freeze_batch_norm=True)
    norm = model.backbone[0][1]
    running_mean = norm.running_mean.clone()
    batches = [{"image": torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8),
                "target": torch.randint(0, 2, (4, len(GENRES))).float()}]
    weights = model.backbone[0][0].weight.clone()
    train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.BCEWithLogitsLoss(), config)
    assert torch.equal(norm.running_mean, running_mean) and not norm.training
    assert model.head.training and not torch.equal(model.backbone[0][0].weight, weights)  # weights still learn
    train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.BCEWithLogitsLoss(),
                    replace(config, freeze_batch_norm=False))
    assert not torch.equal(norm.running_mean, running_mean)  # from scratch: batch norms learn their statistics


def test_an_epoch_reports_its_rows_and_time_for_throughput():
    torch.manual_seed(0)
    model = build_model(arch="baseline", num_genres=len(GENRES))
    spec = PreprocessSpec(image_size=16)
    batches = [{"image": torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8),
                "target": torch.randint(0, 2, (n, len(GENRES))).float()} for n in (4, 4, 3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = LoopConfig(arch="baseline", genres=list(GENRES), preprocess=spec, epochs=1, batch_size=4)
    result = train_one_epoch(model, batches, optimizer, torch.nn.BCEWithLogitsLoss(), config)
    assert result.rows == 11 and result.seconds > 0 and np.isfinite(result.loss)
    assert global_rows(result.rows) == 11  # a single process: its own rows


@pytest.mark.slow
def test_a_resume_with_other_data_or_optimiser_settings_is_refused(ray_local, sample_catalog, tmp_path, caplog):
    job = load_job("train_genre_model")
    command = ["--catalog", str(sample_catalog), *COMMON, "--storage-path", str(tmp_path), "--name", "fixed"]
    assert job.main([*command, "--epochs", "1"]) == 0
    before = sorted(p.name for p in (tmp_path / "fixed").iterdir())
    assert job.main([*command, "--epochs", "2", "--lr", "1e-2"]) == 2
    assert "lr: 0.003 -> 0.01" in caplog.text and "another --name" in caplog.text
    changed_data = [*command, "--epochs", "2", "--val-fraction", "0.3"]
    assert job.main(changed_data) == 2
    assert "data_fingerprint" in caplog.text
    assert job.main([*command, "--epochs", "2", "--image-size", "48"]) == 2
    assert "image_size: 64 -> 48" in caplog.text
    assert sorted(p.name for p in (tmp_path / "fixed").iterdir()) == before  # nothing trained or published


def test_worker_sizes_that_leave_ray_data_no_cpu_are_refused_at_once(ray_local, sample_catalog, tmp_path, caplog):
    job = load_job("train_genre_model")
    code = job.main(["--catalog", str(sample_catalog), "--storage-path", str(tmp_path), "--name", "starved",
                     "--arch", "cnn", "--head-epochs", "0", "--num-workers", "2", "--cpus-per-worker", "1"])
    assert code == 2
    assert ("2 Ray Train workers of 1 CPU each beside the 1 CPU Ray Data's tasks need (3 CPUs in all): the cluster "
            "has 2 CPUs") in caplog.text
    assert "try --cpus-per-worker 0.5" in caplog.text
    assert not (tmp_path / "starved").exists()


@pytest.mark.parametrize(("flag", "value"), [("--epochs", "-1"), ("--lr", "0"), ("--batch-size", "0"),
                                             ("--val-fraction", "1"), ("--cpus-per-worker", "0"),
                                             ("--image-size", "4"), ("--num-workers", "0")])
def test_numeric_training_flags_are_range_checked(flag, value, tmp_path, capsys):
    job = load_job("train_genre_model")
    with pytest.raises(SystemExit) as exit_:
        job.main(["--catalog", str(tmp_path / "none.parquet"), "--storage-path", str(tmp_path), "--name", "x",
                  "--arch", "cnn", "--head-epochs", "0", flag, value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}: must be" in error and f"got {value}" in error


@pytest.mark.parametrize(("settings", "message"), [
    ({"epochs": -1}, "TrainJobConfig.epochs: must be 0 or more, got -1"),
    ({"val_fraction": 1.0}, "TrainJobConfig.val_fraction: must be between 0 and 1"),
    ({"image_size": 4}, "TrainJobConfig.image_size: must be at least 16, got 4"),
    ({"arch": "cnn", "head_epochs": 3}, "--head-epochs 3: a head phase needs a pretrained backbone"),
    ({"arch": "cnn", "epochs": 0}, "--epochs 0 and no head phase: nothing would be trained"),
])
def test_a_training_config_built_in_python_is_checked_as_it_is_made(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainJobConfig(catalog="c", storage_path="s", name="n", **settings)


@pytest.mark.slow
def test_a_killed_training_worker_is_replaced_and_the_run_resumes_from_its_checkpoint(sample_catalog, tmp_path):
    """Both workers pause once epoch 1 is reported; when Ray Train has registered that checkpoint (its snapshot
    file appears), the test SIGKILLs one worker, as the OOM killer or a lost node would. FailureConfig restarts
    the worker group from epoch 1's checkpoint and the job still ends with exit 0."""
    pauses = tmp_path / "failpoints"
    pauses.mkdir()
    env = {**os.environ, ENV_VAR: "train.epoch_reported=pause", DIR_ENV_VAR: str(pauses)}
    command = [sys.executable, "jobs/train_genre_model.py", "--catalog", str(sample_catalog), *COMMON,
               "--epochs", "2", "--storage-path", str(tmp_path), "--name", "killed-worker"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    reached, snapshot = pauses / "train.epoch_reported.reached", tmp_path / "killed-worker" / SNAPSHOT_FILE
    try:
        deadline = time.monotonic() + 600
        while not (snapshot.exists() and reached.exists() and len(reached.read_text().split()) == 2):
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-4000:]
            time.sleep(0.05)
        os.kill(int(reached.read_text().split()[0]), signal.SIGKILL)
        (pauses / "train.epoch_reported.release").touch()
        output, _ = process.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the local Ray the driver started
    assert process.returncode == 0, output[-4000:]
    latest = newest_checkpoint(tmp_path / "killed-worker")
    state = torch.load(latest / TRAIN_STATE_FILE)["state"]
    assert (state["epoch"], state["resumed_from"]) == (2, 1)  # epoch 2 ran on top of epoch 1, not from scratch
    assert read_meta(str(tmp_path / "killed-worker" / "model")).epoch in (1, 2)
