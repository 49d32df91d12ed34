"""CPU stage: fetch image bytes, decode, and build the model inputs of each row.

A row that cannot be prepared keeps going with its `error` set; it never fails the batch.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from pipeline.storage import StorageOptions, read_bytes
from schemas import PREPARED_SCHEMA, align


@functools.lru_cache(maxsize=4)
def prompt_builder(model: str, min_pixels: int | None, max_pixels: int | None):
    """Loaded once per worker process; Ray reuses workers across tasks."""
    from transformers import AutoConfig

    from pipeline.glimpse.prompts import PromptBuilder

    return PromptBuilder.from_pretrained(model, AutoConfig.from_pretrained(model), min_pixels, max_pixels)


def decode_image(data: bytes, name: str) -> Image.Image:
    """Bytes → an RGB image, EXIF rotation applied."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


def prepare_batch(
    batch: pa.Table,
    *,
    model: str,
    prompt: str,
    max_new_tokens: int,
    storage: StorageOptions,
    max_image_bytes: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> pa.Table:
    """`map_batches` function (tasks, not actors, so it shares CPUs with reads and writes):
    manifest rows → PREPARED_SCHEMA rows."""
    builder = prompt_builder(model, min_pixels, max_pixels)
    out = []
    for row in batch.to_pylist():
        row["question"] = row["question"] if row.get("question") else prompt
        row["max_new_tokens"] = row.get("max_new_tokens") or max_new_tokens
        try:
            prepared = builder(load_images(row, storage, max_image_bytes), row["question"])
        except Exception as e:  # recorded on the row: one bad input never fails the batch
            row["error"] = f"{type(e).__name__}: {e}"
        else:
            row["input_ids"] = prepared.input_ids.tolist()
            row["pixel_values"] = prepared.pixel_values.numpy().astype(np.float32).tobytes()
            row["image_grid_thw"] = prepared.image_grid_thw.flatten().tolist()
        out.append(row)
    return align(out, PREPARED_SCHEMA)


def load_images(row: dict, storage: StorageOptions, max_image_bytes: int) -> list[Image.Image]:
    """The row's images, from inline bytes or fetched from storage."""
    if not row["images"]:
        raise ValueError("the row names no image")
    inline = row.get("image_bytes") or []
    if inline:
        return [decode_image(data, name) for data, name in zip(inline, row["images"])]
    return [decode_image(read_bytes(uri, storage, max_image_bytes), uri) for uri in row["images"]]
