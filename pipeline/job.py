"""The Ray Data pipeline: manifest → prepare (CPU tasks) → answer (actor pool) → Parquet."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import JobConfig
from pipeline.prepare import prepare_batch
from pipeline.progress import ProgressCounter, ProgressLog
from pipeline.sources import read_source
from pipeline.storage import filesystem_for, pyarrow_filesystem
from pipeline.summary import COLUMNS as SUMMARY_COLUMNS
from pipeline.summary import SUMMARY_FILE, Summary, summarize

log = logging.getLogger(__name__)


def resolve_model(config: JobConfig) -> tuple[str, str | None]:
    """(model, glimpse modules); with no model, the tiny demo model, built if missing."""
    if config.model:
        return config.model, config.glimpse
    from pipeline.glimpse.tiny import ensure_tiny_checkpoint

    tiny = ensure_tiny_checkpoint(Path(config.tiny_model_dir).resolve())
    return str(tiny / "base"), str(tiny / "glimpse")


def build_dataset(config: JobConfig, progress=None):
    """The lazy pipeline: nothing runs until it is consumed or written. `progress`: a
    ProgressCounter the inference actors report to."""
    import ray

    from pipeline.infer import Answerer

    model, glimpse = resolve_model(config)
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    selection = {k: v for k in ("threshold", "max_keep_ratio", "min_kept") if (v := getattr(config, k)) is not None}
    return (
        read_source(config)
        .map_batches(
            prepare_batch,
            fn_kwargs=dict(
                model=model,
                prompt=config.prompt,
                max_new_tokens=config.max_new_tokens,
                storage=config.storage,
                max_image_bytes=config.max_image_bytes,
                min_pixels=config.min_pixels,
                max_pixels=config.max_pixels,
            ),
            batch_size=config.prepare_batch_size,
            batch_format="pyarrow",
            num_cpus=config.prepare_cpus,
        )
        .map_batches(
            Answerer,
            fn_constructor_kwargs=dict(
                model=model,
                glimpse=glimpse,
                prune=config.prune,
                dtype=config.dtype,
                attn=config.attn,
                selection=selection,
                min_pixels=config.min_pixels,
                max_pixels=config.max_pixels,
                control_fraction=config.control_fraction,
                progress=progress,
            ),
            batch_size=config.batch_size,
            batch_format="pyarrow",
            concurrency=config.num_actors,
            num_gpus=gpus,
            num_cpus=0 if gpus else 1,
        )
    )


def run(config: JobConfig, overwrite: bool = False) -> Summary:
    """Runs the job to the end: Parquet files and _summary.json under config.output."""
    started = time.perf_counter()
    fs, out_path = filesystem_for(config.output, config.storage)
    if fs.exists(out_path) and any(p.endswith(".parquet") for p in fs.find(out_path)):
        if not overwrite:
            raise FileExistsError(f"{config.output} already holds Parquet files; pass --overwrite to replace them")
        fs.rm(out_path, recursive=True)
    arrow_fs, arrow_path = pyarrow_filesystem(config.output, config.storage)
    counter = ProgressCounter.remote()
    with ProgressLog(counter, config.progress_interval_s):
        build_dataset(config, counter).write_parquet(arrow_path, filesystem=arrow_fs)
    table = pq.read_table(arrow_path, filesystem=arrow_fs, columns=SUMMARY_COLUMNS)
    summary = summarize(table, config.output, time.perf_counter() - started, config.gpu_hourly_usd)
    with fs.open(f"{out_path.rstrip('/')}/{SUMMARY_FILE}", "w") as f:
        json.dump(asdict(summary), f, indent=2)
    return summary
