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
import socket
import sys

# Quiet, the terminal gets only what the job itself says: a failure ends in one `error:` line
# naming its cause and the log directory, where Ray's own account of it is.
QUIET_LEVEL = logging.CRITICAL
_started_locally = False


class ClusterError(ValueError):
    """The Ray cluster cannot be reached, or cannot run the job as asked."""


def start_ray(address: str | None = None, verbose: bool = False) -> str:
    """Connects to (or starts) Ray; returns the session's log directory."""
    global _started_locally
    if not verbose:
        # The driver's own core-worker lines (C++) go to its log file, not the terminal.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    import ray
    import ray.data

    if ray.is_initialized():  # the caller's own Ray (a test, a notebook): use it as it is
        return session_log_dir()
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        check_reachable(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False if address == "local" else None,
            logging_level=logging.INFO if verbose else QUIET_LEVEL,
            log_to_driver=verbose,
        )
    except (ValueError, ConnectionError, TimeoutError) as e:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {str(e).strip().splitlines()[0]}") from None
    _started_locally = address == "local"
    context = ray.data.DataContext.get_current()
    # In a terminal Ray Data draws its progress bars; elsewhere (a log, CI) they would be pages of
    # INFO lines, and the job's own progress line says what matters.
    context.enable_progress_bars = verbose or sys.stderr.isatty()
    if not verbose:
        quiet_ray_data()
    return session_log_dir()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A `host:port` cluster address answers a TCP connection, or the job stops at once (Ray
    itself would retry for minutes). Other forms (`auto`, `ray://…`) are left to Ray."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {e.strerror or e}") from None


def shortfall(resources: dict, needs: dict[str, tuple[float, str, str]]) -> str | None:
    """The first resource in `needs` ({"GPU": (amount, who needs it, hint)…}) that `resources`
    cannot hold, said in one line; None when they hold them all."""
    for kind, (need, who, hint) in needs.items():
        have = resources.get(kind, 0)
        if need > have:
            return f"{who} need {need:g} {kind}s; Ray has {have:g}{hint}"
    return None


def started_locally() -> bool:
    """Whether this process started its own local Ray (whose resources are all there will be)."""
    return _started_locally


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
