"""The job's two Ray Data stages, each a description: what its worker is built with, and how Ray
runs it (batch size, resources, pool). A pipeline is then source → prepare → answer → write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline import faults
from pipeline.plan import Plan


@dataclass(frozen=True)
class PrepareStage:
    """CPU tasks: fetch and decode images, run the image processor and the chat template
    (pipeline.prepare.prepare_batch). Tasks, not actors: they share CPUs with reads and writes."""

    fn_kwargs: dict
    batch_size: int
    num_cpus: float

    @classmethod
    def from_plan(cls, plan: Plan) -> PrepareStage:
        config = plan.config
        return cls(
            fn_kwargs=dict(
                model=plan.model,
                prompt=config.prompt,
                max_new_tokens=config.max_new_tokens,
                storage=config.storage,
                max_image_bytes=config.max_image_bytes,
                max_image_pixels=config.max_image_pixels,
                max_question_tokens=config.max_question_tokens,
                min_pixels=config.min_pixels,
                max_pixels=config.max_pixels,
                pixel_dtype=plan.dtype,
            ),
            batch_size=config.prepare_batch_size,
            num_cpus=config.prepare_cpus,
        )

    def map_batches_kwargs(self) -> dict:
        return dict(
            fn_kwargs=self.fn_kwargs,
            batch_size=self.batch_size,
            batch_format="pyarrow",
            num_cpus=self.num_cpus,
            **runtime_env(),
        )

    def __call__(self, dataset):
        from pipeline.prepare import prepare_batch

        return dataset.map_batches(prepare_batch, **self.map_batches_kwargs())


@dataclass(frozen=True)
class AnswerStage:
    """An actor pool, one engine per actor, loaded once (pipeline.infer.Answerer): prepared rows
    → result rows. The pool autoscales between its min and max size."""

    fn_constructor_kwargs: dict
    batch_size: int
    actors: tuple[int, int]
    num_gpus: float
    num_cpus: float

    @classmethod
    def from_plan(cls, plan: Plan, progress=None, control_ids: frozenset[str] = frozenset()) -> AnswerStage:
        """`progress`: a ProgressCounter actor the answering actors report each batch to;
        `control_ids`: rows also run unpruned, besides the control fraction's."""
        config = plan.config
        return cls(
            fn_constructor_kwargs=dict(
                model=plan.model,
                glimpse=plan.glimpse,
                storage=config.storage,
                prune=config.prune,
                dtype=plan.dtype,
                attn=config.attn,
                selection=plan.selection,
                control_fraction=config.control_fraction,
                control_ids=control_ids,
                progress=progress,
                prefill_rows=plan.prefill_rows,
                kv_cache_gib=config.kv_cache_gib,
                ignore_eos=config.ignore_eos,
                keep_masks=config.keep_masks,
                metric=config.metric,
            ),
            batch_size=plan.batch_size,
            actors=config.actor_pool,
            num_gpus=plan.gpus_per_actor,
            # With GPUs the actor needs no CPU of its own. Without, it takes one; that differs from
            # the preparation tasks' share, or Ray Data would fuse preparation into the actors
            # (serially with the engine: on the tiny CPU job, 65% engine busy instead of 86%).
            num_cpus=0 if plan.gpus_per_actor else 1,
        )

    def map_batches_kwargs(self) -> dict:
        import ray.data

        return dict(
            fn_constructor_kwargs=self.fn_constructor_kwargs,
            batch_size=self.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=self.actors[0], max_size=self.actors[1]),
            num_gpus=self.num_gpus,
            num_cpus=self.num_cpus,
            # Expandable segments let the CUDA allocator grow and give back its blocks instead of
            # fragmenting them: batches of varying shapes otherwise strand memory between them.
            **runtime_env(
                PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
            ),
        )

    def __call__(self, dataset):
        from pipeline.infer import Answerer

        return dataset.map_batches(Answerer, **self.map_batches_kwargs())


def runtime_env(**env_vars: str) -> dict:
    """Ray remote args giving a stage's workers `env_vars` and the driver's fault plan (tests)."""
    env = {**faults.env_vars(), **env_vars}
    return {"runtime_env": {"env_vars": env}} if env else {}
