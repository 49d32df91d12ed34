"""The training job on the driver: check everything before Ray, resume where the last run stopped,
run Ray Train, then publish the modules and a summary.

OUTPUT/
  checkpoints/          Ray Train's storage: step_<n>/ (glimpse/ + state.pt), kept keep_checkpoints
  glimpse/              the published format (config.json + new_modules_gp.pt), written at the end
  _train_config.json    the settings a rerun must share to resume
  _train_summary.json   steps, examples, loss parts and box metrics over the run, failed rows
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.checkpoints import Checkpoint, CheckpointError, resolve_checkpoint, transformers_config
from pipeline.cluster import shortfall, started_locally
from pipeline.glimpse.architectures import check_supported
from pipeline.glimpse.config import GlimpseConfig, check_fits
from pipeline.glimpse.errors import GlimpseError
from pipeline.storage import filesystem_for, protocol_of, pyarrow_filesystem
from pipeline.training.config import TrainConfig
from pipeline.training.data import ordered_dataset, prepare_training_batch, training_rows
from pipeline.training.loop import MODULES_DIR, STATE_FILE, fresh_config, train_worker

log = logging.getLogger("pipeline.training")
# Ray Train's V2 API (restoring from the run's own storage, named checkpoint directories): the
# default from Ray 2.5x on, opt-in before.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

RUN_NAME = "checkpoints"
WORKER_CPUS = 1  # Ray Train's default reservation per worker
PREPARE_CPUS = 0.5  # per preparation task: fetching and decoding images beside the workers
CONFIG_FILE = "_train_config.json"
SUMMARY_FILE = "_train_summary.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints
# Settings a resumed run may change: how often it logs and checkpoints, where it reads from. Every
# other setting (and the rows themselves) fixes the data order, the recipe or the modules' shape.
FREE_ON_RESUME = ("log_every", "checkpoint_every", "keep_checkpoints", "storage", "prepare_batch_size")


class TrainingError(ValueError):
    """The run cannot start as asked (one line, for the user)."""


class NothingTrained(RuntimeError):
    """The run finished without one example to learn from: every row failed to prepare."""


@dataclass
class Checked:
    """What the checks before Ray found: the base model, the modules to start from, the rows."""

    model: Checkpoint
    init_glimpse: Checkpoint | None
    rows: pa.Table


def check(config: TrainConfig) -> Checked:
    """Everything that can be checked before Ray starts, cheapest first."""
    _check_output(config)
    rows = training_rows(config.manifest, config.dataset, config.storage, config.id_column, config.image_column)
    model = resolve_checkpoint(config.model, config.model_revision, config.storage, role="model")
    # A family without an adapter is refused from its config.json, before the weights are fetched.
    raw = model.config(config.storage, f"--model {config.model}")
    try:
        check_supported(raw.get("model_type"))
    except GlimpseError as e:
        raise CheckpointError(f"--model {config.model}: {e}") from None
    model_config = transformers_config(raw, f"--model {config.model}")
    init = None
    if config.init_glimpse:
        name = f"--init-glimpse {config.init_glimpse}"
        init = resolve_checkpoint(config.init_glimpse, None, config.storage, role="glimpse")
        try:  # from its config.json alone: the weights are fetched by the workers
            check_fits(GlimpseConfig.from_dict(init.config(config.storage, name)), model_config)
        except GlimpseError as e:
            raise CheckpointError(f"{name}: {e}") from None
    else:
        check_fits(fresh_config(config, model_config), model_config)
    _check_resumable(config, rows)
    return Checked(model, init, rows)


def _check_output(config: TrainConfig) -> None:
    fs, path = filesystem_for(config.output, config.storage)
    if fs.exists(path) and not fs.isdir(path):
        raise TrainingError(f"--output {config.output} is a file, not a directory")
    if protocol_of(config.output) == "file":
        try:
            fs.makedirs(path, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"--output {config.output} cannot be created: {e.strerror or e}") from None


def _check_resumable(config: TrainConfig, rows: pa.Table) -> None:
    """A rerun into an output that holds a checkpoint resumes it, so it must be the same run."""
    latest = _latest_recorded(config)
    if not latest:
        return
    fs, path = filesystem_for(config.output, config.storage)
    saved_path = f"{path.rstrip('/')}/{CONFIG_FILE}"
    saved = json.loads(fs.cat_file(saved_path)) if fs.exists(saved_path) else {}
    ours = _resume_settings(config, rows)
    changed = [f"{key}: {saved.get(key)!r} → {ours[key]!r}" for key in ours if saved.get(key) != ours[key]]
    if changed:
        raise TrainingError(
            f"{config.output} holds a run with other settings ({'; '.join(changed)}); rerun with the same "
            "settings to resume it, or give another --output"
        )
    directory = latest["checkpoint_dir_name"]
    for name in (STATE_FILE, f"{MODULES_DIR}/new_modules_gp.pt"):
        if not fs.exists(f"{path.rstrip('/')}/{RUN_NAME}/{directory}/{name}"):
            raise TrainingError(
                f"the run's last checkpoint {config.output}/{RUN_NAME}/{directory} lacks {name}; remove "
                f"{config.output}/{RUN_NAME} to start over, or give another --output"
            )


def _resume_settings(config: TrainConfig, rows: pa.Table) -> dict:
    settings = json.loads(config.model_dump_json(exclude=set(FREE_ON_RESUME)))
    return {**settings, "rows_digest": _digest(rows)}


def _digest(rows: pa.Table) -> str:
    """What changes when a row (its id, image, question, answer or boxes) or their order changes."""
    import hashlib

    import pyarrow.ipc

    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def run(config: TrainConfig, checked: Checked) -> dict:
    """Trains (resuming from the latest checkpoint in OUTPUT, if any), writes OUTPUT/glimpse and
    the summary; returns the summary."""
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    if started_locally() and (problem := unschedulable(config, ray.cluster_resources())):
        raise TrainingError(problem)
    fs, root = filesystem_for(config.output, config.storage)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(
        f"{root.rstrip('/')}/{CONFIG_FILE}", json.dumps(_resume_settings(config, checked.rows), indent=2).encode()
    )
    step, start = resume_point(config)
    total = config.steps * config.rows_per_step
    started = time.time()
    if step < config.steps:
        if step:
            log.info(f"resuming at step {step} of {config.steps} ({start} examples consumed)")
        dataset = ordered_dataset(checked.rows, start, total, config.seed, config.prepare_batch_size).map_batches(
            prepare_training_batch,
            batch_format="pyarrow",
            batch_size=config.prepare_batch_size,
            num_cpus=PREPARE_CPUS,
            fn_kwargs=dict(
                model=checked.model,
                storage=config.storage,
                dataset=config.dataset,
                image_column=config.image_column,
                min_pixels=config.min_pixels,
                max_pixels=config.max_pixels,
                max_image_bytes=config.max_image_bytes,
                max_image_pixels=config.max_image_pixels,
                pixel_dtype=config.model_dtype(config.use_gpu),
            ),
        )
        progress = Queue()
        printer = threading.Thread(target=_print_progress, args=(progress, config.steps), daemon=True)
        printer.start()
        storage_fs, storage_path = _train_storage(config)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "config": config.model_dump(mode="python"),
                "model": checked.model,
                "init_glimpse": checked.init_glimpse,
                "start": start,
                "progress": progress,
            },
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
            run_config=RunConfig(
                name=RUN_NAME,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                failure_config=FailureConfig(max_failures=0),
            ),
            datasets={"train": dataset},
            dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        )
        try:
            trainer.fit()
        except SystemExit:  # Ray Train's SIGINT handler aborts the run and exits
            raise KeyboardInterrupt from None
        finally:
            progress.put(None)
            printer.join(timeout=5)
            ray.kill(progress.actor)
    return publish(config, checked, time.time() - started)


def unschedulable(config: TrainConfig, resources: dict) -> str | None:
    """Why the workers and one preparation task cannot run together on a Ray with `resources`
    that will not grow (the job's own local Ray): Ray Train would wait for them forever."""
    workers = config.num_workers
    return shortfall(
        resources,
        {
            "GPU": (workers if config.use_gpu else 0, f"{workers} workers with --use-gpu", ""),
            "CPU": (
                workers * WORKER_CPUS + PREPARE_CPUS,
                f"{workers} workers and a preparation task",
                " (lower --num-workers)",
            ),
        },
    )


def _train_storage(config: TrainConfig):
    """Ray Train's storage for OUTPUT: a local directory, or a filesystem and path for a URI."""
    if protocol_of(config.output) == "file":
        return None, str(Path(config.output.removeprefix("file://")).expanduser().resolve())
    return pyarrow_filesystem(config.output, config.storage)


def resume_point(config: TrainConfig) -> tuple[int, int]:
    """(step, examples consumed) of the latest checkpoint Ray Train recorded in OUTPUT, or (0, 0)."""
    latest = _latest_recorded(config)
    if not latest:
        return 0, 0
    metrics = latest.get("metrics") or {}
    return int(metrics["step"]), int(metrics["examples_consumed"])


def _latest_recorded(config: TrainConfig) -> dict:
    """Ray Train's record of the run's latest checkpoint (its directory name and the metrics
    reported with it), read from its snapshot in OUTPUT/checkpoints; {} when there is none."""
    fs, root = filesystem_for(config.output, config.storage)
    path = f"{root.rstrip('/')}/{RUN_NAME}/{SNAPSHOT_FILE}"
    if not fs.exists(path):
        return {}
    snapshot = json.loads(fs.cat_file(path))
    # Ray Train stores its state as JSON text inside the file in some versions.
    snapshot = json.loads(snapshot) if isinstance(snapshot, str) else snapshot
    return snapshot.get("latest_checkpoint_result") or {}


def _print_progress(queue, steps: int) -> None:
    while (metrics := queue.get()) is not None:
        log.info(progress_line(metrics, steps))


def progress_line(m: dict, steps: int) -> str:
    return (
        f"step {m['step']}/{steps} · loss {m['loss']:.4f} (loc {m['loc_loss']:.4f}, le {m['le_loss']:.4f}) · "
        f"kept {m['keep_ratio']:.1%} · recall {m['recall']:.2f} precision {m['precision']:.2f} "
        f"IoU {m['iou']:.2f} · lr {m['lr']:.2e} · {m['examples_consumed']} examples"
        + (f" · {m['failed_rows']} rows failed" if m["failed_rows"] else "")
    )


def publish(config: TrainConfig, checked: Checked, seconds: float) -> dict:
    """Copies the latest checkpoint's modules to OUTPUT/glimpse and writes the summary."""
    import torch

    fs, root = filesystem_for(config.output, config.storage)
    root = root.rstrip("/")
    latest = _latest_recorded(config).get("checkpoint_dir_name")
    if latest is None:
        raise TrainingError(f"no checkpoint under {config.output}/{RUN_NAME}: the run saved none")
    with tempfile.TemporaryDirectory() as scratch:
        fs.get(f"{root}/{RUN_NAME}/{latest}", scratch, recursive=True)
        local = Path(scratch)
        if not (local / STATE_FILE).exists():  # fsspec copies into scratch/<name> when scratch exists
            local = local / latest
        state = torch.load(local / STATE_FILE, map_location="cpu", weights_only=True)["run"]
        fs.makedirs(f"{root}/{MODULES_DIR}", exist_ok=True)
        for module_file in sorted((local / MODULES_DIR).iterdir()):
            fs.put_file(str(module_file), f"{root}/{MODULES_DIR}/{module_file.name}")
    history = state["history"]
    summary = {
        "steps": state["step"],
        "examples_consumed": state["examples_consumed"],
        "rows": checked.rows.num_rows,
        "epochs": state["examples_consumed"] / checked.rows.num_rows,
        "failed_rows": state["failed_count"],
        "failed_examples": [{"id": i, "error": e} for i, e in state["failed"]],
        "first": history[0] if history else None,
        "final": history[-1] if history else None,
        "history": history,
        "seconds_this_run": seconds,
        "model": checked.model.lineage(),
        "init": checked.init_glimpse.lineage() if checked.init_glimpse else "fresh",
        "glimpse": f"{config.output.rstrip('/')}/{MODULES_DIR}",
        "checkpoint": f"{config.output.rstrip('/')}/{RUN_NAME}/{latest}",
        "config": json.loads(config.model_dump_json(exclude={"storage"})),
    }
    fs.pipe_file(f"{root}/{SUMMARY_FILE}", json.dumps(_finite(summary), indent=2).encode())
    if not any(window["examples"] for window in history):
        first = state["failed"][0] if state["failed"] else ("?", "?")
        raise NothingTrained(
            f"no example could be prepared ({state['failed_count']} rows failed, e.g. {first[0]}: {first[1]}); "
            f"the modules in {summary['glimpse']} are untrained"
        )
    return summary


def _finite(value):
    """JSON has no NaN: metrics over an empty window become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
