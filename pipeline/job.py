"""The Ray Data pipeline: manifest → prepare (CPU tasks) → answer (actor pool) → Parquet."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline import faults
from pipeline.checkpoints import Checkpoint
from pipeline.cluster import ClusterError, started_locally
from pipeline.config import JobConfig
from pipeline.control import control_sample
from pipeline.fingerprint import job_fingerprint
from pipeline.grouping import group_by_image
from pipeline.lineage import job_lineage, now
from pipeline.output import OutputDir, new_run_id
from pipeline.plan import Plan, locate, make_plan, unschedulable
from pipeline.progress import ProgressCounter, ProgressLog
from pipeline.sources import check_ids, listed_ids, read_source
from pipeline.stages import AnswerStage, PrepareStage
from pipeline.summary import Summary, summarize
from schemas import SUMMARY_COLUMNS


@dataclass(frozen=True)
class Checked:
    """What `check` found: the output location, the input's ids, the model and its modules, and
    the rows also run unpruned (--control-rows)."""

    output: OutputDir
    input_ids: set[str] | None
    model: Checkpoint
    glimpse: Checkpoint | None
    control_ids: frozenset[str] = frozenset()


def check(config: JobConfig) -> Checked:
    """Everything the driver can check without Ray, cheapest first: the output is not a file; the
    input exists, is not empty, and its ids are there and unique; the model and its modules are
    found. Raises OutputError, ManifestError or CheckpointError, each with a one-line message."""
    output = OutputDir(config.output, config.storage)
    output.check_location()
    input_ids = check_ids(config)
    model, glimpse = locate(config)
    if (config.control_rows or config.control_fraction) and glimpse is None:
        raise ValueError("control rows compare pruned answers with unpruned ones: give the model's glimpse modules")
    control_ids = frozenset()
    if config.control_rows:
        control_ids = control_sample(input_ids if input_ids is not None else listed_ids(config), config.control_rows)
    return Checked(output, input_ids, model, glimpse, control_ids)


def build_dataset(plan: Plan, source, progress=None, control_ids: frozenset[str] = frozenset(), rows: int = 0):
    """The lazy pipeline over manifest rows: (group by image →) prepare → answer. Nothing runs until
    it is consumed or written. `progress`: a ProgressCounter the answering actors report to;
    `control_ids`: the rows also run unpruned; `rows`: how many there are (to repartition by image)."""
    config = plan.config
    if config.group_by_image or config.repartition_by_image:
        source = group_by_image(source, config.repartition_by_image, rows, config.rows_per_block)
    return AnswerStage.from_plan(plan, progress, control_ids)(PrepareStage.from_plan(plan)(source))


class TooManyFailures(Exception):
    """More rows failed than --max-failed-fraction allows; the output and summary are written."""

    def __init__(self, summary: Summary, limit: float) -> None:
        super().__init__(
            f"{summary.rows_failed} of {summary.rows} rows failed ({summary.rows_failed / summary.rows:.1%}), "
            f"over --max-failed-fraction {limit:g}; the output and its summary are written ({summary.output})"
        )
        self.summary = summary


def run(
    config: JobConfig, overwrite: bool = False, take_over_lease: bool = False, checked: Checked | None = None
) -> Summary:
    """Runs the job to the end: Parquet files and _summary.json under config.output. Everything
    that can refuse the job (`check`, the output's lease, a resume of other work) does so before
    any row is answered. Raises TooManyFailures after publishing when too many rows failed."""
    started, started_at = time.perf_counter(), now()
    checked = checked or check(config)
    output = checked.output
    resources = ray.cluster_resources()
    plan = make_plan(config, checked.model, checked.glimpse, resources.get("GPU", 0))
    if started_locally() and (problem := unschedulable(plan, resources)):
        raise ClusterError(f"this machine cannot run the job: {problem}")
    fingerprint = job_fingerprint(config, plan.model, plan.glimpse, plan.dtype)
    run_id = new_run_id()
    lineage = job_lineage(plan, fingerprint, output.absolute_uri, run_id, started_at)
    with output.leased(run_id, config.lease_timeout_s, take_over_lease):
        done = output.begin(run_id, fingerprint, overwrite, checked.input_ids)
        faults.reached("started")
        source = read_source(config)
        if len(done):
            source = source.map_batches(drop_ids, fn_kwargs=dict(ids=done), batch_format="pyarrow")
        counter = ProgressCounter.remote()
        with ProgressLog(counter, config.progress_interval_s) as progress:
            rows = len(checked.input_ids or listed_ids(config)) if config.repartition_by_image else 0
            output.write_pending(build_dataset(plan, source, counter, checked.control_ids, rows), run_id, lineage)
        faults.reached("written")
        output.publish()
        table = output.read_results(SUMMARY_COLUMNS)
        device = "GPU" if plan.gpus_per_actor else "CPU"
        devices = max(progress.final["actors"], 1) * (plan.gpus_per_actor or 1)
        summary = summarize(
            table,
            config.output,
            time.perf_counter() - started,
            config.hourly_usd,
            progress.final["engine_busy"],
            device,
            devices,
            progress.final["images_encoded"],
        )
        output.finish({**asdict(summary), "lineage": {**lineage, "finished_at": now()}})
        faults.reached("finished")
    if summary.rows and summary.rows_failed / summary.rows > config.max_failed_fraction:
        raise TooManyFailures(summary, config.max_failed_fraction)
    return summary


def drop_ids(batch: pa.Table, *, ids: pa.Array) -> pa.Table:
    """The rows whose id is not in `ids` (those an earlier run already answered)."""
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=ids)))
