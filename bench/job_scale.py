"""Driver memory and throughput of the whole Ray job as the row count grows.

    python bench/job_scale.py [--rows 500 2000] [--json out.json]

Each run: a JSONL manifest of N rows over small generated images, the tiny model, 8 new tokens,
local Ray. Prints rows/s and the driver's peak RSS (sampled every 50 ms while the job runs).
A flat peak across row counts means the driver does not materialise the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))


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


def write_manifest(directory: Path, rows: int) -> Path:
    rng = np.random.default_rng(0)
    images = []
    for i in range(16):
        path = directory / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (56, 84), dtype=np.uint8)).convert("RGB").save(path)
        images.append(str(path))
    manifest = directory / f"manifest-{rows}.jsonl"
    with manifest.open("w") as f:
        for i in range(rows):
            f.write(
                json.dumps({"id": f"row-{i:07d}", "image": images[i % len(images)], "question": "what is it"}) + "\n"
            )
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import ray

    from pipeline.config import JobConfig
    from pipeline.job import run

    ray.init(include_dashboard=False, log_to_driver=False)
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rows in args.rows:
            config = JobConfig(
                manifest=str(write_manifest(tmp, rows)),
                output=str(tmp / f"out-{rows}"),
                tiny_model_dir=str(tmp / "tiny"),
                max_new_tokens=8,
                batch_size=args.batch_size,
                prepare_batch_size=64,
            )
            before = psutil.Process().memory_info().rss
            with PeakRSS() as peak:
                summary = run(config)
            figures.append(
                {
                    "rows": rows,
                    "rows_written": summary.rows,
                    "rows_failed": summary.rows_failed,
                    "wall_s": round(summary.wall_s, 2),
                    "rows_per_s": round(summary.rows_per_s, 2),
                    "driver_rss_before_mib": round(before / 2**20, 1),
                    "driver_peak_rss_mib": round(peak.peak / 2**20, 1),
                }
            )
            print(json.dumps(figures[-1]), flush=True)
    info = {
        "machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "runs": figures,
    }
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
