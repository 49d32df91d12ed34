"""Fault injection for the reliability tests: kill an inference actor or the driver, fail reads,
fake an OOM, slow batches down.

Off unless the driver's environment holds GLIMPSE_BATCH_FAULTS, a JSON object; the job forwards
it to its Ray workers. Keys (all optional):
    kill_actor_marker   path: the first inference batch after this file is absent creates it and
                        kills its actor process (os._exit), once per marker
    fail_reads          int: each worker process's first N S3 GetObject requests fail with a
                        connection error, below botocore, so that its retries are what recover
    oom_above_batch     int: engine batches larger than this raise torch.OutOfMemoryError
    batch_delay_s       float: each inference batch waits this long first (time to interrupt a job)
    exit_driver_at      name of a point in the driver (pipeline.job.run's `faults.reached` calls,
                        e.g. "written" or "published 1"): the driver exits there at once (os._exit),
                        as if killed, leaving whatever it had written
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

ENV = "GLIMPSE_BATCH_FAULTS"
DRIVER_EXIT_CODE = 137


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


def reached(point: str) -> None:
    """The driver passes `point`; exits there if the plan says so."""
    if plan().get("exit_driver_at") == point:
        os._exit(DRIVER_EXIT_CODE)


def s3_session():
    """An aiobotocore session for s3fs whose first `fail_reads` GetObject sends fail with a
    connection error; None (s3fs makes its own) when there is no such fault."""
    failures = plan().get("fail_reads", 0)
    if not failures:
        return None
    from aiobotocore.session import AioSession
    from botocore.exceptions import ConnectionClosedError

    sent = 0

    def fail_first_sends(request, **_):
        nonlocal sent
        sent += 1
        if sent <= failures:
            raise ConnectionClosedError(endpoint_url=request.url)

    session = AioSession()
    session.register("before-send.s3.GetObject", fail_first_sends)
    return session


def before_engine(batch_size: int) -> None:
    limit = plan().get("oom_above_batch")
    if limit is not None and batch_size > limit:
        import torch

        raise torch.OutOfMemoryError(f"injected: batch of {batch_size} is over {limit}")


def env_vars() -> dict:
    """The environment that carries the driver's fault plan to workers (empty when there is none)."""
    value = os.environ.get(ENV)
    return {ENV: value} if value else {}
