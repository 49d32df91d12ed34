"""Job inputs → a Ray Dataset of manifest rows (schemas.MANIFEST_SCHEMA).

Inputs are a registry of named readers: a manifest file (Parquet / JSONL / CSV), every image
under a prefix, a `datasets` dataset saved on disk, or the bundled sample images.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pyarrow as pa

from pipeline.config import SAMPLES_DIR, JobConfig
from pipeline.storage import filesystem_for, pyarrow_filesystem
from schemas import MANIFEST_SCHEMA, align

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_source(config: JobConfig):
    """The job's input as manifest rows."""
    kind = next((name for name in ("manifest", "images", "dataset") if getattr(config, name)), "samples")
    return SOURCES[kind](config)


def read_manifest(config: JobConfig):
    import ray.data

    uri = config.manifest
    fs, path = pyarrow_filesystem(uri, config.storage)
    suffix = PurePosixPath(path).suffix.lower()
    readers = {
        ".parquet": ray.data.read_parquet,
        ".jsonl": ray.data.read_json,
        ".json": ray.data.read_json,
        ".csv": ray.data.read_csv,
    }
    if suffix not in readers:
        raise ValueError(f"manifest {uri}: unknown format {suffix!r}; expected one of {sorted(readers)}")
    # Blocks of `rows_per_block` rows are the unit of streaming, retries and output files;
    # a single big manifest file would otherwise be one block, answered and written in one piece.
    return (
        readers[suffix](path, filesystem=fs)
        .repartition(target_num_rows_per_block=config.rows_per_block)
        .map_batches(normalize_manifest, batch_format="pyarrow")
    )


def normalize_manifest(batch: pa.Table) -> pa.Table:
    """`image` (one URI) or `images` (a list, or a JSON list in CSV) → `images`; ids as strings."""
    rows = batch.to_pylist()
    for row in rows:
        row["id"] = "" if row.get("id") is None else str(row["id"])  # check_ids names rows without one
        images = row.get("images", row.get("image"))
        if isinstance(images, str):
            images = json.loads(images) if images.lstrip().startswith("[") else [images]
        row["images"] = images or []
    return align(rows, MANIFEST_SCHEMA)


class ManifestError(ValueError):
    """The input cannot be run as given: rows without an id, or ids that repeat."""


def check_ids(config: JobConfig, shown: int = 10) -> None:
    """Before any GPU work: every row has an id and no id repeats. Reads the ids only (the
    manifest's id column, or the dataset's); the other inputs make unique ids."""
    if config.manifest:
        batches = read_manifest(config).select_columns(["id", "images"]).iter_batches(batch_format="pyarrow")
        rows = (
            (i, images)
            for b in batches
            for i, images in zip(b.column("id").to_pylist(), b.column("images").to_pylist())
        )
    elif config.dataset:
        import datasets

        ds = datasets.load_from_disk(config.dataset)
        if config.id_column not in ds.column_names:
            return  # the row index is the id
        rows = ((None if i is None else str(i), None) for i in ds[config.id_column])
    else:
        return
    seen: dict[str, int] = {}
    unnamed = []
    for row_id, images in rows:
        if not row_id:
            unnamed.append(images)
        else:
            seen[row_id] = seen.get(row_id, 0) + 1
    repeated = {i: n for i, n in seen.items() if n > 1}
    problems = []
    if unnamed:
        problems.append(f"{len(unnamed)} rows have no id (their images: {unnamed[:shown]})")
    if repeated:
        named = ", ".join(f"{i!r} ×{n}" for i, n in list(repeated.items())[:shown])
        more = f" and {len(repeated) - shown} more" if len(repeated) > shown else ""
        problems.append(f"{len(repeated)} ids repeat: {named}{more}")
    if problems:
        raise ManifestError("; ".join(problems) + ". Every row needs a unique id; nothing was run.")


def list_images(config: JobConfig):
    """Every image under the prefix, sorted; its id is the path relative to the prefix."""
    fs, root = filesystem_for(config.images, config.storage)
    paths = sorted(p for p in fs.find(root) if PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {config.images}")
    rows = [{"id": p[len(root) :].lstrip("/"), "images": [fs.unstrip_protocol(p)]} for p in paths]
    return _from_rows(rows, config.rows_per_block)


def read_dataset(config: JobConfig):
    """A `datasets` dataset saved with save_to_disk; images travel inline as bytes, read by Ray in blocks."""
    import datasets
    import ray.data

    ds = datasets.load_from_disk(config.dataset)
    if config.image_column not in ds.column_names:
        raise ValueError(f"dataset {config.dataset} has no column {config.image_column!r}; has {ds.column_names}")
    if config.id_column not in ds.column_names:
        # The row index becomes the id: short strings are all the driver holds, never the images.
        ds = ds.add_column(config.id_column, [str(i) for i in range(len(ds))])
    ds = ds.cast_column(config.image_column, datasets.Image(decode=False))
    columns = dict(
        dataset=config.dataset,
        id_column=config.id_column,
        question_column=config.question_column,
        image_column=config.image_column,
    )
    return ray.data.from_huggingface(ds).map_batches(dataset_rows, fn_kwargs=columns, batch_format="pyarrow")


def dataset_rows(batch: pa.Table, *, dataset: str, id_column: str, question_column: str, image_column: str):
    """Dataset rows ({bytes, path} image structs) → manifest rows with inline image bytes."""
    ids = [str(i) for i in batch.column(id_column).to_pylist()]
    questions = (
        batch.column(question_column).to_pylist() if question_column in batch.column_names else [None] * batch.num_rows
    )
    images = batch.column(image_column).to_pylist()
    rows = [
        {"id": i, "images": [f"{dataset}#{i}"], "question": q, "image_bytes": [im["bytes"]]}
        for i, q, im in zip(ids, questions, images)
    ]
    return align(rows, MANIFEST_SCHEMA)


def bundled_samples(config: JobConfig):
    cases = json.loads((SAMPLES_DIR / "cases.json").read_text())
    rows = [
        {"id": c["id"], "images": [str(Path(SAMPLES_DIR, p).resolve()) for p in c["images"]], "question": c["question"]}
        for c in cases
    ]
    return _from_rows(rows, config.rows_per_block)


def _from_rows(rows: list[dict], rows_per_block: int):
    import ray.data

    table = align(rows, MANIFEST_SCHEMA)
    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)])


SOURCES = {"manifest": read_manifest, "images": list_images, "dataset": read_dataset, "samples": bundled_samples}
