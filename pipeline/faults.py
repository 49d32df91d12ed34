"""Fault injection for the reliability tests: kill an inference actor, fail reads, fake an OOM,
slow batches down.

Off unless the driver's environment holds GLIMPSE_BATCH_FAULTS, a JSON object; the job forwards
it to its Ray workers. Keys (all optional):
    kill_actor_marker   path: the first inference batch after this file is absent creates it and
                        kills its actor process (os._exit), once per marker
    fail_reads          int: each worker process's first N object reads raise ConnectionError
    oom_above_batch     int: engine batches larger than this raise torch.OutOfMemoryError
    batch_delay_s       float: each inference batch waits this long first (time to interrupt a job)
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

ENV = "GLIMPSE_BATCH_FAULTS"
_reads = 0


@functools.cache
def plan() -> dict:
    return json.loads(os.environ.get(ENV) or "{}")


def before_batch() -> None:
    delay = plan().get("batch_delay_s")
    if delay:
        time.sleep(delay)
    marker = plan().get("kill_actor_marker")
    if marker and not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)


def before_read(uri: str) -> None:
    global _reads
    _reads += 1
    if _reads <= plan().get("fail_reads", 0):
        raise ConnectionError(f"injected read failure {_reads} of {uri}")


def before_engine(batch_size: int) -> None:
    limit = plan().get("oom_above_batch")
    if limit is not None and batch_size > limit:
        import torch

        raise torch.OutOfMemoryError(f"injected: batch of {batch_size} is over {limit}")


def runtime_env() -> dict:
    """Ray remote args that carry the driver's fault plan to workers (empty when there is none)."""
    value = os.environ.get(ENV)
    return {"runtime_env": {"env_vars": {ENV: value}}} if value else {}
