"""Which Ray a job runs on, and how much of Ray's chatter reaches the terminal.

A job joins the cluster it is given (`--ray-address`, or RAY_ADDRESS as `ray job submit` sets
it) and otherwise starts a local Ray of its own: never a `ray start` cluster that happens to run
on the same machine. Quiet by default: Ray's INFO and WARNING lines go to the session's log files
(the job prints where), the terminal keeps errors, Ray Data's progress bars (in a terminal) and
the job's own progress line. Verbose brings everything back.
"""

from __future__ import annotations

import logging
import os
import sys

QUIET_LEVEL = logging.ERROR


def start_ray(address: str | None = None, verbose: bool = False) -> str:
    """Connects to (or starts) Ray; returns the session's log directory."""
    if not verbose:
        # The driver's own core-worker lines (C++) go to its log file, not the terminal.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    import ray
    import ray.data

    if ray.is_initialized():  # the caller's own Ray (a test, a notebook): use it as it is
        return session_log_dir()
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        include_dashboard=False if address == "local" else None,
        logging_level=logging.INFO if verbose else QUIET_LEVEL,
        log_to_driver=verbose,
    )
    context = ray.data.DataContext.get_current()
    # In a terminal Ray Data draws its progress bars; elsewhere (a log, CI) they would be pages of
    # INFO lines, and the job's own progress line says what matters.
    context.enable_progress_bars = verbose or sys.stderr.isatty()
    if not verbose:
        quiet_ray_data()
    return session_log_dir()


def quiet_ray_data() -> None:
    """Ray Data logs to a file in the session directory and to the console; keep the file."""
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(QUIET_LEVEL)


def session_log_dir() -> str:
    """Where this Ray session's logs are on the driver's machine ("" when not known)."""
    from ray._private import worker

    node = worker._global_node
    return os.path.join(node.get_session_dir_path(), "logs") if node is not None else ""
