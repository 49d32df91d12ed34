"""The Ray Data pipeline: manifest → prepare (CPU tasks) → answer (actor pool) → Parquet."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import faults
from pipeline.config import JobConfig
from pipeline.output import OutputDir
from pipeline.prepare import prepare_batch
from pipeline.progress import ProgressCounter, ProgressLog
from pipeline.sources import check_ids, read_source
from pipeline.storage import pyarrow_filesystem
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


def build_dataset(config: JobConfig, progress=None, skip_ids: pa.Array | None = None):
    """The lazy pipeline: nothing runs until it is consumed or written. `progress`: a
    ProgressCounter the inference actors report to; `skip_ids`: rows left out (already answered)."""
    import ray

    from pipeline.infer import Answerer

    model, glimpse = resolve_model(config)
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    selection = {
        k: v for k in ("threshold", "max_keep_ratio", "min_kept", "keep_ratio") if (v := getattr(config, k)) is not None
    }
    # Resolved here, not in each actor: the preparation tasks send pixel values in this dtype.
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if gpus else "float32")
    batch_size = config.batch_size or (256 if gpus else 8)
    prefill_rows = config.prefill_rows or (8 if gpus else None)
    source = read_source(config)
    if skip_ids is not None and len(skip_ids):
        source = source.map_batches(drop_ids, fn_kwargs=dict(ids=skip_ids), batch_format="pyarrow")
    return source.map_batches(
        prepare_batch,
        fn_kwargs=dict(
            model=model,
            prompt=config.prompt,
            max_new_tokens=config.max_new_tokens,
            storage=config.storage,
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels,
            max_question_tokens=config.max_question_tokens,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
            pixel_dtype=dtype,
        ),
        batch_size=config.prepare_batch_size,
        batch_format="pyarrow",
        num_cpus=config.prepare_cpus,
        **faults.runtime_env(),
    ).map_batches(
        Answerer,
        fn_constructor_kwargs=dict(
            model=model,
            glimpse=glimpse,
            prune=config.prune,
            dtype=dtype,
            attn=config.attn,
            selection=selection,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
            control_fraction=config.control_fraction,
            progress=progress,
            prefill_rows=prefill_rows,
            kv_cache_gib=config.kv_cache_gib,
            ignore_eos=config.ignore_eos,
        ),
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=config.num_actors,
        **answer_resources(gpus, config.prepare_cpus),
        **faults.runtime_env(),
    )


def answer_resources(gpus: float, prepare_cpus: float) -> dict:
    """What each answering actor reserves: its GPU share, or one CPU on a GPU-less cluster.

    Ray Data fuses a task stage into the next actor stage when both reserve the same resources.
    Fused, every image would be prepared inside the answering actor, between engine calls (on
    the tiny CPU job that held the engine 65% busy instead of 86%), so that case is warned of.
    """
    if gpus:
        return dict(num_gpus=gpus, num_cpus=0)
    if prepare_cpus == 1:
        log.warning(
            "prepare_cpus=1 equals the answering actors' CPU on this GPU-less cluster: Ray Data will run "
            "image preparation inside those actors, serially with the engine; use a value other than 1"
        )
    return dict(num_gpus=0, num_cpus=1)


def run(config: JobConfig, overwrite: bool = False) -> Summary:
    """Runs the job to the end: Parquet files and _summary.json under config.output."""
    started = time.perf_counter()
    check_ids(config)
    output = OutputDir(config.output, config.storage)
    done = output.start(overwrite)
    counter = ProgressCounter.remote(config.num_actors)
    dataset = build_dataset(config, counter, skip_ids=done)
    pending_fs, pending_path = pyarrow_filesystem(output.pending_uri, config.storage)
    with ProgressLog(counter, config.progress_interval_s) as progress:
        dataset.write_parquet(pending_path, filesystem=pending_fs)
    output.publish()
    arrow_fs, arrow_path = pyarrow_filesystem(config.output, config.storage)
    table = pq.read_table(arrow_path, filesystem=arrow_fs, columns=SUMMARY_COLUMNS)
    summary = summarize(
        table, config.output, time.perf_counter() - started, config.gpu_hourly_usd, progress.final["engine_busy"]
    )
    with output.fs.open(f"{output.path}/{SUMMARY_FILE}", "w") as f:
        json.dump(asdict(summary), f, indent=2)
    return summary


def drop_ids(batch: pa.Table, *, ids: pa.Array) -> pa.Table:
    """The rows whose id is not in `ids` (those an earlier run already answered)."""
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=ids)))
