"""A progress line while a job runs: rows done, rows/s and visual tokens saved so far.

Ray Data's own progress bars show the stages; this adds what the user cares about. Answerer
actors report each batch's counts to one small actor; the driver reads it every few seconds.
"""

from __future__ import annotations

import logging
import threading
import time

import ray

log = logging.getLogger(__name__)


def batch_counts(rows: list[dict]) -> dict[str, int]:
    """What a finished batch adds to the progress line."""
    ok = [r for r in rows if r["error"] is None]
    return {
        "rows": len(rows),
        "failed": len(rows) - len(ok),
        "visual_tokens": sum(r.get("n_visual_tokens") or 0 for r in ok),
        "visual_kept": sum(r.get("n_visual_kept") or 0 for r in ok),
    }


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Totals of the batches answered so far."""

    def __init__(self) -> None:
        self.totals = {"rows": 0, "failed": 0, "visual_tokens": 0, "visual_kept": 0}

    def add(self, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            self.totals[key] += value

    def snapshot(self) -> dict[str, int]:
        return dict(self.totals)


def progress_line(totals: dict[str, int], elapsed_s: float) -> str:
    saved = totals["visual_tokens"] - totals["visual_kept"]
    share = saved / totals["visual_tokens"] if totals["visual_tokens"] else 0.0
    rate = totals["rows"] / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"progress: {totals['rows']} rows done ({totals['failed']} failed), {rate:.2f} rows/s, "
        f"visual tokens saved {saved} ({share:.1%})"
    )


class ProgressLog:
    """While open, logs the counter's totals every `interval_s` seconds (and once at the end)."""

    def __init__(self, counter, interval_s: float) -> None:
        self.counter, self.interval_s = counter, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-log", daemon=True)
        self._started = time.perf_counter()

    def __enter__(self) -> ProgressLog:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._log()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._log()

    def _log(self) -> None:
        totals = ray.get(self.counter.snapshot.remote())
        log.info(progress_line(totals, time.perf_counter() - self._started))
