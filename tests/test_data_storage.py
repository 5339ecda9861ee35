"""storage: URI resolution, the up-front checks on local paths, and error reasons that never carry a secret.

The same checks against a real S3 API (moto's server) are in test_e2e_s3.py.
"""

from __future__ import annotations

from urllib.parse import quote

import botocore.exceptions
import fsspec.implementations.local
import pytest

from genre_pipeline.data import storage

SECRET = "test-secret-Zq8Rk2LmW9"
# A password with every character a URL parser could cut at.
PASSWORD = "Pw0rd/Tail@x:y%2Fz"


def client_error(code: str, message: str = "", operation: str = "ListObjectsV2") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": message}}, operation)


def translated(python_error: type[OSError], code: str, message: str) -> OSError:
    """What s3fs raises: a Python error whose __cause__ is botocore's ClientError."""
    error = python_error(message)
    error.__cause__ = client_error(code, message)
    return error


@pytest.mark.parametrize(("error", "reason"), [
    (translated(PermissionError, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist"),
     "the access key id is not known to the endpoint"),
    (translated(PermissionError, "SignatureDoesNotMatch", "The request signature we calculated does not match"),
     "the request signature does not match"),
    (translated(PermissionError, "403", "Forbidden"), "access denied (HTTP 403)"),
    (translated(FileNotFoundError, "NoSuchBucket", "The specified bucket does not exist"),
     "the bucket does not exist"),
    (client_error("AccessDenied", "Access Denied"), "access denied"),
    (FileNotFoundError("bucket/prefix"), "not found"),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bucket"),
     'cannot connect to the S3 endpoint: Could not connect to the endpoint URL: "http://127.0.0.1:1/bucket"'),
    (botocore.exceptions.NoCredentialsError(), "no AWS credentials found"),
])
def test_errors_are_described_in_words(error, reason):
    assert storage.describe_error(error).startswith(reason)


def test_a_secret_in_an_error_text_is_scrubbed(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(storage.StorageError) as raised, storage.reporting_errors("s3://bucket/labels", "write"):
        raise OSError(f"server echoed {SECRET} back")
    assert str(raised.value) == "s3://bucket/labels: cannot write: OSError: server echoed *** back"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_check_readable_names_a_missing_path(tmp_path):
    with pytest.raises(storage.StorageError, match=rf"^{tmp_path}/nowhere: cannot read: not found$"):
        storage.check_readable(str(tmp_path / "nowhere"))


def test_check_readable_reads_a_file_and_a_folder(tmp_path, monkeypatch):
    """A listing proves only that a name exists: one byte of the file, or of the folder's first file, is read."""
    (tmp_path / "model" / "empty-folder").mkdir(parents=True)
    (tmp_path / "model" / "meta.json").write_text("{}")
    reads = []
    real_cat_file = fsspec.implementations.local.LocalFileSystem.cat_file

    def recording_cat_file(self, path, start=None, end=None, **kwargs):
        reads.append((path, start, end))
        return real_cat_file(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "cat_file", recording_cat_file)
    meta = str(tmp_path / "model" / "meta.json")
    for uri in (str(tmp_path / "model"), meta, f"file://{tmp_path / 'model'}"):
        reads.clear()
        storage.check_readable(uri)
        assert reads == [(meta, 0, 1)], uri


def test_check_readable_refuses_an_unsupported_scheme():
    with pytest.raises(storage.StorageError, match="gs://bucket/x: unsupported scheme 'gs'"):
        storage.check_readable("gs://bucket/x")


def test_check_writable_creates_nothing_locally(tmp_path):
    target = tmp_path / "labels" / "deeper"
    storage.check_writable(str(target))
    assert list(tmp_path.iterdir()) == []


def test_check_writable_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "catalog.parquet").write_bytes(b"PAR1")
    with pytest.raises(storage.StorageError, match="is not a writable directory"):
        storage.check_writable(str(tmp_path / "catalog.parquet" / "labels"))


