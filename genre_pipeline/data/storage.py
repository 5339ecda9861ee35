"""Resolve local paths and s3:// URIs to filesystems, the one place that knows about schemes.

Credentials are never passed through here: s3fs/botocore take them from the standard AWS chain
(environment, profiles, instance roles), so no secret travels in a job's config, logs or outputs.

`check_readable` / `check_writable` let a job fail in seconds, before any work or write, when an endpoint,
credential, bucket or prefix is wrong; their `StorageError` says which URI and why, in words, never with a secret.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlparse

import botocore.exceptions
import fsspec
import pyarrow.fs as pafs

from genre_pipeline.errors import JobInputError

ALLOWED_SCHEMES = ("", "file", "s3")
# Environment variables whose values are secrets: scrubbed from every StorageError message, because reasons
# partly come from servers and libraries we do not control.
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# What the errors of a storage call can be: OSError (local, and s3fs's translations of S3 error codes),
# botocore's own (no connection, no credentials) and S3 error codes s3fs left untranslated.
STORAGE_ERRORS = (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
# Userinfo: from `scheme://` to the last `@` of the same whitespace-free run, since a password may hold an
# unescaped `/`, `@` or `:`. A path's own `@` is hidden too: a little context lost, never a secret shown.
_URL_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)(\S*)@")
# Parameters that sign or authorise a request: presigned S3 (SigV4 `X-Amz-Signature`/`-Credential`/
# `-Security-Token`, SigV2 `Signature`/`AWSAccessKeyId`), GCS `X-Goog-Signature`, session tokens, API keys, and in a
# query string only, Azure SAS `sig` and `key` (elsewhere `Key=` is an S3 object's name). Expiry, date, algorithm
# and signed-headers parameters are not secret and stay readable. `%3D`/`%26`: a query string a library re-encoded;
# `: `: the value ends where a message goes on.
_SECRET_NAME = r"[\w.-]*(?:signature|credential|token|secret|password|passwd|accesskeyid|api[_-]?key)[\w.-]*"
_SECRET_QUERY_NAME = rf"(?:(?<![\w.-]){_SECRET_NAME}|(?:(?<=[?&;])|(?<=%3F)|(?<=%26))(?:sig|key))"
_SECRET_QUERY_VALUE = re.compile(rf"(?i)({_SECRET_QUERY_NAME}(?:=|%3D))((?:(?!%26|:\s|:$)[^&\s#'\"<>),;])+)")
_SECRET_PARAMETERS = (
    _SECRET_QUERY_VALUE,
    re.compile(rf"(?i)([\"']{_SECRET_NAME}[\"']\s*:\s*[\"'])[^\"']+"),  # a JSON object or a dict's repr
    re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)[^\s\"',;]+"),
)
_CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the AWS profile or the node's role"
# S3 error codes (also HTTP statuses: HEAD responses have no body, so no code) -> what they mean to a user.
_REASON_BY_CODE = {
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchKey": "not found",
    "404": "not found",
    "InvalidAccessKeyId": f"the access key id is not known to the endpoint; {_CREDENTIALS_HINT}",
    "SignatureDoesNotMatch": f"the request signature does not match the access key; {_CREDENTIALS_HINT}",
    "ExpiredToken": f"the session token has expired; {_CREDENTIALS_HINT}",
    "InvalidToken": f"the session token is invalid; {_CREDENTIALS_HINT}",
    "AccessDenied": f"access denied; {_CREDENTIALS_HINT} and the bucket policy",
    "403": f"access denied (HTTP 403); {_CREDENTIALS_HINT} and the bucket policy",
}


class StorageError(JobInputError, RuntimeError):
    """A URI that cannot be resolved or reached; the message names the URI, never a credential."""

    def __init__(self, message: str) -> None:
        # Redacted here, so that no raise site can forget to: messages quote user-given URIs and library text.
        super().__init__(redact(message))


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


def read_bytes(uri: str, options: StorageOptions = StorageOptions()) -> bytes:
    fs, path = fsspec_filesystem(uri, options)
    if is_remote(uri):
        return fs.cat_file(path)
    # A plain read: fsspec's local file object seeks to learn the size first, which fails on a stream (a named
    # pipe) that a plain read handles.
    with open(path, "rb") as handle:
        return handle.read()


def write_bytes(uri: str, data: bytes, options: StorageOptions = StorageOptions()) -> None:
    fs, path = fsspec_filesystem(uri, options)
    if not is_remote(uri):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(data)


def exists(uri: str, options: StorageOptions = StorageOptions()) -> bool:
    fs, path = fsspec_filesystem(uri, options)
    return fs.exists(path)


def redact(text: str, uri: str = "") -> str:
    """`text` with every credential replaced by `***`: URL userinfo (`scheme://user:password@`), the values of
    signing and token parameters (presigned URLs, SAS, `Authorization`), the values of this process's secret AWS
    variables and, given the `uri` the text is about, the credentials it holds in any form a library may have
    echoed them (decoded, re-encoded, or cut at a `/` into a bucket name)."""
    wholes = [os.environ.get(name, "") for name in SECRET_ENV_VARS] + uri_credentials(uri)
    for form in _encodings(wholes):
        text = text.replace(form, "***")
    for form in _encodings(password_pieces(uri)):  # short: only where no letter or digit is glued to it
        text = re.sub(rf"(?<![a-zA-Z0-9]){re.escape(form)}(?![a-zA-Z0-9])", "***", text)
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    for pattern in _SECRET_PARAMETERS:
        text = pattern.sub(r"\1***", text)
    return text


def uri_credentials(uri: str) -> list[str]:
    """The credentials in `uri`: its userinfo, its password (or token) and its signing parameters' values."""
    credentials = [match.group(2) for match in _SECRET_QUERY_VALUE.finditer(uri)]
    userinfo = _URL_CREDENTIALS.match(uri)
    if userinfo:
        user, colon, password = userinfo.group(2).partition(":")
        credentials += [userinfo.group(2), password if colon else user]
    return credentials


