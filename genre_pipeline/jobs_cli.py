"""The jobs' command lines, defined once: each config field carries its own flag in its dataclass metadata.

    batch_size: int | None = field(default=None, metadata=flag("images per forward pass", type=positive_int))

`add_config_flags` adds `--batch-size` with the field's default (a bool is a switch, `tuple[str, ...]` a
repeatable flag, an int or float is parsed as one) and `config_from_args` builds the config back from the parsed
flags. `job_parser` builds a job's whole parser (its config's flags, then `--pushgateway` where the job pushes
metrics, then the object storage flags) and `parse_job_args` turns a command line into the config; each job lists
the flags that are not config fields in its `EXTRA_FLAGS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from datetime import date
from typing import Any, TypeVar

from genre_pipeline.data.storage import StorageOptions

FLAG = "flag"  # the field metadata key
STORAGE_FLAGS = ("--endpoint-url", "--anonymous", "--region")
PUSHGATEWAY_FLAG = "--pushgateway"
ConfigT = TypeVar("ConfigT")


def flag(help: str, *, name: str | None = None, **options: Any) -> dict[str, Any]:
    """Field metadata for a flag: its help, its name where it is not `--field-name` (users' scripts pass that
    name), and argparse options (`type` for a range check, `choices`, `action`, `metavar`)."""
    return {FLAG: {"name": name, "options": {"help": help, **options}}}


def flag_fields(config_class: type) -> list[dataclasses.Field]:
    return [field for field in dataclasses.fields(config_class) if FLAG in field.metadata]


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata[FLAG]["name"] or "--" + field.name.replace("_", "-")


def inferred_options(annotation: Any) -> dict[str, Any]:
    """What the annotation implies: a bool is a switch, a tuple a repeatable flag, a number parsed as one."""
    if isinstance(annotation, types.UnionType):  # `T | None`: None is the default, never typed in
        (annotation,) = (arg for arg in typing.get_args(annotation) if arg is not type(None))
    if annotation is bool:
        return {"action": "store_true"}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list or (origin is tuple and args[-1:] == (Ellipsis,)):  # a fixed-size tuple is one value
        return {"action": "append"}
    return {"type": annotation} if annotation in (int, float) else {}


def argparse_options(field: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    options = {"dest": field.name, **inferred_options(annotation), **field.metadata[FLAG]["options"]}
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return {**options, "required": True}
    default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    # argparse appends to the default itself: a fresh list, not the config's tuple.
    return {**options, "default": list(default) if options.get("action") == "append" else default}


def add_config_flags(parser: argparse.ArgumentParser, config_class: type,
                     groups: Mapping[str, argparse._ActionsContainer] | None = None) -> None:
    """One flag per field with `flag` metadata, in field order; `groups` puts a field's flag in an argument
    group (e.g. a required mutually exclusive one) instead of the parser."""
    annotations = typing.get_type_hints(config_class)
    for field in flag_fields(config_class):
        container = (groups or {}).get(field.name, parser)
        container.add_argument(flag_name(field), **argparse_options(field, annotations[field.name]))


def config_from_args(config_class: type[ConfigT], args: argparse.Namespace, **values: Any) -> ConfigT:
    """The config from its parsed flags; `values` are the fields that are not flags (the storage options)."""
    for field in flag_fields(config_class):
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_class(**values)


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("object storage (credentials come from the standard AWS chain)")
    group.add_argument("--endpoint-url", default=None,
                       help="S3-compatible endpoint (MinIO, moto, ...); default: AWS_ENDPOINT_URL or AWS itself")
    group.add_argument("--anonymous", action="store_true", help="unsigned requests, for public buckets")
    group.add_argument("--region", default=None, help="S3 region; default: the AWS chain's")


def storage_options_from(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(endpoint_url=args.endpoint_url, anonymous=args.anonymous, region=args.region)


def job_parser(doc: str | None, config_class: type, *, pushgateway: bool = False,
               one_of: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A job's parser: its docstring as the description, kept as written (it shows the commands that run the job),
    one flag per config field, `--pushgateway` where the job pushes metrics, and the object storage flags.
    `one_of` names fields of which exactly one must be given (a required mutually exclusive group)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = dict.fromkeys(one_of, parser.add_mutually_exclusive_group(required=True)) if one_of else None
    add_config_flags(parser, config_class, groups)
    if pushgateway:
        parser.add_argument(PUSHGATEWAY_FLAG, default=None, help="HOST:PORT of a Prometheus Pushgateway")
    add_storage_flags(parser)
    return parser


def parse_job_args(parser: argparse.ArgumentParser, config_class: type[ConfigT],
                   argv: list[str] | None) -> tuple[ConfigT, argparse.Namespace]:
    """The job's config from `argv` (the storage flags become its `storage_options`), and the parsed flags for
    those that are not config fields (e.g. `--pushgateway`)."""
    args = parser.parse_args(argv)
    return config_from_args(config_class, args, storage_options=storage_options_from(args)), args


# Flag types: argparse prints an ArgumentTypeError's message, and a ValueError as "invalid <function name> value".
def run_date(text: str) -> str:
    return date.fromisoformat(text).isoformat()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value
