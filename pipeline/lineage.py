"""Where a job's results came from, so a Parquet file found months later still says: which
package version, model and modules (with their revision or content hash), options, output and
times. Written into every result file's metadata (schemas.LINEAGE_METADATA_KEY) and into
`_summary.json`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib import metadata

from pipeline.plan import Plan
from schemas import LINEAGE_METADATA_KEY, RESULT_SCHEMA

PACKAGE = "glimpse-batch"


def package_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def now() -> str:
    """The time, as ISO 8601 in UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def job_lineage(plan: Plan, fingerprint: dict[str, str], output_uri: str, run_id: str, started_at: str) -> dict:
    """The lineage of one run of a job. The config is the resolved one, without credentials; the
    model's and modules' versions are the job's fingerprint's (a local directory is hashed once)."""
    model = {**plan.model.lineage(), "version": fingerprint["model"]}
    modules = None
    if plan.prunes:
        modules = {**plan.glimpse.lineage(), "version": fingerprint["glimpse modules"]}
    resolved = {
        "gpus_per_actor": plan.gpus_per_actor,
        "dtype": plan.dtype,
        "batch_size": plan.batch_size,
        "prefill_rows": plan.prefill_rows,
    }
    return {
        "package": PACKAGE,
        "version": package_version(),
        "model": model,
        "glimpse_modules": modules,
        "config": {**public_config(plan), **resolved},
        "output": output_uri,
        "run_id": run_id,
        "started_at": started_at,
    }


def public_config(plan: Plan) -> dict:
    """The job's options as JSON, storage credentials left out (not even masked)."""
    return plan.config.model_dump(mode="json", exclude={"storage": {"key", "secret"}})


def file_schema(lineage: dict):
    """RESULT_SCHEMA with the lineage and this file's write time in its metadata: called by the
    Parquet writer as it writes each file."""
    stamped = {**lineage, "written_at": now()}
    return RESULT_SCHEMA.with_metadata({**RESULT_SCHEMA.metadata, LINEAGE_METADATA_KEY: json.dumps(stamped)})