def password_pieces(uri: str) -> list[str]:
    """The password (or token) of `uri` cut at each `/`, as a library that splits a path echoes it."""
    userinfo = _URL_CREDENTIALS.match(uri)
    if not userinfo:
        return []
    user, colon, password = userinfo.group(2).partition(":")
    return (password if colon else user).split("/")


def _encodings(secrets: list[str]) -> list[str]:
    """Each secret as given, URL-decoded and URL-encoded; longest first, so that no piece splits a whole."""
    forms = {form for secret in secrets if secret for form in (secret, unquote(secret), quote(secret, safe=""))}
    return sorted(forms, key=len, reverse=True)


def _error_code(error: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, also when s3fs re-raised it as an OSError (its __cause__)."""
    for candidate in (error, error.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
    return None


def describe_error(error: BaseException, uri: str = "") -> str:
    """Why a storage call failed (on `uri`), in words a user can act on; never a credential."""
    code = _error_code(error)
    if code in _REASON_BY_CODE:
        reason = _REASON_BY_CODE[code]
    elif isinstance(error, botocore.exceptions.NoCredentialsError):
        reason = ("no AWS credentials found (environment, shared config/profile, instance or pod role); "
                  "use --anonymous for a public bucket")
    elif isinstance(error, botocore.exceptions.EndpointConnectionError):
        reason = f"cannot connect to the S3 endpoint: {error}"
    elif isinstance(error, FileNotFoundError):
        reason = "not found"
    elif isinstance(error, PermissionError):
        reason = f"permission denied: {error}"
    else:
        reason = f"{type(error).__name__}: {error}"
    return redact(reason, uri)


@contextmanager
def reporting_errors(uri: str, action: str) -> Iterator[None]:
    """Turn any storage failure inside the block into a StorageError: `<uri>: cannot <action>: <reason>`."""
    try:
        yield
    except StorageError:
        raise
    except STORAGE_ERRORS as error:
        # `from None`: the chained botocore error adds nothing for the user and is one more place a
        # request detail could leak into a log.
        raise StorageError(f"{uri}: cannot {action}: {describe_error(error, uri)}") from None


def check_readable(uri: str, options: StorageOptions = StorageOptions()) -> None:
    """Fail fast when `uri` (a file, or a folder/prefix) is missing, unreachable or unreadable.

    Lists it (a listing's error names the cause: unknown key, bad signature, no bucket) and reads one byte of
    it or of its first file, so that read permission is tested too, not just that the name exists.
    """
    with reporting_errors(uri, "read"):
        fs, path = fsspec_filesystem(uri, options)
        entries = fs.ls(path, detail=True, refresh=True)  # refresh: a cached listing proves nothing
        files = [entry for entry in entries if entry["type"] == "file" and entry.get("size")]
        if files:
            fs.cat_file(files[0]["name"], start=0, end=1)


def check_writable(uri: str, options: StorageOptions = StorageOptions()) -> None:
    """Fail fast when nothing can be written under `uri`, without leaving anything behind.

    S3: start a multipart upload under `<uri>/` and abort it. Starting one needs the same s3:PutObject
    permission as a write, and tests credentials, bucket and policy, yet no object appears: a reader listing the
    prefix meanwhile sees nothing. Local: the nearest existing folder must be a writable directory; nothing is
    created.
    """
    if not is_remote(uri):
        path = fsspec_filesystem(uri, options)[1]
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
            raise StorageError(f"{uri}: cannot write: {existing} is not a writable directory")
        return
    bucket, key = bucket_and_key(join(uri, f".write-check-{uuid.uuid4().hex}"))
    with reporting_errors(uri, "write"):
        client = s3_client(options)
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])


def bucket_and_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def s3_client(options: StorageOptions = StorageOptions()):
    """A boto3 S3 client for the calls s3fs does not expose (conditional puts); same endpoint, region and
    credential chain as the s3fs filesystems."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(signature_version=UNSIGNED) if options.anonymous else None
    return boto3.client("s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config)


def remove(uri: str, options: StorageOptions = StorageOptions()) -> None:
    fs, path = fsspec_filesystem(uri, options)
    fs.rm_file(path)


def relative_to(base: str, relative: str) -> str:
    """`relative` (e.g. "../versions/v1") resolved against the folder `base`, `..` folded (S3 keys keep them)."""
    joined = join(base, relative)
    if not is_remote(joined):
        return os.path.normpath(joined)
    scheme, path = joined.split("://", 1)
    return f"{scheme}://{posixpath.normpath(path)}"


def write_atomically(uri: str, data: bytes, options: StorageOptions = StorageOptions()) -> None:
    """Readers see the old bytes or the new: one PUT on S3, a rename of a complete file locally. A local file
    gets 0666 less the umask, as any published file: a temporary file's 0600 would lock out other uids."""
    if is_remote(uri):
        write_bytes(uri, data, options)
        return
    path = fsspec_filesystem(uri)[1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = os.path.join(os.path.dirname(path), f".partial-{uuid.uuid4().hex}")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
