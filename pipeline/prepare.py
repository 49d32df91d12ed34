"""CPU stage: fetch image bytes, decode, and build the model inputs of each row.

A row that cannot be prepared keeps going with its `error` set; it never fails the batch.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.checkpoints import Checkpoint
from pipeline.failures import RowFailure, describe
from pipeline.grouping import image_key
from pipeline.storage import StorageOptions, read_bytes
from schemas import PREPARED_SCHEMA, align


@functools.lru_cache(maxsize=4)
def prompt_builder(model: Checkpoint, storage: StorageOptions, min_pixels: int | None, max_pixels: int | None):
    """Loaded once per worker process (Ray reuses workers across tasks), the checkpoint fetched
    once per node."""
    from transformers import AutoConfig

    from pipeline.glimpse.prompts import PromptBuilder

    directory = model.local_dir(storage)
    return PromptBuilder.from_pretrained(directory, AutoConfig.from_pretrained(directory), min_pixels, max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Bytes → an RGB image: first frame of an animation, EXIF rotation applied, any mode converted.
    The size is checked from the header, before the pixels are decoded."""
    if not data:
        raise RowFailure("empty_file", f"{name} has zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise RowFailure("too_many_pixels", f"{name} is {im.width}×{im.height}, over {max_pixels} pixels")
            im.seek(0)
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except (RowFailure, UnidentifiedImageError, Image.DecompressionBombError):
        raise
    except Exception as e:  # PIL raises many types for truncated or corrupt data
        raise RowFailure("corrupt_image", f"cannot decode {name}: {type(e).__name__}: {e}") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any PIL mode: 16/32-bit greyscale rescaled to 8 bits, transparency over white."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def prepare_batch(
    batch: pa.Table,
    *,
    model: Checkpoint,
    prompt: str,
    max_new_tokens: int,
    storage: StorageOptions,
    max_image_bytes: int,
    max_image_pixels: int,
    max_question_tokens: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    pixel_dtype: str = "float32",
) -> pa.Table:
    """`map_batches` function (tasks, not actors, so it shares CPUs with reads and writes):
    manifest rows → PREPARED_SCHEMA rows, pixel values in `pixel_dtype` (the model's). Rows about
    the same images (URIs, or bytes) fetch, decode and process them once per batch."""
    builder = prompt_builder(model, storage, min_pixels, max_pixels)
    processed: dict[str, tuple | Exception] = {}  # image_key → (pixels, grid) or why not
    out = []
    for row in batch.to_pylist():
        row["question"] = prompt if row.get("question") is None else row["question"]
        row["max_new_tokens"] = row.get("max_new_tokens") or max_new_tokens
        if row.get("error") is not None:  # the reader found the row malformed
            out.append(row)
            continue
        try:
            check_question(row["question"], builder, max_question_tokens)
            key = image_key(row["images"], row.get("image_bytes"))
            if key not in processed:
                try:
                    processed[key] = builder.vision(load_images(row, storage, max_image_bytes, max_image_pixels))
                except Exception as e:  # every row about these images fails the same way
                    processed[key] = e
            if isinstance(processed[key], Exception):
                raise processed[key]
            prepared = builder.with_question(*processed[key], row["question"])
            check_length(len(prepared.input_ids), row["max_new_tokens"], builder.max_positions)
        except Exception as e:  # recorded on the row: one bad input never fails the batch
            row["error_code"], row["error"] = describe(e)
        else:
            row.update(prepared.columns(pixel_dtype))
        out.append(row)
    return align(out, PREPARED_SCHEMA)


def check_question(question: str, builder, max_tokens: int) -> None:
    if not question.strip():
        raise RowFailure("bad_question", "the question is empty")
    n = len(builder.tokens(question, as_text=True))
    if n > max_tokens:
        raise RowFailure("bad_question", f"the question is {n} tokens, over the limit of {max_tokens}")


def check_length(prompt_tokens: int, max_new_tokens: int, max_positions: int | None) -> None:
    """The prompt and the longest answer must fit in the model's positions."""
    if max_positions is not None and prompt_tokens + max_new_tokens > max_positions:
        raise RowFailure(
            "invalid_row",
            f"max_new_tokens {max_new_tokens} after a prompt of {prompt_tokens} tokens passes the model's "
            f"{max_positions} positions",
        )


def load_images(row: dict, storage: StorageOptions, max_image_bytes: int, max_pixels: int) -> list[Image.Image]:
    """The row's images, from inline bytes or fetched from storage."""
    if not row["images"]:
        raise RowFailure("invalid_row", "the row names no image")
    inline = row.get("image_bytes") or []
    if inline:
        return [decode_image(data, name, max_pixels) for data, name in zip(inline, row["images"])]
    return [decode_image(read_bytes(uri, storage, max_image_bytes), uri, max_pixels) for uri in row["images"]]
