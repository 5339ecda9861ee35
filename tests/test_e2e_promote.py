"""jobs/promote_model.py on local files: two versions published the way training publishes them, one promoted,
and the label job's model resolution then reads exactly that version; a tampered version, or a pointer whose
digest is missing, malformed or not its version's, is refused; pointers are as readable as the files they name."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import load_job, save_random_model

from genre_pipeline.model.checkpoints import DigestError, pin_model, publish_checkpoint, resolve_checkpoint


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


def test_a_pointer_whose_digest_is_not_the_versions_is_refused(published, tmp_path):
    first, second, _ = published
    model_uri = tmp_path / "runs" / "nightly" / "model"
    pointer = model_uri / "pointer.json"
    second_digest = json.loads((Path(second) / "meta.json").read_text())["weights_sha256"]
    # The pointer names e1's folder but carries e2's digest (a hand-edited or half-copied pointer).
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "checkpoint": "../versions/" + Path(first).name}))
    with pytest.raises(DigestError, match=rf"{pointer}: names .* {second_digest[:12]}.*the pointer and the version "
                                          "disagree; refusing them"):
        pin_model(str(model_uri))


@pytest.mark.parametrize("digest", ["", "0" * 12, "F" * 64, None])
def test_a_pointer_with_an_empty_or_malformed_digest_is_refused(published, tmp_path, caplog, digest):
    model_uri = tmp_path / "runs" / "nightly" / "model"
    pointer = model_uri / "pointer.json"
    recorded = {key: value for key, value in json.loads(pointer.read_text()).items() if key != "weights_sha256"}
    pointer.write_text(json.dumps(recorded if digest is None else {**recorded, "weights_sha256": digest}))
    with pytest.raises(DigestError, match=rf"{pointer}: weights sha256 .* is not a sha256"):
        pin_model(str(model_uri))
    promote = load_job("promote_model")
    assert promote.main(["--registry", str(tmp_path / "models"), "--version", str(model_uri)]) == 2
    assert str(pointer) in caplog.text


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_pointers_get_the_mode_of_the_other_published_files(published, tmp_path, umask):
    """A label job under another uid reads the pointer as it reads the version's files: 0666 less the umask."""
    first, _, registry = published
    previous = os.umask(umask)
    try:
        version = Path(publish_checkpoint(save_random_model(tmp_path / "e3", epoch=3), str(tmp_path / "run" / "model")))
        assert load_job("promote_model").main(["--registry", str(registry), "--version", first]) == 0
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((version / "meta.json").stat().st_mode) == expected  # what publishing gives other files
    for pointer in (tmp_path / "run" / "model" / "pointer.json", registry / "production" / "pointer.json"):
        assert stat.S_IMODE(pointer.stat().st_mode) == expected, oct(pointer.stat().st_mode)
