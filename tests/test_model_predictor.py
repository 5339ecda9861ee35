"""The poster predictor: what scoring changes for speed (folded batch norms, bf16, threads) and what it keeps."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from conftest import save_random_model

from genre_pipeline.data.tensors import to_model_input
from genre_pipeline.model.checkpoints import load_checkpoint
from genre_pipeline.model.predictor import PosterPredictor, load_predictor


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    return save_random_model(tmp_path_factory.mktemp("model") / "model", image_size=32)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)


def unfused_scores(model_uri: str, images: np.ndarray) -> np.ndarray:
    model, meta = load_checkpoint(model_uri)
    with torch.inference_mode():
        return torch.sigmoid(model.eval()(to_model_input(torch.from_numpy(images), meta.preprocess))).numpy()


def test_folded_batch_norms_score_like_the_trained_model(model_uri, images):
    predictor = load_predictor(model_uri, device="cpu", num_threads=1)
    assert isinstance(predictor, PosterPredictor)  # the meta of a poster model picks it
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())  # really folded
    np.testing.assert_allclose(predictor.predict(images), unfused_scores(model_uri, images), atol=1e-5)


def test_pretrained_backbones_batch_norms_fold_too(tmp_path, images):
    from genre_pipeline.genres import GENRES
    from genre_pipeline.model.architectures import build_model, default_preprocess
    from genre_pipeline.model.checkpoints import ModelMeta, save_checkpoint

    torch.manual_seed(0)
    meta = ModelMeta(arch="efficientnet_lite0", genres=list(GENRES), thresholds=[0.3] * len(GENRES),
                     preprocess=default_preprocess("efficientnet_lite0"))
    model = build_model(arch="efficientnet_lite0", num_genres=len(GENRES), pretrained=True)
    save_checkpoint(tmp_path / "lite0", model, meta)
    predictor = load_predictor(str(tmp_path / "lite0"), device="cpu", num_threads=1)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())
    np.testing.assert_allclose(predictor.predict(images), unfused_scores(str(tmp_path / "lite0"), images), atol=1e-5)


def test_bf16_on_cpu_is_close_but_not_exact(model_uri, images):
    fp32 = load_predictor(model_uri, device="cpu", num_threads=1, precision="fp32").predict(images)
    bf16 = load_predictor(model_uri, device="cpu", num_threads=1, precision="bf16").predict(images)
    difference = np.abs(bf16 - fp32)
    assert 0 < difference.max() < 0.05


def test_unknown_precision_is_refused(model_uri):
    with pytest.raises(ValueError, match="precision 'int4'"):
        load_predictor(model_uri, device="cpu", precision="int4")


def test_outside_ray_it_uses_the_machines_cores_and_starts_no_ray(model_uri):
    import ray

    ray_was_running = ray.is_initialized()  # other tests share a session-wide local Ray
    assert load_predictor(model_uri, device="cpu").threads == os.cpu_count()
    assert ray.is_initialized() == ray_was_running


def test_in_a_ray_driver_it_uses_the_machines_cores(ray_local, model_uri):
    """A driver (a notebook after ray.init()) is not a task: no CPUs were assigned to it."""
    assert load_predictor(model_uri, device="cpu").threads == os.cpu_count()


def test_threads_are_set_on_the_calling_thread(model_uri, images):
    """Ray Data calls the actor from another thread than its constructor's, where Ray's OMP_NUM_THREADS=1
    would otherwise apply: the predictor sets its thread count on whichever thread calls it."""
    predictor = load_predictor(model_uri, device="cpu", num_threads=2)
    seen = []

    def score_elsewhere() -> None:
        torch.set_num_threads(1)
        predictor.predict(images)
        seen.append(torch.get_num_threads())

    worker = threading.Thread(target=score_elsewhere)
    worker.start()
    worker.join()
    assert seen == [2]
