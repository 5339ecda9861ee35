"""Local poster reads stay under the poster roots even when a path changes between the roots check and the open.

Each test runs with openat2 (where this kernel has it) and with the component walk that replaces it where the
kernel lacks it (ENOSYS) or a seccomp profile blocks it (EPERM).
"""

from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from genre_pipeline.data import posters
from genre_pipeline.data.posters import PosterPolicy, PosterRefused, fetch_one, read_local_poster
from genre_pipeline.data.storage import StorageOptions
from genre_pipeline.failpoints import DIR_ENV_VAR, ENV_VAR

INSIDE = b"\xff\xd8 inside poster bytes"
OUTSIDE = b"\xff\xd8 OUTSIDE SECRET BYTES"
MAX_BYTES = 1000
PAUSE_SECONDS = 30


def openat2_works() -> bool:
    folder = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(posters.openat2(folder, "etc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(folder)


@pytest.fixture(params=["openat2", "walk: ENOSYS", "walk: EPERM"])
def opener(request, monkeypatch):
    """Which way local posters are opened; checks at the end that that way, and only it, was taken."""
    real_walk, walks = posters.open_by_walking, []

    def walk(root: int, relative: str) -> int:
        walks.append(relative)
        return real_walk(root, relative)

    monkeypatch.setattr(posters, "open_by_walking", walk)
    if request.param == "openat2":
        if not openat2_works():
            pytest.skip("this kernel or its seccomp profile has no openat2")
    else:
        code = errno.ENOSYS if request.param.endswith("ENOSYS") else errno.EPERM

        def unavailable(*args) -> int:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(posters, "openat2", unavailable)
    yield request.param
    assert bool(walks) == request.param.startswith("walk"), f"walked {walks}"


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/a/b/poster.jpg, and outside the root the same names holding other bytes."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for top, data in ((root, INSIDE), (outside, OUTSIDE)):
        (top / "a" / "b").mkdir(parents=True)
        (top / "a" / "b" / "poster.jpg").write_bytes(data)
    return {"root": root, "outside": outside, "poster": root / "a" / "b" / "poster.jpg"}


def fetch(uri: Path | str, tree: dict[str, Path]) -> tuple[bytes | None, str, str | None]:
    return fetch_one(str(uri), StorageOptions(), PosterPolicy.under([str(tree["root"])], MAX_BYTES))


def test_a_poster_under_its_root_is_read(opener, tree):
    assert fetch(tree["poster"], tree) == (INSIDE, "ok", None)
    assert fetch(f"file://{tree['poster']}", tree) == (INSIDE, "ok", None)


def test_only_regular_files_within_the_cap_are_read(opener, tree):
    os.mkfifo(tree["root"] / "a" / "pipe.jpg")  # O_NONBLOCK: refused at once, not waiting for a writer
    (tree["root"] / "a" / "big.jpg").write_bytes(b"x" * (MAX_BYTES + 1))
    data, status, error = fetch(tree["root"] / "a" / "pipe.jpg", tree)
    assert (data, status) == (None, "refused_poster") and error.endswith("refused: not a regular file")
    data, status, error = fetch(tree["root"] / "a" / "big.jpg", tree)
    assert (data, status) == (None, "refused_poster") and error.endswith("1,001 bytes, over --max-poster-bytes 1,000")
    missing = tree["root"] / "a" / "gone.jpg"
    assert fetch(missing, tree) == (None, "missing_poster", f"{missing}: not found")


@pytest.mark.parametrize("swapped", ["a", "a/b", "a/b/poster.jpg"])
def test_a_path_component_swapped_for_a_symlink_after_the_check_is_refused(opener, tree, swapped, tmp_path,
                                                                            monkeypatch):
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    monkeypatch.setenv(ENV_VAR, "poster.checked=pause")
    monkeypatch.setenv(DIR_ENV_VAR, str(pauses))
    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(fetch, tree["poster"], tree)
        try:
            wait_for(pauses / "poster.checked.reached")  # the roots check passed on the real path
            (tree["root"] / swapped).rename(tmp_path / "moved-away")
            (tree["root"] / swapped).symlink_to(tree["outside"] / swapped)
        finally:  # a paused thread left behind would hang the pool's shutdown
            (pauses / "poster.checked.release").touch()
        data, status, error = result.result(timeout=PAUSE_SECONDS)
    assert (data, status) == (None, "refused_poster")
    assert error == f"{tree['poster']}: refused: a symlink on its path, which changed after the roots check"
    assert str(tree["outside"]) not in error


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + PAUSE_SECONDS
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never reached"
        time.sleep(0.01)


def test_a_symlink_or_dot_dot_on_the_way_is_refused_by_the_open_itself(opener, tree):
    """What the open does when handed a path the roots check would have refused: it refuses it too."""
    (tree["root"] / "link").symlink_to(tree["outside"] / "a")
    root = f"{tree['root']}{os.sep}"
    for location in (f"{tree['root']}/link/b/poster.jpg", f"{tree['root']}/../outside/a/b/poster.jpg"):
        with pytest.raises(PosterRefused):
            read_local_poster(location, root, MAX_BYTES)


def test_a_refusal_names_the_uri_never_the_resolved_path_outside(tree):
    (tree["root"] / "escape.jpg").symlink_to(tree["outside"] / "a" / "b" / "poster.jpg")
    for uri in (tree["root"] / "escape.jpg", f"{tree['root']}/../outside/a/b/poster.jpg"):
        data, status, error = fetch(uri, tree)
        assert (data, status) == (None, "refused_poster")
        assert error == f"{uri}: refused: outside the poster roots ({tree['root']}/; see --poster-root)"
