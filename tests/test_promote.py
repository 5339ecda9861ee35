"""jobs/promote_model.py on local files: two versions published the way training publishes them, one promoted,
and the label job's model resolution then reads exactly that version; a tampered version is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_job, save_random_model

from genre_pipeline.model.checkpoints import pin_model, publish_checkpoint, resolve_checkpoint


@pytest.fixture
def published(tmp_path: Path) -> tuple[str, str, Path]:
    """Versions e1 and e2 under runs/nightly/versions/, the run's pointer at e2 (the latest)."""
    model_uri = str(tmp_path / "runs" / "nightly" / "model")
    first = publish_checkpoint(save_random_model(tmp_path / "e1", epoch=1), model_uri)
    second = publish_checkpoint(save_random_model(tmp_path / "e2", epoch=2), model_uri)
    assert first != second and resolve_checkpoint(model_uri) == second
    return first, second, tmp_path / "models"


def test_promoting_a_version_pins_the_nightly_model_to_it(published, capsys):
    first, second, registry = published
    promote = load_job("promote_model")
    assert promote.main(["--registry", str(registry), "--version", first]) == 0
    assert "promoted" in capsys.readouterr().out

    production = str(registry / "production")
    assert resolve_checkpoint(production) == first  # what the label job's --model resolves, once a night
    pinned = pin_model(production)
    meta = json.loads((Path(first) / "meta.json").read_text())
    assert pinned.meta.model_version == meta["model_version"]
    assert pinned.weights_sha256 == meta["weights_sha256"]
    pointer = json.loads((registry / "production" / "pointer.json").read_text())
    assert pointer["model_version"] == meta["model_version"]
    assert not list((registry / "production").glob(".partial-*")), "a temp file left beside the pointer"

    # A promotion is a pointer swap, nothing copied; the next one replaces it.
    assert sorted(p.name for p in (registry / "production").iterdir()) == ["pointer.json"]
    assert promote.main(["--registry", str(registry), "--version", second]) == 0
    assert resolve_checkpoint(production) == second


def test_a_tampered_version_is_refused_and_the_promotion_stays(published, caplog):
    first, second, registry = published
    promote = load_job("promote_model")
    assert promote.main(["--registry", str(registry), "--version", first]) == 0
    weights = next(p for p in Path(second).iterdir() if p.name != "meta.json")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte after publishing
    weights.write_bytes(bytes(data))
    assert promote.main(["--registry", str(registry), "--version", second]) == 2
    assert "refusing" in caplog.text
    assert resolve_checkpoint(str(registry / "production")) == first


def test_a_missing_version_is_refused(published, tmp_path):
    _, _, registry = published
    promote = load_job("promote_model")
    assert promote.main(["--registry", str(registry), "--version", str(tmp_path / "nope")]) == 2
    assert not (registry / "production" / "pointer.json").exists()
