"""What a job's answers depend on, so that a rerun resumes only the same work.

A fingerprint is a flat mapping of named parts (the input, the model, the modules, each option
that changes answers) to short strings, so a mismatch can name what changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.checkpoints import Checkpoint
from pipeline.config import SAMPLES_DIR, JobConfig
from pipeline.storage import StorageOptions, filesystem_for, object_version, protocol_of
from schemas import SCHEMA_VERSION

# JobConfig fields that change a row's answer, its error, or its columns. Batching, resources,
# progress, prices and the output location do not, and may change between a run and its resume.
ANSWER_OPTIONS = (
    "prompt",
    "prune",
    "attn",
    "threshold",
    "max_keep_ratio",
    "min_kept",
    "keep_ratio",
    "ignore_eos",
    "max_new_tokens",
    "min_pixels",
    "max_pixels",
    "max_image_bytes",
    "max_image_pixels",
    "max_question_tokens",
    "control_fraction",
    "control_rows",
    "metric",
    "keep_masks",
    "kv_cache_gib",  # a row whose answer alone passes the budget fails as invalid_row
    "image_column",
    "question_column",
    "id_column",
)
WHOLE_FILE_LIMIT = 16 << 20  # files up to this size are hashed whole; larger ones by size, time and ends
EDGE_BYTES = 1 << 20


def job_fingerprint(config: JobConfig, model: Checkpoint, glimpse: Checkpoint | None, dtype: str) -> dict[str, str]:
    parts = {
        "input": input_fingerprint(config),
        "model": checkpoint_version(model),
        "glimpse modules": checkpoint_version(glimpse) if glimpse and config.prune else "none",
        "dtype": dtype,
        "schema": SCHEMA_VERSION,
    }
    parts.update({name: json.dumps(getattr(config, name)) for name in ANSWER_OPTIONS})
    return parts


def differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """What changed, one phrase per part: `max_new_tokens 8 → 2`, `input (changed)`."""
    changed = []
    for name in sorted(set(recorded) | set(current)):
        before, after = recorded.get(name), current.get(name)
        if before == after:
            continue
        if name in ANSWER_OPTIONS or name in ("dtype", "schema"):
            changed.append(f"{name} {before} → {after}")
        else:
            changed.append(f"{name} (changed)")
    return changed


def input_fingerprint(config: JobConfig) -> str:
    if config.manifest:
        return object_fingerprint(config.manifest, config.storage)
    if config.images:
        from pipeline.sources import image_listing

        return _digest(json.dumps(image_listing(config.images, config.storage)))
    if config.dataset:
        import datasets

        ds = datasets.load_from_disk(config.dataset)
        return _digest(f"{ds._fingerprint} {ds.column_names}")
    return directory_fingerprint(SAMPLES_DIR)


def object_fingerprint(uri: str, storage: StorageOptions) -> str:
    """A local file by its content; an object by its version (storage.object_version); a folder
    of files (a partitioned Parquet manifest) by each file's version."""
    fs, path = filesystem_for(uri, storage)
    info = fs.info(path)
    if info["type"] == "directory":
        files = sorted(fs.find(path, detail=True).items())
        return _digest(json.dumps([[name, object_version(info)] for name, info in files]))
    if protocol_of(uri) == "file":
        return _file_digest(Path(path))
    return _digest(object_version(info))


def checkpoint_version(checkpoint: Checkpoint) -> str:
    """A local checkpoint by its files' contents; a hub or s3:// one by its resolved revision."""
    if checkpoint.kind == "local":
        return directory_fingerprint(Path(checkpoint.location))
    return f"{checkpoint.location}@{checkpoint.revision}"


def directory_fingerprint(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return _digest(json.dumps([[str(p.relative_to(path)), _file_digest(p)] for p in files]))


def _file_digest(path: Path) -> str:
    """sha256 of a file up to WHOLE_FILE_LIMIT; of a larger one (model weights), its size,
    modification time and first and last MiB."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if stat.st_size <= WHOLE_FILE_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(f"{stat.st_size} {stat.st_mtime_ns}".encode())
            digest.update(f.read(EDGE_BYTES))
            f.seek(-EDGE_BYTES, 2)
            digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()[:32]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
