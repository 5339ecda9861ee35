"""Named failpoints: places where an operator's test can kill or pause a job to prove what survives.

`GENRE_PIPELINE_FAILPOINTS="commit.replacing=kill,model.pinned=pause"` arms them (the etcd/TiKV "failpoint"
practice); unarmed, each `reached()` only reads one environment variable. `kill` sends the process SIGKILL, as
an OOM killer or a lost node would (`kill_once`: only the first process to get there, so that a retry can
succeed); `raise` raises `FailpointError`, as a bug or a bad input would. `pause`
adds its pid to `<GENRE_PIPELINE_FAILPOINT_DIR>/<name>.reached` and waits for `<name>.release` there,
so a test can act at exactly that moment instead of guessing with a sleep.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_VAR = "GENRE_PIPELINE_FAILPOINTS"
DIR_ENV_VAR = "GENRE_PIPELINE_FAILPOINT_DIR"
PAUSE_POLL_SECONDS = 0.05
ACTIONS = ("kill", "kill_once", "raise", "pause")


class FailpointError(RuntimeError):
    """Raised where a `raise` failpoint is armed."""


def armed() -> dict[str, str]:
    """Failpoint name -> action, from the environment."""
    spec = os.environ.get(ENV_VAR, "")
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        if action not in ACTIONS:
            raise ValueError(f"{ENV_VAR}: {item!r}: the action must be one of {', '.join(ACTIONS)}")
        points[name] = action
    return points


def reached(name: str) -> None:
    """Run the action armed at `name`, if any."""
    action = armed().get(name)
    if action == "kill_once" and first_to_reach(name):
        action = "kill"
    if action == "kill":
        logger.warning("failpoint %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise FailpointError(f"failpoint {name}")
    elif action == "pause":
        folder = Path(os.environ[DIR_ENV_VAR])
        with open(folder / f"{name}.reached", "a") as reached_file:  # one line per paused process: its pid
            reached_file.write(f"{os.getpid()}\n")
        logger.warning("failpoint %s: paused until %s exists", name, folder / f"{name}.release")
        while not (folder / f"{name}.release").exists():
            time.sleep(PAUSE_POLL_SECONDS)


def first_to_reach(name: str) -> bool:
    """True for the one process that creates `<name>.fired` in the failpoint folder."""
    try:
        os.close(os.open(Path(os.environ[DIR_ENV_VAR]) / f"{name}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
