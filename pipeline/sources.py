"""Job inputs → a Ray Dataset of manifest rows (schemas.MANIFEST_SCHEMA).

Inputs are a registry of named readers: a manifest file (Parquet / JSONL / CSV), every image
under a prefix, a `datasets` dataset saved on disk, or the bundled sample images.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path, PurePosixPath

import pyarrow as pa

from pipeline.config import SAMPLES_DIR, JobConfig
from pipeline.storage import StorageOptions, filesystem_for, object_version, pyarrow_filesystem
from schemas import MANIFEST_SCHEMA, align


class ManifestError(ValueError):
    """The input cannot be run as given: unreadable, empty, rows without an id, ids that repeat."""


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_source(config: JobConfig):
    """The job's input as manifest rows."""
    kind = next((name for name in ("manifest", "images", "dataset") if getattr(config, name)), "samples")
    return SOURCES[kind](config)


# Manifest columns read as text whatever their cells look like, so ids stay as written (`007`
# is not 7, `1e3` not 1000.0), and each row's values are checked on their own (normalize_row).
TEXT_COLUMNS = ("id", "image", "images", "question", "max_new_tokens", "answers", "answer_ref")
MAX_NEW_TOKENS_LIMIT = 2**31 - 1  # int32 in the schemas; the model's own limit is checked later


def read_manifest(config: JobConfig):
    import ray.data

    fs, path = pyarrow_filesystem(config.manifest, config.storage)
    suffix = manifest_format(config.manifest)
    if suffix == ".parquet":
        rows, normalize = ray.data.read_parquet(path, filesystem=fs), normalize_manifest
    elif suffix in (".jsonl", ".json"):
        # Parsed here, line by line, not by pyarrow's JSON reader: it infers types (an id 7 cannot
        # be read as a string) and one line of another shape fails the whole file.
        rows, normalize = ray.data.read_text(path, filesystem=fs), parse_json_lines
    else:
        rows, normalize = ray.data.read_csv(path, filesystem=fs, convert_options=csv_as_text()), normalize_manifest
    # Blocks of `rows_per_block` rows are the unit of streaming, retries and output files;
    # a single big manifest file would otherwise be one block, answered and written in one piece.
    return rows.repartition(target_num_rows_per_block=config.rows_per_block).map_batches(
        normalize, batch_format="pyarrow"
    )


def normalize_manifest(batch: pa.Table) -> pa.Table:
    """Manifest rows as read → MANIFEST_SCHEMA rows, one bad row marked `invalid_row` on its own."""
    return align([normalize_row(row) for row in batch.to_pylist()], MANIFEST_SCHEMA)


def parse_json_lines(batch: pa.Table) -> pa.Table:
    """JSON Lines (Ray's `text` column) → MANIFEST_SCHEMA rows. Numbers keep their written form."""
    return align([normalize_row(parse_json_line(line)) for line in batch.column("text").to_pylist()], MANIFEST_SCHEMA)


def parse_json_line(line: str) -> dict:
    """One manifest line as a dict, numbers as written (JsonNumber); a bad line as {"error": …}."""
    try:
        row = json.loads(line, parse_int=JsonNumber, parse_float=JsonNumber, parse_constant=JsonNumber)
    except ValueError as e:
        return {"error": f"a manifest line is not JSON ({e}): {line[:80]!r}"}
    if not isinstance(row, dict):
        return {"error": f"a manifest line is not a JSON object: {line[:80]!r}"}
    return row


class JsonNumber(str):
    """A JSON number kept as written (`1e3` stays "1e3"): an id as text, a count as a number, and
    never an image URI or a question."""


class InvalidRow(ValueError):
    """A manifest row whose values have the wrong type or range."""


