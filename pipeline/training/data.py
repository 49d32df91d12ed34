"""Training data: manifest rows checked on the driver, put in a seeded order, prepared by Ray Data.

The order is fixed before anything runs (a seeded permutation per epoch), so a checkpoint's data
position is a count of examples, and a resumed run starts its dataset right after them.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pyarrow as pa

from pipeline.checkpoints import Checkpoint
from pipeline.failures import describe
from pipeline.glimpse.objective import Example
from pipeline.glimpse.prompts import PreparedPrompt, TrainingPrompt
from pipeline.prepare import decode_image, load_images, prompt_builder
from pipeline.sources import InvalidRow, ManifestError, manifest_records, row_id
from pipeline.storage import StorageOptions

TRAINING_COLUMNS = ("answer", "boxes")
ROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("images", pa.list_(pa.string()), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("boxes", pa.list_(pa.list_(pa.float64())), nullable=False),
    ]
)
# What preparation hands the workers: the row, its place in the run, its inputs or its error.
PREPARED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
        pa.field("boxes", pa.list_(pa.list_(pa.float64()))),
        pa.field("input_ids", pa.list_(pa.int64())),
        pa.field("answer_start", pa.int64()),
        pa.field("pixel_values", pa.large_binary()),
        pa.field("pixel_dtype", pa.string()),
        pa.field("image_grid_thw", pa.list_(pa.int64())),
        pa.field("error", pa.string()),
    ]
)
SHOWN_PROBLEMS = 5


def training_rows(
    manifest: str | None,
    dataset: str | None,
    storage: StorageOptions,
    id_column: str = "id",
    image_column: str = "image",
) -> pa.Table:
    """Every row to train on (ROW_SCHEMA), read on the driver. A row that cannot be trained on
    (no answer, boxes out of range, not one image…) refuses the whole input, naming the first
    few: training on what is left would silently change the data."""
    if manifest:
        records = manifest_records(manifest, storage, TRAINING_COLUMNS)
    else:
        records = _dataset_records(dataset, id_column, image_column)
    source = manifest or dataset
    if not records:
        raise ManifestError(f"{source} has no rows; nothing was run")
    rows, problems = [], []
    for record in records:
        try:
            rows.append(training_row(record))
        except InvalidRow as e:
            problems.append(f"{record.get('id') or '(no id)'}: {e}")
    if problems:
        more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
        raise ManifestError(
            f"{len(problems)} of {len(records)} rows of {source} cannot be trained on: "
            + "; ".join(problems[:SHOWN_PROBLEMS])
            + more
            + "; nothing was run"
        )
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def training_row(record: dict) -> dict:
    """A manifest record → a ROW_SCHEMA row, or InvalidRow saying what is wrong."""
    if record.get("error"):
        raise InvalidRow(record["error"])
    if not record["id"]:
        raise InvalidRow("the row has no id")
    if len(record["images"]) != 1:
        raise InvalidRow(f"a training row needs exactly one image, not {len(record['images'])}")
    out = {"id": record["id"], "images": record["images"], "boxes": parse_boxes(record.get("boxes"))}
    for name in ("question", "answer"):
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            raise InvalidRow(f"`{name}` must be non-empty text")
        out[name] = str(value)
    return out


def parse_boxes(value) -> list[list[float]]:
    """Boxes as [[x1, y1, x2, y2], …] in [0, 1], x1 <= x2 and y1 <= y2; a CSV cell holds them as JSON."""
    if isinstance(value, str) and not isinstance(value, float):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidRow("`boxes` is not a JSON list") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidRow("`boxes` must be a non-empty list of [x1, y1, x2, y2]")
    boxes = []
    for box in value:
        try:
            if isinstance(box, (str, bytes)) or any(isinstance(v, bool) for v in box):
                raise TypeError
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise InvalidRow(f"a box must be four numbers [x1, y1, x2, y2], not {box!r}") from None
        if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)) or x1 > x2 or y1 > y2:
            raise InvalidRow(f"box {[x1, y1, x2, y2]} is not within [0, 1] with x1 <= x2 and y1 <= y2")
        boxes.append([x1, y1, x2, y2])
    return boxes


def _dataset_records(directory: str, id_column: str, image_column: str) -> list[dict]:
    """A `datasets` folder's rows without their images: the images stay on disk, memory-mapped,
    and preparation reads each one by its row index (`DIR#index`)."""
    import datasets

    ds = datasets.load_from_disk(directory)
    if image_column not in ds.column_names:
        raise ManifestError(f"dataset {directory} has no column {image_column!r}; it has {ds.column_names}")
    if not isinstance(ds.features[image_column], datasets.Image):
        raise ManifestError(
            f"dataset {directory}: column {image_column!r} holds {ds.features[image_column]}, not images "
            "(cast it with datasets.Image() before save_to_disk)"
        )
    wanted = [c for c in (id_column, "question", "answer", "boxes") if c in ds.column_names]
    table = ds.select_columns(wanted).to_dict()
    n = len(ds)
    ids = table.get(id_column) or [str(i) for i in range(n)]
    return [
        {
            "id": row_id(ids[i]),
            "images": [f"{directory}#{i}"],
            "question": table.get("question", [None] * n)[i],
            "answer": table.get("answer", [None] * n)[i],
            "boxes": table.get("boxes", [None] * n)[i],
        }
        for i in range(n)
    ]


def run_order(n_rows: int, start: int, count: int, seed: int) -> np.ndarray:
    """Row indices of the run's examples start..count-1: epoch e is permutation(seed + e) of the rows."""
    first, last = start // n_rows, math.ceil(count / n_rows)
    epochs = [np.random.default_rng(seed + e).permutation(n_rows) for e in range(first, last)]
    order = np.concatenate(epochs) if epochs else np.empty(0, dtype=np.int64)
    return order[start - first * n_rows : count - first * n_rows]


