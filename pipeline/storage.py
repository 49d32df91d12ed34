"""Object storage through fsspec (s3fs for s3://); the same calls read local paths and file://.

Retries are the libraries': botocore's standard retry mode (connection errors, throttling, 5xx,
timeouts) under s3fs, with connect and read timeouts, and s3fs's own retries of interrupted
body reads. What is still failing after them becomes a TransientStorageError (`storage_error`).
"""

from __future__ import annotations

import functools
import logging
import os

import fsspec
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from pipeline import faults

log = logging.getLogger(__name__)


class StorageOptions(BaseModel):
    """S3 connection options; anything unset falls back to the standard AWS environment variables
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION), as boto does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    key: SecretStr | None = Field(None, description="access key id")
    secret: SecretStr | None = Field(None, description="secret access key")
    region: str | None = Field(None, description="region name")
    anon: bool = Field(False, description="anonymous access (public buckets)")
    max_attempts: int = Field(5, ge=1, description="attempts per S3 request (botocore's standard retry mode)")
    connect_timeout_s: float = Field(10.0, gt=0, description="seconds to wait for a connection to S3")
    read_timeout_s: float = Field(60.0, gt=0, description="seconds to wait for S3 to send data")

    def s3fs_kwargs(self) -> dict:
        kwargs: dict = {
            "anon": self.anon,
            "config_kwargs": {
                "retries": {"max_attempts": self.max_attempts, "mode": "standard"},
                "connect_timeout": self.connect_timeout_s,
                "read_timeout": self.read_timeout_s,
            },
        }
        if self.key is not None:
            kwargs["key"] = self.key.get_secret_value()
        if self.secret is not None:
            kwargs["secret"] = self.secret.get_secret_value()
        client = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client["endpoint_url"] = endpoint
        if self.region:
            client["region_name"] = self.region
        if client:
            kwargs["client_kwargs"] = client
        return kwargs


class UnsupportedURI(Exception):
    """The URI names nothing the job can read as one object: an unknown scheme, a scheme whose
    filesystem is not installed, or a directory, pipe or device rather than a regular file."""


class ObjectTooLarge(Exception):
    """An object is over the size limit; it was not downloaded."""


class TransientStorageError(OSError):
    """Reading kept failing, after the libraries' retries, with errors that retrying might cure."""


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


@functools.lru_cache(maxsize=16)
def filesystem(protocol: str, options: StorageOptions) -> fsspec.AbstractFileSystem:
    """One filesystem per protocol and options per process (s3fs clients are costly to make)."""
    if protocol in ("s3", "s3a"):
        return fsspec.filesystem("s3", session=faults.s3_session(), **options.s3fs_kwargs())
    try:
        return fsspec.filesystem(protocol)
    except (ValueError, ImportError) as e:  # unknown protocol; or known, its package missing
        raise UnsupportedURI(f"{protocol}:// cannot be read here: {e}") from e


def filesystem_for(uri: str, options: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or local path."""
    fs = filesystem(protocol_of(uri), options)
    return fs, fs._strip_protocol(uri)


def object_version(info: dict) -> str:
    """What changes when an object changes: its ETag, or its size and modification time."""
    return str(info.get("ETag") or info.get("etag") or f"{info.get('size')} {info.get('mtime')}")


def pyarrow_filesystem(uri: str, options: StorageOptions):
    """The same filesystem wrapped for pyarrow and Ray Data readers/writers: (fs, path)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem_for(uri, options)
    return PyFileSystem(FSSpecHandler(fs)), path


# Errors that say what the object is (or is not); anything else from storage is transient.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, ObjectTooLarge, UnsupportedURI)


def read_bytes(uri: str, options: StorageOptions, max_bytes: int) -> bytes:
    """The object's bytes. Refuses non-regular files, and objects over `max_bytes` before
    downloading them. Failures that survive the libraries' retries raise TransientStorageError."""
    try:
        fs, path = filesystem_for(uri, options)
        info = fs.info(path)
        if info["type"] != "file":
            kind = "directory" if info["type"] == "directory" else "pipe, socket or device"
            raise UnsupportedURI(f"{uri} is not a regular file but a {kind}")
        if info.get("size") is not None and info["size"] > max_bytes:
            raise ObjectTooLarge(f"{uri} is {info['size']} bytes, over the limit of {max_bytes}")
        with fs.open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except PERMANENT_ERRORS:
        raise
    except (IsADirectoryError, NotADirectoryError) as e:
        raise UnsupportedURI(f"{uri} is not a regular file: {e}") from e
    except Exception as e:  # connection refused or reset, timeouts, throttling, 5xx: retried already
        raise TransientStorageError(f"{uri}: {type(e).__name__}: {e}") from e
