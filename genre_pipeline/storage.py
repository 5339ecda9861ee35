"""Resolve local paths and s3:// URIs to filesystems, the one place that knows about schemes.

Credentials are never passed through here: s3fs/botocore take them from the standard AWS chain
(environment, profiles, instance roles), so no secret travels in a job's config, logs or outputs.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

ALLOWED_SCHEMES = ("", "file", "s3")


class StorageError(RuntimeError):
    """A URI that cannot be resolved or reached; the message names the URI, never a credential."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage; everything else comes from the AWS environment."""

    endpoint_url: str | None = None  # e.g. a MinIO/moto endpoint; else AWS_ENDPOINT_URL or AWS itself
    anonymous: bool = False  # public buckets: unsigned requests, no credentials looked up
    region: str | None = None


def scheme_of(uri: str) -> str:
    scheme = urlparse(uri).scheme
    # A Windows drive letter or a bare path has no real scheme.
    scheme = "" if len(scheme) == 1 else scheme
    if scheme not in ALLOWED_SCHEMES:
        raise StorageError(f"{uri}: unsupported scheme {scheme!r}; use a local path or s3://bucket/prefix")
    return scheme


def is_remote(uri: str) -> bool:
    return scheme_of(uri) == "s3"


def fsspec_filesystem(uri: str, options: StorageOptions = StorageOptions()) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path within it (bucket/key for S3, absolute for local)."""
    if is_remote(uri):
        kwargs: dict = {"anon": options.anonymous}
        client_kwargs = {}
        if options.endpoint_url:
            kwargs["endpoint_url"] = options.endpoint_url
        if options.region:
            client_kwargs["region_name"] = options.region
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
        return fsspec.filesystem("s3", **kwargs), uri.split("://", 1)[1].rstrip("/")
    path = uri.split("://", 1)[1] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), os.path.abspath(path)


def arrow_filesystem(uri: str, options: StorageOptions = StorageOptions()) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem (for Ray Data and pyarrow.dataset) and the path within it."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), fsspec_filesystem(uri, options)[1]
    fs, path = fsspec_filesystem(uri, options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme of `base`."""
    return posixpath.join(base.rstrip("/"), *parts) if is_remote(base) else os.path.join(base, *parts)


def to_uri(uri_like: str, path: str) -> str:
    """Turn a filesystem path back into a URI of the same kind as `uri_like`."""
    return f"s3://{path}" if is_remote(uri_like) else path


def read_bytes(uri: str, options: StorageOptions = StorageOptions()) -> bytes:
    fs, path = fsspec_filesystem(uri, options)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes, options: StorageOptions = StorageOptions()) -> None:
    fs, path = fsspec_filesystem(uri, options)
    if not is_remote(uri):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(data)


def exists(uri: str, options: StorageOptions = StorageOptions()) -> bool:
    fs, path = fsspec_filesystem(uri, options)
    return fs.exists(path)
