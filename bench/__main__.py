"""The benchmark suite in one command: `python -m bench [--out DIR] [--gpu]`.

Runs, one after another, each writing its JSON into DIR (default bench-results/):
- engine.json: the engine pruned vs unpruned vs transformers `generate`, batch sizes 1, 8, 32
  (tiny checkpoint on the CPU; with --gpu, the Qwen2.5-VL-7B shape with random bf16 weights,
  256 requests of one 1280×960 image, 128 and 512 new tokens, batch 64, then a 24 GiB cap);
- job.json: the whole Ray job, 2,000 rows (images/s, engine busy fraction, peak memory).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent

CPU_ENGINE = ["--batch-sizes", "1", "8", "32", "--requests", "32", "--new-tokens", "16", "--repeats", "3"]
GPU_ENGINE = [
    *("--preset", "qwen2.5-vl-7b", "--device", "cuda", "--requests", "256", "--width", "1280", "--height", "960"),
    *("--new-tokens", "128", "512", "--batch-sizes", "64", "--prefill-rows", "8", "--memory-cap-gib", "24"),
    *("--repeats", "3"),
]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--gpu", action="store_true", help="the real-size engine runs on a GPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [
        ["engine.py", *(GPU_ENGINE if args.gpu else CPU_ENGINE), "--json", str(args.out / "engine.json")],
        ["job_scale.py", "--rows", "2000", "--json", str(args.out / "job.json")],
    ]
    for script, *options in runs:
        print(f"== {script} {' '.join(options)}", flush=True)
        subprocess.run([sys.executable, str(BENCH / script), *options], check=True)
    print(f"figures written to {args.out}/")


if __name__ == "__main__":
    main()
