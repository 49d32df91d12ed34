"""Why a row has no answer: a stable `error_code` for counting and filtering, and a message for people.

Every failure of a single row becomes one of these codes on that row; the batch and the job go on.
"""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from pipeline.glimpse.errors import RequestError
from pipeline.storage import ObjectTooLarge, TransientStorageError, UnsupportedURI

ERROR_CODES = {
    "invalid_row": "the row is malformed: no image, or a value of the wrong type or range",
    "not_found": "an image object does not exist",
    "access_denied": "storage refused to read an image",
    "storage_error": "storage kept failing after retries (unreachable, timing out, throttling)",
    "unsupported_uri": "an image URI has an unknown scheme, or names a directory, pipe or device",
    "too_large": "an image object is over --max-image-bytes",
    "empty_file": "an image object has zero bytes",
    "not_an_image": "the bytes are not an image format PIL reads",
    "corrupt_image": "the image is truncated or corrupt",
    "too_many_pixels": "the image is over --max-image-pixels, or a decompression bomb",
    "bad_question": "the question is empty or over --max-question-tokens",
    "bad_request": "the engine cannot answer the request as given (e.g. an extreme aspect ratio)",
    "out_of_memory": "out of memory even alone in a batch",
    "engine_error": "the engine failed on this row alone",
}


class RowFailure(Exception):
    """A failure of one row, with its code."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code


def describe(error: Exception) -> tuple[str, str]:
    """(error_code, message) for any exception a row's preparation or answering raised."""
    if isinstance(error, RowFailure):
        return error.code, str(error)
    message = f"{type(error).__name__}: {error}"
    for kinds, code in CODES_BY_TYPE:
        if isinstance(error, kinds):
            return code, message
    return "engine_error", message


CODES_BY_TYPE = [
    (FileNotFoundError, "not_found"),
    (PermissionError, "access_denied"),
    (ObjectTooLarge, "too_large"),
    (TransientStorageError, "storage_error"),
    (UnsupportedURI, "unsupported_uri"),
    ((Image.DecompressionBombError, Image.DecompressionBombWarning), "too_many_pixels"),
    (UnidentifiedImageError, "not_an_image"),
    (RequestError, "bad_request"),
]
