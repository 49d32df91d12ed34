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
    """Totals of the batches answered so far, and how busy the engines were: the seconds spent
    inside them over the sum, over actors, of each one's span from its first batch's start to its
    last one's end (an autoscaling pool's actors come and go)."""

    def __init__(self) -> None:
        self.totals = {"rows": 0, "failed": 0, "visual_tokens": 0, "visual_kept": 0, "images_encoded": 0}
        self.engine_s = 0.0
        self.spans: dict[str, tuple[float, float]] = {}  # actor → (first start, last end)

    def add(self, counts: dict[str, int], started: float, ended: float, engine_s: float, actor: str = "") -> None:
        for key, value in counts.items():
            self.totals[key] += value
        self.engine_s += engine_s
        first, last = self.spans.get(actor, (started, ended))
        self.spans[actor] = (min(first, started), max(last, ended))

    def snapshot(self) -> dict:
        span = sum(last - first for first, last in self.spans.values())
        busy = min(self.engine_s / span, 1.0) if span > 0 else None
        return {**self.totals, "engine_busy": busy, "actors": len(self.spans)}


def progress_line(totals: dict, elapsed_s: float) -> str:
    saved = totals["visual_tokens"] - totals["visual_kept"]
    share = saved / totals["visual_tokens"] if totals["visual_tokens"] else 0.0
    rate = totals["rows"] / elapsed_s if elapsed_s > 0 else 0.0
    busy = f", engine busy {totals['engine_busy']:.0%}" if totals.get("engine_busy") is not None else ""
    return (
        f"progress: {totals['rows']} rows done ({totals['failed']} failed), {rate:.2f} rows/s, "
        f"visual tokens saved {saved} ({share:.1%}){busy}"
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
        self.final = self._log()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._log()

    def _log(self) -> dict:
        totals = ray.get(self.counter.snapshot.remote())
        log.info(progress_line(totals, time.perf_counter() - self._started))
        return totals
