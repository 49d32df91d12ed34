"""Soak: a long job with bad inputs mixed in must finish with every row accounted for.

    python bench/soak.py [--rows 10000] [--bad-share 0.05] [--json out.json]

A Parquet manifest of N rows over small generated images, a share of them bad (missing object,
zero bytes, truncated PNG, not an image, a decompression bomb), the tiny model, 8 new tokens,
local Ray. Prints rows/s, the driver's peak RSS, the machine's peak memory in use, and the error
counts; exits non-zero unless each id appears once and exactly the bad rows failed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.measure import PeakRSS  # noqa: E402

BAD_CODES = {
    "missing": "not_found",
    "zero": "empty_file",
    "truncated": "corrupt_image",
    "text": "not_an_image",
    "bomb": "too_many_pixels",
}


def write_corpus(directory: Path, rows: int, bad_share: float) -> tuple[Path, dict[str, str]]:
    """The manifest, and the expected error code of each bad row's id."""
    rng = np.random.default_rng(0)
    good = []
    for i in range(16):
        path = directory / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(path)
        good.append(str(path))
    contents = {
        "zero": b"",
        "truncated": Path(good[0]).read_bytes()[:200],
        "text": b"not an image\n" * 20,
        "bomb": _png(Image.new("1", (15000, 15000))),
    }
    bad_paths = {kind: str(directory / f"bad-{kind}.png") for kind in BAD_CODES}
    for kind, data in contents.items():
        Path(bad_paths[kind]).write_bytes(data)
    every = max(1, round(1 / bad_share)) if bad_share else rows + 1
    kinds = list(BAD_CODES)
    manifest, expected = [], {}
    for i in range(rows):
        row_id = f"row-{i:07d}"
        if i % every == every - 1:
            kind = kinds[(i // every) % len(kinds)]
            expected[row_id] = BAD_CODES[kind]
            manifest.append({"id": row_id, "image": bad_paths[kind], "question": "what is it"})
        else:
            manifest.append({"id": row_id, "image": good[i % len(good)], "question": "what is it"})
    path = directory / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(manifest), path)
    return path, expected


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--bad-share", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import ray

    from pipeline.config import JobConfig
    from pipeline.job import run

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest, expected = write_corpus(tmp, args.rows, args.bad_share)
        config = JobConfig(
            manifest=str(manifest),
            output=str(tmp / "out"),
            tiny_model_dir=str(tmp / "tiny"),
            max_new_tokens=8,
            batch_size=args.batch_size,
            prepare_batch_size=64,
            progress_interval_s=15,
        )
        with PeakRSS() as driver, PeakRSS(0.2, lambda: psutil.virtual_memory().used) as machine:
            summary = run(config)
        table = pq.read_table(tmp / "out", columns=["id", "error_code"])
    ids = table.column("id").to_pylist()
    failed = {i: c for i, c in zip(ids, table.column("error_code").to_pylist()) if c is not None}
    checks = {
        "each_id_once": len(ids) == len(set(ids)) == args.rows,
        "exactly_the_bad_rows_failed_with_their_codes": failed == expected,
    }
    figures = {
        "rows": args.rows,
        "bad_rows": len(expected),
        "wall_s": round(summary.wall_s, 1),
        "rows_per_s": round(summary.rows_per_s, 1),
        "driver_peak_rss_mib": round(driver.peak / 2**20, 1),
        "machine_peak_used_gib": round(machine.peak / 2**30, 2),
        "errors": summary.errors,
        "checks": checks,
        "machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
