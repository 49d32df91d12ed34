"""The Ray Data pipeline: manifest → prepare (CPU tasks) → answer (actor pool) → Parquet."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import faults
from pipeline.config import JobConfig
from pipeline.fingerprint import job_fingerprint
from pipeline.output import OutputDir, new_run_id
from pipeline.prepare import prepare_batch
from pipeline.progress import ProgressCounter, ProgressLog
from pipeline.sources import check_ids, read_source
from pipeline.storage import pyarrow_filesystem
from pipeline.summary import COLUMNS as SUMMARY_COLUMNS
from pipeline.summary import Summary, summarize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineChoice:
    """What answers, resolved once on the driver: the checkpoint, its modules, the actors' GPU
    share and the dtype (the preparation tasks send pixel values in it too)."""

    model: str
    glimpse: str | None
    gpus: float
    dtype: str


def resolve_engine(config: JobConfig) -> EngineChoice:
    """With no model, the tiny demo model, built if missing; `auto` dtype: bf16 with GPUs."""
    import ray

    model, glimpse = config.model, config.glimpse
    if not model:
        from pipeline.glimpse.tiny import ensure_tiny_checkpoint

        tiny = ensure_tiny_checkpoint(Path(config.tiny_model_dir).resolve())
        model, glimpse = str(tiny / "base"), str(tiny / "glimpse")
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if gpus else "float32")
    return EngineChoice(model, glimpse, gpus, dtype)


def build_dataset(config: JobConfig, progress=None, skip_ids: pa.Array | None = None, engine: EngineChoice = None):
    """The lazy pipeline: nothing runs until it is consumed or written. `progress`: a
    ProgressCounter the inference actors report to; `skip_ids`: rows left out (already answered)."""
    from pipeline.infer import Answerer

    engine = engine or resolve_engine(config)
    selection = {
        k: v for k in ("threshold", "max_keep_ratio", "min_kept", "keep_ratio") if (v := getattr(config, k)) is not None
    }
    batch_size = config.batch_size or (256 if engine.gpus else 8)
    prefill_rows = config.prefill_rows or (8 if engine.gpus else None)
    source = read_source(config)
    if skip_ids is not None and len(skip_ids):
        source = source.map_batches(drop_ids, fn_kwargs=dict(ids=skip_ids), batch_format="pyarrow")
    return source.map_batches(
        prepare_batch,
        fn_kwargs=dict(
            model=engine.model,
            prompt=config.prompt,
            max_new_tokens=config.max_new_tokens,
            storage=config.storage,
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels,
            max_question_tokens=config.max_question_tokens,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
            pixel_dtype=engine.dtype,
        ),
        batch_size=config.prepare_batch_size,
        batch_format="pyarrow",
        num_cpus=config.prepare_cpus,
        **faults.runtime_env(),
    ).map_batches(
        Answerer,
        fn_constructor_kwargs=dict(
            model=engine.model,
            glimpse=engine.glimpse,
            prune=config.prune,
            dtype=engine.dtype,
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
        **answer_resources(engine.gpus, config.prepare_cpus),
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


class TooManyFailures(Exception):
    """More rows failed than --max-failed-fraction allows; the output and summary are written."""

    def __init__(self, summary: Summary, limit: float) -> None:
        super().__init__(
            f"{summary.rows_failed} of {summary.rows} rows failed ({summary.rows_failed / summary.rows:.1%}), "
            f"over --max-failed-fraction {limit:g}; the output and its summary are written ({summary.output})"
        )
        self.summary = summary


def run(config: JobConfig, overwrite: bool = False, take_over_lease: bool = False) -> Summary:
    """Runs the job to the end: Parquet files and _summary.json under config.output. Everything
    that can refuse the job (ids, the output location, its lease, a resume of other work) does so
    before any row is answered. Raises TooManyFailures after publishing when too many rows failed."""
    started = time.perf_counter()
    output = OutputDir(config.output, config.storage)
    output.check_location()
    input_ids = check_ids(config)
    engine = resolve_engine(config)
    fingerprint = job_fingerprint(config, engine.model, engine.glimpse, engine.dtype)
    run_id = new_run_id()
    with output.leased(run_id, config.lease_timeout_s, take_over_lease):
        done = output.begin(run_id, fingerprint, overwrite, input_ids)
        faults.reached("started")
        counter = ProgressCounter.remote(config.num_actors)
        dataset = build_dataset(config, counter, skip_ids=done, engine=engine)
        pending_fs, pending_path = pyarrow_filesystem(output.pending_uri(run_id), config.storage)
        with ProgressLog(counter, config.progress_interval_s) as progress:
            dataset.write_parquet(pending_path, filesystem=pending_fs)
        faults.reached("written")
        output.publish()
        table = output.read_results(SUMMARY_COLUMNS)
        summary = summarize(
            table, config.output, time.perf_counter() - started, config.gpu_hourly_usd, progress.final["engine_busy"]
        )
        output.finish(asdict(summary))
        faults.reached("finished")
    if summary.rows and summary.rows_failed / summary.rows > config.max_failed_fraction:
        raise TooManyFailures(summary, config.max_failed_fraction)
    return summary


def drop_ids(batch: pa.Table, *, ids: pa.Array) -> pa.Table:
    """The rows whose id is not in `ids` (those an earlier run already answered)."""
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=ids)))
