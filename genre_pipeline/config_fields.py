"""Config fields that describe and check themselves: a job's settings are a dataclass whose fields carry their help
and their range in plain metadata, and whose `__post_init__` calls `check_fields`.

    batch_size: int | None = field(default=None, metadata=option("images per forward pass", check=AT_LEAST_1))

    def __post_init__(self) -> None:
        check_fields(self)

A config built in Python is then refused as a command line is (`ConfigError` naming the field); the command line
(`genre_pipeline.cli`) reads the same metadata to build each flag and to check it while parsing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

from genre_pipeline.errors import ConfigError

OPTION = "option"  # the field metadata key


@dataclass(frozen=True)
class Check:
    """A field's rule: `holds(value)` says whether the value keeps it, `rule` says it in words
    ("must be at least 1"); `parse` turns a flag's text into the value (a ValueError there is a bad value)."""

    holds: Callable[[Any], bool]
    rule: str
    parse: Callable[[str], Any] | None = None

    def problem(self, value: Any) -> str | None:
        """Why `value` breaks the rule ("must be at least 1, got 0"), or None when it keeps it."""
        return None if self.holds(value) else f"{self.rule}, got {value}"


def at_least(low: int) -> Check:
    return Check(lambda value: value >= low, f"must be at least {low}")


def more_than(low: float) -> Check:
    return Check(lambda value: value > low, f"must be more than {low:g}")


def between(low: float, high: float) -> Check:
    return Check(lambda value: low <= value <= high, f"must be between {low:g} and {high:g}")


def iso_date_holds(value: Any) -> bool:
    try:
        return date.fromisoformat(value).isoformat() == value
    except (TypeError, ValueError):
        return False


AT_LEAST_1 = at_least(1)
POSITIVE = more_than(0)
NON_NEGATIVE = Check(lambda value: value >= 0, "must be 0 or more")
FRACTION = between(0, 1)
ISO_DATE = Check(iso_date_holds, "must be a date YYYY-MM-DD", parse=lambda text: date.fromisoformat(text).isoformat())


def option(help: str, *, check: Check | None = None, name: str | None = None, **flag_options: Any) -> dict[str, Any]:
    """Field metadata: its help, the rule its value keeps, and for the command line its flag name where that is
    not `--field-name` (users' scripts pass that name) and argparse options (`choices`, `metavar`)."""
    return {OPTION: {"help": help, "check": check, "name": name, "flag_options": flag_options}}


def option_fields(config_class: type) -> list[dataclasses.Field]:
    return [field for field in dataclasses.fields(config_class) if OPTION in field.metadata]


def field_check(field: dataclasses.Field) -> Check | None:
    return field.metadata[OPTION]["check"]


def check_fields(config: Any) -> None:
    """Refuse a config whose fields break their rules; None (a default left to the job) keeps every rule."""
    for field in option_fields(type(config)):
        check, value = field_check(field), getattr(config, field.name)
        problem = check.problem(value) if check is not None and value is not None else None
        if problem:
            raise ConfigError(f"{type(config).__name__}.{field.name}: {problem}")
