"""What a job runs with, decided once on the driver: every default is resolved here and nowhere else.

`locate` finds the model and its modules before Ray starts (a wrong path fails in a second, not
after the cluster is up); `make_plan` adds what depends on the cluster (its GPUs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoints import Checkpoint, CheckpointError, resolve_checkpoint, transformers_config
from pipeline.cluster import shortfall
from pipeline.config import JobConfig

log = logging.getLogger(__name__)
SELECTION_OPTIONS = ("threshold", "max_keep_ratio", "min_kept", "keep_ratio")


def locate(config: JobConfig) -> tuple[Checkpoint, Checkpoint | None]:
    """The model and its glimpse modules: as given (directory, hub id, s3:// prefix), or with no
    model the tiny demo model, built locally if missing. Raises CheckpointError on a bad location."""
    if not config.model:
        from pipeline.synthetic.tiny import ensure_tiny_checkpoint

        tiny = ensure_tiny_checkpoint(Path(config.tiny_model_dir).resolve())
        return Checkpoint(str(tiny / "base"), "local", None), Checkpoint(str(tiny / "glimpse"), "local", None)
    model = resolve_checkpoint(config.model, config.model_revision, config.storage, role="model")
    glimpse = None
    if config.glimpse:
        glimpse = resolve_checkpoint(config.glimpse, config.glimpse_revision, config.storage, role="glimpse")
    check_fit(config, model, glimpse)
    return model, glimpse


def check_fit(config: JobConfig, model: Checkpoint, glimpse: Checkpoint | None) -> None:
    """The model is of a family the engine has an adapter for, and the modules were built for it:
    refused here, in one line, rather than by every actor. Reads the configs only; transformers
    (seconds to import) only when there are modules to fit."""
    from pipeline.glimpse.architectures import check_supported
    from pipeline.glimpse.config import GlimpseConfig, check_fits
    from pipeline.glimpse.errors import GlimpseError

    raw = model.config(config.storage, f"--model {config.model}")
    try:
        check_supported(raw.get("model_type"))
    except GlimpseError as e:
        raise CheckpointError(f"--model {config.model}: {e}") from None
    if glimpse is None:
        return
    modules = glimpse.config(config.storage, f"--glimpse {config.glimpse}")
    try:
        check_fits(GlimpseConfig.from_dict(modules), transformers_config(raw, f"--model {config.model}"))
    except GlimpseError as e:
        raise CheckpointError(f"--glimpse {config.glimpse}: {e}") from None


@dataclass(frozen=True)
class Plan:
    """A job's config with every default resolved, and where its model and modules come from."""

    config: JobConfig
    model: Checkpoint
    glimpse: Checkpoint | None
    gpus_per_actor: float
    dtype: str  # the model's; the preparation tasks send pixel values in it too
    batch_size: int
    prefill_rows: int | None  # None: the whole batch in one prefill
    selection: dict  # the pruning options given; the modules' own for the rest

    @property
    def prunes(self) -> bool:
        return self.config.prune and self.glimpse is not None


def make_plan(config: JobConfig, model: Checkpoint, glimpse: Checkpoint | None, cluster_gpus: float) -> Plan:
    """Defaults that depend on the cluster: with GPUs, one per actor, bf16, batches of 256 rows
    prefilled 8 at a time; without, CPU actors in float32 answering 8 rows in one prefill."""
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if cluster_gpus > 0 else 0.0)
    if not gpus and config.prepare_cpus == 1:
        log.warning(
            "prepare_cpus=1 equals the answering actors' CPU on this GPU-less cluster: Ray Data will run "
            "image preparation inside those actors, serially with the engine; use a value other than 1"
        )
    return Plan(
        config=config,
        model=model,
        glimpse=glimpse,
        gpus_per_actor=gpus,
        dtype=config.dtype if config.dtype != "auto" else ("bfloat16" if gpus else "float32"),
        batch_size=config.batch_size or (256 if gpus else 8),
        prefill_rows=config.prefill_rows or (8 if gpus else None),
        selection={name: value for name in SELECTION_OPTIONS if (value := getattr(config, name)) is not None},
    )


def unschedulable(plan: Plan, resources: dict) -> str | None:
    """Why the smallest actor pool and one preparation task cannot run together on a cluster
    with `resources` (that will not grow): Ray would wait for them forever. None when they can."""
    low = plan.config.actor_pool[0]
    return shortfall(
        resources,
        {
            "GPU": (low * plan.gpus_per_actor, f"{low} answering actors × {plan.gpus_per_actor:g} GPUs", ""),
            "CPU": (
                (0 if plan.gpus_per_actor else low) + plan.config.prepare_cpus,
                f"{low} answering actors and a preparation task",
                " (lower --num-actors or --prepare-cpus)",
            ),
        },
    )


def cluster_gpus() -> float:
    """GPUs in the Ray cluster this driver is connected to."""
    import ray

    return ray.cluster_resources().get("GPU", 0)
