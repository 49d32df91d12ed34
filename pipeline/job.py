"""The Ray Data pipeline: manifest → prepare (CPU tasks) → answer (actor pool) → Parquet."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import JobConfig
from pipeline.prepare import prepare_batch
from pipeline.sources import read_source
from pipeline.storage import filesystem_for, pyarrow_filesystem

log = logging.getLogger(__name__)
SUMMARY_FILE = "_summary.json"


@dataclass
class Summary:
    """The job's totals, written next to the output as _summary.json."""

    output: str
    rows: int
    rows_ok: int
    rows_failed: int
    visual_tokens: int
    visual_tokens_kept: int
    generated_tokens: int
    wall_s: float
    rows_per_s: float

    def lines(self) -> list[str]:
        kept = self.visual_tokens_kept / self.visual_tokens if self.visual_tokens else 0.0
        return [
            f"rows: {self.rows} ({self.rows_ok} answered, {self.rows_failed} failed)",
            f"visual tokens: {self.visual_tokens} → {self.visual_tokens_kept} kept ({kept:.1%})",
            f"generated tokens: {self.generated_tokens}",
            f"wall time: {self.wall_s:.1f}s, {self.rows_per_s:.2f} rows/s",
            f"output: {self.output}",
        ]


def resolve_model(config: JobConfig) -> tuple[str, str | None]:
    """(model, glimpse modules); with no model, the tiny demo model, built if missing."""
    if config.model:
        return config.model, config.glimpse
    from pipeline.glimpse.tiny import ensure_tiny_checkpoint

    tiny = ensure_tiny_checkpoint(Path(config.tiny_model_dir).resolve())
    return str(tiny / "base"), str(tiny / "glimpse")


def build_dataset(config: JobConfig):
    """The lazy pipeline: nothing runs until it is consumed or written."""
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
    build_dataset(config).write_parquet(arrow_path, filesystem=arrow_fs)
    summary = summarize(config, time.perf_counter() - started)
    with fs.open(f"{out_path.rstrip('/')}/{SUMMARY_FILE}", "w") as f:
        json.dump(asdict(summary), f, indent=2)
    return summary


def summarize(config: JobConfig, wall_s: float) -> Summary:
    """Totals from the written Parquet (a few columns only)."""
    arrow_fs, arrow_path = pyarrow_filesystem(config.output, config.storage)
    columns = ["error", "n_visual_tokens", "n_visual_kept", "n_generated_tokens"]
    table = pq.read_table(arrow_path, filesystem=arrow_fs, columns=columns)
    failed = table.column("error").is_valid().to_pylist().count(True)

    def total(name):
        return int(sum(v for v in table.column(name).to_pylist() if v is not None))

    return Summary(
        output=config.output,
        rows=table.num_rows,
        rows_ok=table.num_rows - failed,
        rows_failed=failed,
        visual_tokens=total("n_visual_tokens"),
        visual_tokens_kept=total("n_visual_kept"),
        generated_tokens=total("n_generated_tokens"),
        wall_s=wall_s,
        rows_per_s=table.num_rows / wall_s if wall_s else 0.0,
    )
