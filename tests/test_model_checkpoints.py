"""Model pinning: the driver pins the weights' and the meta's digests once, and every actor loads exactly those
bytes; a digest that is missing, malformed or contradicted by the pointer is refused with the URI named."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import ray
from conftest import load_job, save_random_model

from genre_pipeline.errors import JobInputError
from genre_pipeline.label.actor import PosterLabeller
from genre_pipeline.model.checkpoints import (
    DigestError,
    load_checkpoint,
    pin_model,
    publish_checkpoint,
)
from genre_pipeline.model.predictor import load_predictor

LABELLER = {"run_id": "test", "labelled_at": datetime(2026, 11, 1, tzinfo=timezone.utc), "fetch_and_decode": False,
            "device": "cpu", "num_threads": 1}


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return Path(save_random_model(tmp_path / "model", thresholds=[0.4] * 18))


def test_an_actor_applies_the_pinned_thresholds(model):
    pinned = pin_model(str(model))
    assert pinned.meta_sha256 == hashlib.sha256((model / "meta.json").read_bytes()).hexdigest()
    labeller = PosterLabeller(pinned, **LABELLER)
    assert labeller.predictor.meta == pinned.meta
    assert labeller.label_kwargs["thresholds"]("poster").tolist() == pytest.approx([0.4] * 18)


def test_an_actor_refuses_thresholds_changed_after_pinning(model):
    pinned = pin_model(str(model))
    edit_json(model / "meta.json", thresholds=[0.01] * 18)  # the weights untouched: only the meta
    with pytest.raises(DigestError, match=rf"{model / 'meta.json'}: sha256 .* does not match the pinned"):
        PosterLabeller(pinned, **LABELLER)


def test_an_actor_refuses_weights_changed_after_pinning(model):
    pinned = pin_model(str(model))
    flip_a_byte(model / "model.pt")
    with pytest.raises(DigestError, match=rf"{model / 'model.pt'}: sha256 .* does not match .* pinned by this job"):
        load_predictor(pinned, device="cpu", num_threads=1)


def test_weights_tampered_with_meta_and_digest_rewritten_still_fail_the_pinned_actor(model):
    """Someone who rewrites the weights and the digest in meta.json alike passes a fresh check, not the pin."""
    pinned = pin_model(str(model))
    flip_a_byte(model / "model.pt")
    edit_json(model / "meta.json", weights_sha256=hashlib.sha256((model / "model.pt").read_bytes()).hexdigest())
    with pytest.raises(DigestError, match="meta.json: sha256 .* does not match the pinned"):
        PosterLabeller(pinned, **LABELLER)


def test_a_ray_actor_pool_given_the_pin_refuses_a_meta_changed_since(ray_local, model):
    """As the label job ships it: the PinnedModel travels to each actor through Ray, which loads it there."""
    pinned = pin_model(str(model))
    edit_json(model / "meta.json", thresholds=[0.01] * 18)  # between the driver's pin and the actors' load
    pool = ray.data.ActorPoolStrategy(size=1)
    rows = ray.data.from_items([{"movie_id": 1}]).map_batches(
        PosterLabeller, fn_constructor_kwargs={"model": pinned, **LABELLER}, compute=pool)
    with pytest.raises(ray.exceptions.RayActorError, match="meta.json: sha256 .* does not match the pinned"):
        rows.take_all()


@pytest.mark.parametrize("model_version", ["", "cnn-e1-"])
def test_an_empty_digest_is_refused_whatever_the_model_version(model, model_version):
    edit_json(model / "meta.json", weights_sha256="", model_version=model_version)
    for load in (pin_model, load_checkpoint):
        with pytest.raises(DigestError, match=rf"{model / 'meta.json'}: weights sha256 '' is not a sha256"):
            load(str(model))
    assert issubclass(DigestError, JobInputError)  # a job exits 2 on it


@pytest.mark.parametrize("digest", ["A" * 64, "a" * 63, "a" * 65, "g" * 64, " " + "a" * 63, "a" * 64 + "\n", 12345])
def test_a_malformed_digest_is_refused(model, digest):
    edit_json(model / "meta.json", weights_sha256=digest)
    with pytest.raises(DigestError, match=rf"{model / 'meta.json'}: weights sha256 .* is not a sha256 \(64 lowercase"):
        pin_model(str(model))


def test_a_malformed_digest_exits_2_naming_the_uri(model, tmp_path, caplog):
    edit_json(model / "meta.json", weights_sha256="not-a-digest")
    promote = load_job("promote_model")
    assert promote.main(["--registry", str(tmp_path / "registry"), "--version", str(model)]) == 2
    assert f"{model / 'meta.json'}: weights sha256 'not-a-digest' is not a sha256" in caplog.text


def test_a_checkpoint_with_only_the_short_digest_must_be_republished(model, tmp_path):
    """Before `weights_sha256`, meta had only the 12 hex digits in model_version: too few to pin."""
    edit_json(model / "meta.json", weights_sha256="")
    with pytest.raises(DigestError, match="only the 12 hex digits in model_version .* re-publish the checkpoint"):
        pin_model(str(model))
    version = publish_checkpoint(str(model), str(tmp_path / "run" / "model"))
    pinned = pin_model(str(tmp_path / "run" / "model"))
    assert pinned.uri == version
    assert pinned.weights_sha256 == hashlib.sha256((model / "model.pt").read_bytes()).hexdigest()
    assert pinned.meta.model_version.endswith(pinned.weights_sha256[:12])


def test_a_short_digest_that_does_not_name_the_weights_is_not_republished(model, tmp_path):
    edit_json(model / "meta.json", weights_sha256="", model_version="cnn-e1-0123456789ab")
    with pytest.raises(DigestError, match="does not name these weights"):
        publish_checkpoint(str(model), str(tmp_path / "run" / "model"))
    assert not (tmp_path / "run").exists()
