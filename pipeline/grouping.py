"""Rows about the same images brought next to each other before batching, so that the engine
prefills each image once for all the questions about it (see pipeline.glimpse.prefixes).

Sorting within a block moves no data; rows about one image that lie in different blocks stay
apart. A repartition by image first (Ray Data's hash shuffle, an all-to-all exchange of every row
between tasks) puts every question about an image in one block, at the cost of that exchange.
"""

from __future__ import annotations

import hashlib
import math

import pyarrow as pa
import pyarrow.compute as pc

IMAGE_KEY = "_image_key"


def group_by_image(dataset, repartition: bool = False, rows: int = 0, rows_per_block: int = 1000):
    """`dataset` (manifest rows) with each block's rows sorted by their images; with `repartition`,
    first hash-partitioned by them into about `rows` / `rows_per_block` blocks."""
    keyed = dataset.map_batches(with_image_key, batch_format="pyarrow")
    if repartition:
        keyed = keyed.repartition(num_blocks=max(1, math.ceil(rows / rows_per_block)), keys=[IMAGE_KEY])
    return keyed.map_batches(sorted_by_image, batch_size=None, batch_format="pyarrow")


def with_image_key(batch: pa.Table) -> pa.Table:
    """The rows with their `image_key`, in order."""
    inline = batch.column("image_bytes").to_pylist() if "image_bytes" in batch.column_names else None
    keys = [
        image_key(images, inline[i] if inline else None) for i, images in enumerate(batch.column("images").to_pylist())
    ]
    return batch.append_column(IMAGE_KEY, pa.array(keys, pa.string()))


def image_key(images: list[str] | None, image_bytes: list[bytes] | None = None) -> str:
    """A short hash naming a row's images: of their bytes when the row carries them (a `datasets`
    input, whose names are per row), else of their URIs."""
    digest = hashlib.blake2b(digest_size=8)
    for part in image_bytes or [uri.encode() for uri in images or []]:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def sorted_by_image(batch: pa.Table) -> pa.Table:
    """The block's rows sorted by image key (stable: questions about one image keep their order)."""
    order = pc.sort_indices(batch, sort_keys=[(IMAGE_KEY, "ascending")])
    return batch.take(order).drop_columns([IMAGE_KEY])
