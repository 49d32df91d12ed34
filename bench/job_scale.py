"""The whole Ray job: throughput, how busy the engine is kept, and memory, as the row count grows.

    python bench/job_scale.py [--rows 500 2000] [--json out.json]

Each run: a JSONL manifest of N rows over small generated images, the tiny model, 8 new tokens,
local Ray. Prints rows/s, the engine's busy fraction (seconds inside the engine over the
answering actor's span of batches), the driver's peak RSS (sampled every 50 ms) and the
machine's peak memory in use. A flat driver peak across row counts means the driver does not
materialise the dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.measure import PeakRSS, machine  # noqa: E402


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

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
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
            with PeakRSS() as peak, PeakRSS(0.2, lambda: psutil.virtual_memory().used) as machine_peak:
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
                    "machine_peak_used_gib": round(machine_peak.peak / 2**30, 2),
                    "engine_busy_fraction": round(summary.engine_busy_fraction or 0.0, 3),
                }
            )
            print(json.dumps(figures[-1]), flush=True)
    info = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": figures,
    }
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