def normalize_row(row: dict) -> dict:
    """One manifest row → MANIFEST_SCHEMA's columns. `image` (one URI) or `images` (a list, or in
    CSV a JSON list) → `images`; ids as strings, missing ones (null, NaN) as "" for check_ids to
    name. A value of the wrong type or range marks the row `invalid_row`; it fails alone."""
    out = {"id": row_id(row.get("id")), "images": [], "question": None, "max_new_tokens": None, "references": None}
    out["error_code"], out["error"] = ("invalid_row", row["error"]) if row.get("error") else (None, None)
    try:
        out["images"] = image_list(row.get("image"), row.get("images"))
        out["question"] = optional_text(row.get("question"), "question")
        out["max_new_tokens"] = optional_token_count(row.get("max_new_tokens"))
        out["references"] = reference_list(row.get("answers"), row.get("answer_ref"))
    except InvalidRow as e:
        out["error_code"], out["error"] = "invalid_row", str(e)
    return out


def row_id(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def image_list(image, images) -> list[str]:
    if image is not None and images is not None:
        raise InvalidRow("the row gives both `image` and `images`; give one")
    value = images if images is not None else image
    if value is None:
        return []
    if isinstance(value, str) and not isinstance(value, JsonNumber):
        listed = _json_list(value)
        return listed if listed is not None else [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and not isinstance(v, JsonNumber) for v in value):
        return list(value)
    raise InvalidRow(f"`images` must be URIs (strings), not {_kind(value)}")


def reference_list(answers, answer_ref) -> list[str] | None:
    """The row's reference answers: `answers` (a list; in CSV a JSON list) or `answer_ref` (one).
    Numbers become text as written (JSON) or as Python writes them (Parquet); None when the row
    has none, and an empty `answers` list means none. Anything else marks the row invalid_row."""
    if answers is not None and answer_ref is not None:
        raise InvalidRow("the row gives both `answers` and `answer_ref`; give one")
    if answer_ref is not None:
        return [_reference_text(answer_ref, "`answer_ref`")]
    if answers is None:
        return None
    if isinstance(answers, str) and not isinstance(answers, JsonNumber):
        answers = _json_value(answers) if answers.lstrip().startswith("[") else [answers]
    if not isinstance(answers, (list, tuple)):
        raise InvalidRow(f"`answers` must be a list of answers, not {_kind(answers)}")
    return [_reference_text(a, f"`answers` item {i + 1}") for i, a in enumerate(answers)] or None


def _reference_text(value, where: str) -> str:
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise InvalidRow(f"{where} must be text or a number, not {_kind(value)}")


def _json_value(text: str):
    """A CSV cell that looks like a JSON list, parsed (its items checked by the caller); one that
    does not parse is a single answer that starts with "["."""
    try:
        return json.loads(text)
    except ValueError:
        return [text]


def _json_list(text: str) -> list[str] | None:
    """The cell as a list when it is a valid JSON list of strings (a CSV `images` cell), else None."""
    if not text.lstrip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def optional_text(value, name: str) -> str | None:
    if value is None or (isinstance(value, str) and not isinstance(value, JsonNumber)):
        return value
    raise InvalidRow(f"`{name}` must be text, not {_kind(value)}")


def optional_token_count(value) -> int | None:
    """A per-row max_new_tokens: a whole number from 1 on (as a number or as text), or null."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            pass
    if number is None or not 1 <= number <= MAX_NEW_TOKENS_LIMIT:
        raise InvalidRow(f"`max_new_tokens` must be a whole number from 1 to {MAX_NEW_TOKENS_LIMIT}, not {value!r}")
    return number


def _kind(value) -> str:
    kind = "number" if isinstance(value, JsonNumber) else type(value).__name__
    return f"{kind} {str(value)!r}"[:80]


def check_ids(config: JobConfig, shown: int = 10) -> set[str] | None:
    """Before any GPU work: every row has an id and no id repeats. Reads the ids only (the
    manifest's id column, or the dataset's) and returns them; None for the inputs that make
    their own unique ids (an image prefix, the samples)."""
    if config.manifest:
        rows = manifest_ids(config)
    elif config.dataset:
        import datasets

        try:
            ds = datasets.load_from_disk(config.dataset)
        except (OSError, ValueError) as e:
            raise ManifestError(f"cannot read the dataset {config.dataset}: {e}; nothing was run") from None
        if config.id_column not in ds.column_names:
            return None  # the row index is the id
        rows = ((row_id(i), None, None) for i in ds[config.id_column])
    elif config.images:
        if not image_listing(config.images, config.storage):
            raise ManifestError(
                f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {config.images}; nothing was run"
            )
        return None
    else:
        return None
    seen: dict[str, int] = {}
    unnamed = []
    for name, images, error in rows:
        if not name:
            unnamed.append(error or images)
        else:
            seen[name] = seen.get(name, 0) + 1
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
    return set(seen)


def listed_ids(config: JobConfig) -> list[str]:
    """The ids of an input that makes its own (check_ids gives None): an image prefix's paths,
    the samples' case ids, a dataset's row indexes."""
    if config.images:
        return [name for name, _, _ in image_listing(config.images, config.storage)]
    if config.dataset:
        import datasets

        return [str(i) for i in range(len(datasets.load_from_disk(config.dataset)))]
    return [case["id"] for case in json.loads((SAMPLES_DIR / "cases.json").read_text())]


def manifest_ids(config: JobConfig) -> list[tuple[str, list[str], str | None]]:
    """(id, images, error) of every manifest row, read on the driver without Ray (so a bad
    manifest is reported before a cluster is started). A manifest that cannot be parsed at all
    (a CSV row with too many cells, bytes that are not UTF-8, a missing file) is a ManifestError."""
    try:
        table = manifest_table(config.manifest, config.storage)
    except ManifestError:
        raise
    except Exception as e:
        text = str(e).strip()
        problem = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
        raise ManifestError(f"cannot read the manifest {config.manifest}: {problem}; nothing was run") from None
    if not table.num_rows:
        raise ManifestError(f"the manifest {config.manifest} has no rows; nothing was run")
    return list(zip(*(table.column(c).to_pylist() for c in ("id", "images", "error"))))


def manifest_table(uri: str, storage: StorageOptions) -> pa.Table:
    """The whole manifest (a file, or a folder of files of one format) as MANIFEST_SCHEMA rows,
    read with pyarrow alone, as the job's Ray reader reads it."""
    return align([normalize_row(row) for row in _raw_rows(uri, storage, ())], MANIFEST_SCHEMA)


def manifest_records(uri: str, storage: StorageOptions, extra_columns: tuple[str, ...]) -> list[dict]:
    """Every manifest row as `normalize_row` gives it, plus the values of `extra_columns` as read
    (JSON numbers as written, CSV cells as text): a training manifest's answers and boxes."""
    return [
        normalize_row(row) | {c: row.get(c) for c in extra_columns} for row in _raw_rows(uri, storage, extra_columns)
    ]


def _raw_rows(uri: str, storage: StorageOptions, extra_columns: tuple[str, ...]) -> list[dict]:
    import pyarrow.dataset

    fs, path = pyarrow_filesystem(uri, storage)
    suffix = manifest_format(uri)
    if suffix in (".jsonl", ".json"):
        rows = []
        for name in _files(fs, path):
            with fs.open_input_stream(name) as f:
                rows += [parse_json_line(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
        return rows
    if suffix == ".csv":
        form = pyarrow.dataset.CsvFileFormat(convert_options=csv_as_text(extra_columns))
    else:
        form = pyarrow.dataset.ParquetFileFormat()
    data = pyarrow.dataset.dataset(path, filesystem=fs, format=form)
    columns = [name for name in dict.fromkeys((*TEXT_COLUMNS, *extra_columns)) if name in data.schema.names]
    return data.to_table(columns=columns).to_pylist()


def _files(fs, path: str) -> list[str]:
    """The file at `path`, or the files under it (a partitioned manifest), sorted."""
    import pyarrow.fs

    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or prefix: {path}")
    if info.type != pyarrow.fs.FileType.Directory:
        return [path]
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    return sorted(f.path for f in found if f.type == pyarrow.fs.FileType.File)


def manifest_format(uri: str) -> str:
    """The manifest's suffix: .parquet, .jsonl, .json or .csv; anything else is a ManifestError."""
    suffix = PurePosixPath(uri.rstrip("/")).suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".json", ".csv"):
        raise ManifestError(
            f"manifest {uri}: unknown format {suffix!r}; expected .parquet, .jsonl, .json or .csv; nothing was run"
        )
    return suffix


def csv_as_text(extra_columns: tuple[str, ...] = ()):
    """pyarrow CSV options reading the manifest columns as text; empty cells are nulls."""
    import pyarrow.csv

    return pyarrow.csv.ConvertOptions(
        column_types={name: pa.string() for name in (*TEXT_COLUMNS, *extra_columns)}, strings_can_be_null=True
    )


def list_images(config: JobConfig):
    """Every image under the prefix, sorted; its id is the path relative to the prefix."""
    listing = image_listing(config.images, config.storage)
    if not listing:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {config.images}")
    rows = [{"id": name, "images": [uri]} for name, uri, _ in listing]
    return _from_rows(rows, config.rows_per_block)


@functools.lru_cache(maxsize=2)
def image_listing(prefix: str, storage: StorageOptions) -> tuple[tuple[str, str, str], ...]:
    """(id, URI, version) of every image under the prefix, sorted; listed once per process (the
    job's input and its fingerprint both need it). The version is the ETag, or size and mtime."""
    fs, root = filesystem_for(prefix, storage)
    found = fs.find(root, detail=True)
    return tuple(
        (path[len(root) :].lstrip("/"), fs.unstrip_protocol(path), object_version(info))
        for path, info in sorted(found.items())
        if PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES
    )


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
    """Dataset rows ({bytes, path} image structs) → manifest rows with inline image bytes, and
    their references from an `answers` or `answer_ref` column if there is one."""
    ids = [row_id(i) for i in batch.column(id_column).to_pylist()]
    questions = _column(batch, question_column)
    images = batch.column(image_column).to_pylist()
    rows = [
        {"id": i, "images": [f"{dataset}#{i}"], "question": q, "image_bytes": [im["bytes"]]}
        for i, q, im in zip(ids, questions, images)
    ]
    for row, answers, answer_ref in zip(rows, _column(batch, "answers"), _column(batch, "answer_ref")):
        try:
            row["references"] = reference_list(_answer_texts(answers), answer_ref)
        except InvalidRow as e:
            row["error_code"], row["error"] = "invalid_row", str(e)
    return align(rows, MANIFEST_SCHEMA)


def _column(batch: pa.Table, name: str) -> list:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def _answer_texts(answers):
    """A dataset's answers as texts: Hugging Face's VQAv2 holds {"answer": ..., ...} records."""
    if isinstance(answers, list) and any(isinstance(a, dict) for a in answers):
        if not all(isinstance(a, dict) and "answer" in a for a in answers):
            raise InvalidRow("`answers` records must each have an `answer`")
        return [a["answer"] for a in answers]
    return answers


def bundled_samples(config: JobConfig):
    """The sample images with their questions and reference answers."""
    cases = json.loads((SAMPLES_DIR / "cases.json").read_text())
    rows = [
        {
            "id": c["id"],
            "images": [str(Path(SAMPLES_DIR, p).resolve()) for p in c["images"]],
            "question": c["question"],
            "references": c.get("answers"),
        }
        for c in cases
    ]
    return _from_rows(rows, config.rows_per_block)


def _from_rows(rows: list[dict], rows_per_block: int):
    import ray.data

    table = align(rows, MANIFEST_SCHEMA)
    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)])


SOURCES = {"manifest": read_manifest, "images": list_images, "dataset": read_dataset, "samples": bundled_samples}
