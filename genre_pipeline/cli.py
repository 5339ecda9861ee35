"""The jobs' command lines, built from their configs: each config field with `config_fields.option` metadata is one
flag, with the field's default, help and rule.

`add_config_flags` adds `--batch-size` for the field `batch_size` (a bool is a switch, `tuple[str, ...]` a
repeatable flag, an int or float is parsed as one, and the field's rule is checked as the flag is parsed) and
`config_from_args` builds the config back from the parsed flags. `job_parser` builds a job's whole parser (its
config's flags, then `--pushgateway` where the job pushes metrics, then the object storage flags) and
`parse_job_args` turns a command line into the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from genre_pipeline.config_fields import OPTION, Check, field_check, option_fields
from genre_pipeline.data.storage import StorageOptions
from genre_pipeline.errors import ConfigError

STORAGE_FLAGS = ("--endpoint-url", "--anonymous", "--region")
PUSHGATEWAY_FLAG = "--pushgateway"
ConfigT = TypeVar("ConfigT")


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata[OPTION]["name"] or "--" + field.name.replace("_", "-")


def inferred_options(annotation: Any, check: Check | None) -> dict[str, Any]:
    """What the annotation implies: a bool is a switch, a tuple a repeatable flag, a number parsed as one; and
    the field's rule checked on the parsed value."""
    if isinstance(annotation, types.UnionType):  # `T | None`: None is the default, never typed in
        (annotation,) = (arg for arg in typing.get_args(annotation) if arg is not type(None))
    if annotation is bool:
        return {"action": "store_true"}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list or (origin is tuple and args[-1:] == (Ellipsis,)):  # a fixed-size tuple is one value
        return {"action": "append"}
    parse = check.parse if check is not None and check.parse else annotation if annotation in (int, float) else None
    if check is not None:
        return {"type": checked(parse or str, check)}
    return {"type": parse} if parse else {}


def checked(parse: Callable[[str], Any], check: Check) -> Callable[[str], Any]:
    """An argparse type: the flag's text parsed, then held to the field's rule; argparse prints the message."""
    def parse_and_check(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{check.rule}, got {text}") from None
        if check.problem(value):
            raise argparse.ArgumentTypeError(f"{check.rule}, got {text}")
        return value
    return parse_and_check


def argparse_options(field: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    metadata = field.metadata[OPTION]
    options = {"dest": field.name, **inferred_options(annotation, field_check(field)), "help": metadata["help"],
               **metadata["flag_options"]}
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
    for field in option_fields(config_class):
        container = (groups or {}).get(field.name, parser)
        container.add_argument(flag_name(field), **argparse_options(field, annotations[field.name]))


def config_from_args(config_class: type[ConfigT], args: argparse.Namespace, **values: Any) -> ConfigT:
    """The config from its parsed flags; `values` are the fields that are not flags (the storage options)."""
    for field in option_fields(config_class):
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
    try:
        return config_from_args(config_class, args, storage_options=storage_options_from(args)), args
    except ConfigError as error:  # flags that cannot work together: exit 2 with the usage, as a bad flag does
        parser.error(str(error))