def ordered_dataset(rows: pa.Table, start: int, count: int, seed: int, block_rows: int):
    """A Ray Dataset of the run's examples from `start` on, in order, with their positions."""
    import ray.data

    order = run_order(rows.num_rows, start, count, seed)
    table = rows.take(pa.array(order)).append_column("position", pa.array(np.arange(start, count), pa.int64()))
    return ray.data.from_arrow([table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)])


def prepare_training_batch(
    batch: pa.Table,
    *,
    model: Checkpoint,
    storage: StorageOptions,
    dataset: str | None,
    image_column: str,
    min_pixels: int | None,
    max_pixels: int | None,
    max_image_bytes: int,
    max_image_pixels: int,
    pixel_dtype: str,
) -> pa.Table:
    """`map_batches` function: rows → PREPARED_SCHEMA rows, with the conversation's inputs; a row
    whose image cannot be read or prepared keeps going with `error` set, and is counted, not trained on."""
    builder = prompt_builder(model, storage, min_pixels, max_pixels)
    out = []
    for row in batch.to_pylist():
        prepared = {"id": row["id"], "position": row["position"], "boxes": row["boxes"]}
        try:
            images = _images(row, storage, dataset, image_column, max_image_bytes, max_image_pixels)
            example = builder.training(images, row["question"], row["answer"])
        except Exception as e:  # recorded on the row: one bad image never fails the batch
            prepared["error"] = ": ".join(describe(e))
        else:
            prepared.update(example.prompt.columns(pixel_dtype), answer_start=example.answer_start)
        out.append(prepared)
    return pa.Table.from_pylist(out, schema=PREPARED_SCHEMA)


def _images(
    row: dict, storage: StorageOptions, dataset: str | None, image_column: str, max_bytes: int, max_pixels: int
):
    """The row's one image: from the `datasets` folder by row index (`DIR#index`), or from storage."""
    if dataset is None:
        return load_images(row, storage, max_bytes, max_pixels)
    uri = row["images"][0]
    image = _dataset(dataset, image_column)[int(uri.rpartition("#")[2])][image_column]
    return [decode_image(image["bytes"], uri, max_pixels)]


@functools.lru_cache(maxsize=2)
def _dataset(directory: str, image_column: str):
    """A `datasets` folder, memory-mapped once per worker process, images as undecoded bytes."""
    import datasets

    return datasets.load_from_disk(directory).cast_column(image_column, datasets.Image(decode=False))


def examples(rows: list[dict]) -> tuple[list[Example], list[tuple[str, str]]]:
    """Prepared rows → the examples to train on, and (id, error) of the rows that failed."""
    good, failed = [], []
    for row in rows:
        if row["error"] is not None:
            failed.append((row["id"], row["error"]))
            continue
        prompt = PreparedPrompt.from_columns(row)
        good.append(Example(row["id"], TrainingPrompt(prompt, row["answer_start"]), row["boxes"]))
    return good, failed
