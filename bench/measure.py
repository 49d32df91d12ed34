"""Helpers the benchmark scripts share: a peak-memory sampler, figure statistics, machine facts."""

from __future__ import annotations

import os
import statistics
import threading
import time

import psutil


class PeakRSS:
    """Samples a memory figure in a thread (default: this process's resident memory)."""

    def __init__(self, every_s: float = 0.05, read=lambda: psutil.Process().memory_info().rss) -> None:
        self.peak, self.every_s, self.read, self._stop = 0, every_s, read, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    """min / median / max of repeated measurements."""
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}"
