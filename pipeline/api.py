"""glimpse-batch inside your own Ray Data pipeline, as Ray Data LLM's `build_llm_processor`:

    processor = build_processor(JobConfig(model=..., glimpse=..., max_new_tokens=32))
    results = processor(ray.data.read_parquet("s3://bucket/manifest.parquet"))

`results` is lazy, like any Dataset: write it, iterate it, or chain more stages on it.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import JobConfig
from pipeline.job import build_dataset
from pipeline.plan import cluster_gpus, locate, make_plan
from pipeline.sources import normalize_manifest


def build_processor(config: JobConfig | dict) -> Callable:
    """A function from a Dataset of manifest rows (`id`, `image` or `images`, optional `question`
    and `max_new_tokens`: schemas.MANIFEST_SCHEMA's columns) to a Dataset of result rows
    (schemas.RESULT_SCHEMA), one per input row. The model and its modules are located now, so a
    wrong location raises CheckpointError here; the cluster's GPUs are counted when the processor
    is applied. Unlike the job, it neither checks that ids are unique nor resumes: it streams."""
    config = config if isinstance(config, JobConfig) else JobConfig.validated(config)
    model, glimpse = locate(config)

    def process(dataset):
        plan = make_plan(config, model, glimpse, cluster_gpus())
        return build_dataset(plan, dataset.map_batches(normalize_manifest, batch_format="pyarrow"))

    return process