@pytest.mark.parametrize(("text", "redacted"), [
    (f"s3://user:{PASSWORD}@bucket/1.jpg: not found", "s3://***@bucket/1.jpg: not found"),
    ("https://ghp_T0ken/with+slash=@cdn.example/x.jpg", "https://***@cdn.example/x.jpg"),
    ("https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261130%2F"
     "us-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261130T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&"
     "X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLE&X-Amz-Signature=5d672d79c15b1316: forbidden",
     "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&"
     "X-Amz-Date=20261130T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***&"
     "X-Amz-Signature=***: forbidden"),
    ("https://b.s3.amazonaws.com/k.jpg?AWSAccessKeyId=AKIAV2EXAMPLE&Expires=1700000000&Signature=dGhp%2Bc2ln%3D",
     "https://b.s3.amazonaws.com/k.jpg?AWSAccessKeyId=***&Expires=1700000000&Signature=***"),
    ("https://storage.googleapis.com/b/k.jpg?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam&"
     "X-Goog-Expires=900&X-Goog-Signature=0a1b2c3d",
     "https://storage.googleapis.com/b/k.jpg?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=***&"
     "X-Goog-Expires=900&X-Goog-Signature=***"),
    ("https://acct.blob.core.windows.net/c/k.jpg?sv=2022-11-02&se=2026-12-01&sp=r&sig=QXp1cmU%3D",
     "https://acct.blob.core.windows.net/c/k.jpg?sv=2022-11-02&se=2026-12-01&sp=r&sig=***"),
    ('cannot connect to "http://127.0.0.1:1/b/k.jpg%3FX-Amz-Signature%3Dabc%26X-Amz-Expires%3D900%26sig%3Ddef"',
     'cannot connect to "http://127.0.0.1:1/b/k.jpg%3FX-Amz-Signature%3D***%26X-Amz-Expires%3D900%26sig%3D***"'),
    ("aws_session_token=IQoJb3JpZ2lu and {'SessionToken': 'IQoJb3JpZ2lu', 'Key': 'posters/1.jpg'}",
     "aws_session_token=*** and {'SessionToken': '***', 'Key': 'posters/1.jpg'}"),
    ("Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20261130/us-east-1/s3/aws4_request, "
     "SignedHeaders=host, Signature=5d672d79", "Authorization: *** Credential=***, SignedHeaders=host, Signature=***"),
    ("Authorization: Bearer eyJhbGciOi.eyJzdWIi.c2ln", "Authorization: Bearer ***"),
])
def test_every_credential_form_is_redacted(text, redacted):
    assert storage.redact(text) == redacted


def test_the_secret_variables_are_redacted_also_url_encoded(monkeypatch):
    token = "IQoJ/b3+JpZ2lu=="
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    assert storage.redact(f"echoed {token} and {quote(token, safe='')}") == "echoed *** and ***"


def test_a_uris_credentials_are_redacted_in_any_form_a_library_echoes():
    uri = f"s3://user:{PASSWORD}@bucket/1.jpg?X-Amz-Signature=5d672d79"
    echoes = ('Invalid bucket name "user:Pw0rd"', "key Tail@x:y/z@bucket/1.jpg", "sig%3D5d672d79 in a path")
    assert [storage.redact(echo, uri) for echo in echoes] == [
        'Invalid bucket name "user:***"', "key ***@bucket/1.jpg", "sig%3D*** in a path"]


def test_storage_errors_never_carry_the_credentials_of_their_uri():
    with pytest.raises(storage.StorageError) as raised:
        storage.check_readable(f"gs://user:{PASSWORD}@bucket/x.jpg?X-Goog-Signature=0a1b2c3d")
    assert str(raised.value) == ("gs://***@bucket/x.jpg?X-Goog-Signature=***: unsupported scheme 'gs'; use a local "
                                 "path or s3://bucket/prefix")
    uri = f"s3://user:{PASSWORD}@bucket/labels"
    with pytest.raises(storage.StorageError) as raised, storage.reporting_errors(uri, "write"):
        raise OSError('Invalid bucket name "user:Pw0rd"')
    assert str(raised.value) == 's3://***@bucket/labels: cannot write: OSError: Invalid bucket name "user:***"'
