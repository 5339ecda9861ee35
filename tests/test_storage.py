"""storage: URI resolution, the up-front checks on local paths, and error reasons that never carry a secret.

The same checks against a real S3 API (moto's server) are in test_s3.py.
"""

from __future__ import annotations

import botocore.exceptions
import pytest

from genre_pipeline.data import storage

SECRET = "test-secret-Zq8Rk2LmW9"


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


def test_check_readable_reads_a_file_and_a_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "meta.json").write_text("{}")
    storage.check_readable(str(tmp_path / "model"))
    storage.check_readable(str(tmp_path / "model" / "meta.json"))
    storage.check_readable(f"file://{tmp_path / 'model'}")


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
