"""Object storage through fsspec (s3fs for s3://); the same calls read local paths and file://."""

from __future__ import annotations

import functools
import logging
import os
import time

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

    def s3fs_kwargs(self) -> dict:
        kwargs: dict = {"anon": self.anon}
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


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


@functools.lru_cache(maxsize=16)
def filesystem(protocol: str, options: StorageOptions) -> fsspec.AbstractFileSystem:
    """One filesystem per protocol and options per process (s3fs clients are costly to make)."""
    if protocol in ("s3", "s3a"):
        return fsspec.filesystem("s3", **options.s3fs_kwargs())
    return fsspec.filesystem(protocol)


def filesystem_for(uri: str, options: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or local path."""
    fs = filesystem(protocol_of(uri), options)
    return fs, fs._strip_protocol(uri)


def pyarrow_filesystem(uri: str, options: StorageOptions):
    """The same filesystem wrapped for pyarrow and Ray Data readers/writers: (fs, path)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem_for(uri, options)
    return PyFileSystem(FSSpecHandler(fs)), path


class ObjectTooLarge(Exception):
    """An object is over the size limit; it was not downloaded."""


class TransientStorageError(OSError):
    """Reading kept failing with errors that retrying might have cured."""


# Errors that retrying does not cure; any other OSError (connection reset, timeout, throttling
# surfaced by s3fs as OSError) is retried with backoff.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def read_bytes(uri: str, options: StorageOptions, max_bytes: int, retries: int = 4, backoff_s: float = 0.2) -> bytes:
    """The object's bytes; refuses objects over `max_bytes` before downloading them. Transient
    errors are retried `retries` times, waiting backoff_s, 2·backoff_s, 4·backoff_s, ..."""
    attempt = 0
    while True:
        try:
            faults.before_read(uri)
            return _read_once(uri, options, max_bytes)
        except PERMANENT_ERRORS:
            raise
        except OSError as e:
            if attempt == retries:
                last = f"{type(e).__name__}: {e}"
                raise TransientStorageError(f"{uri}: {retries + 1} attempts failed; last: {last}") from e
            delay = backoff_s * 2**attempt
            log.info("read of %s failed (%s: %s); retrying in %.2fs", uri, type(e).__name__, e, delay)
            time.sleep(delay)
            attempt += 1


def _read_once(uri: str, options: StorageOptions, max_bytes: int) -> bytes:
    fs, path = filesystem_for(uri, options)
    size = fs.size(path)
    if size is not None and size > max_bytes:
        raise ObjectTooLarge(f"{uri} is {size} bytes, over the limit of {max_bytes}")
    with fs.open(path, "rb") as f:
        return f.read(max_bytes + 1)
