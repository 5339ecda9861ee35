"""The names of the signals a model scores from and of their subsets, without torch: the label job's Ray Data
tasks (input keys, write tasks) use them and should not pay torch's import in every worker they start."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

POSTER = "poster"
SIGNAL_ORDER = ("poster", "title", "ratings")  # the mask's column order
SUBSET_SEPARATOR = "+"


def subset_name(signals: Sequence[str]) -> str:
    """("title", "poster") -> "poster+title": signals in SIGNAL_ORDER, joined."""
    return SUBSET_SEPARATOR.join(s for s in SIGNAL_ORDER if s in signals)


def all_subsets(signals: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of `signals`, smallest first, each in SIGNAL_ORDER."""
    ordered = [s for s in SIGNAL_ORDER if s in signals]
    return [subset for size in range(1, len(ordered) + 1) for subset in combinations(ordered, size)]
