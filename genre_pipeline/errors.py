"""The one error family that means "bad input, or a run refused": a job logs its message and exits 2.

Every package raises its own subclass (CatalogError, StorageError, CheckpointError, ...), each keeping the builtin
base that callers may catch (ValueError, RuntimeError); the jobs' runner catches this family alone.
"""

from __future__ import annotations


class JobInputError(Exception):
    """An input, setting or cluster a job cannot use, or a run it refuses; the message says which and why."""


class ConfigError(JobInputError, ValueError):
    """Settings out of range or that cannot work together, refused before any work."""


# pyarrow and fsspec report a missing local file as the builtin, unwrapped: a bad input too.
EXIT_2_ERRORS = (JobInputError, FileNotFoundError)
