"""Report on a finished job: `python -m jobs.report OUTPUT [--out DIR]`.

Reads the job's Parquet (local or s3://), prints the summary table and writes DIR/report.html,
one self-contained page with the plots inlined.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.cli import add_storage_options, storage_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the job's output directory (local path or URI)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where report.html goes (default: report/)")
    parser.add_argument("--gpu-hourly-usd", type=float, help="GPU price per hour (default: the job's)")
    add_storage_options(parser)
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq

    from pipeline.report import render
    from pipeline.storage import StorageOptions, filesystem_for, pyarrow_filesystem
    from pipeline.summary import COLUMNS, SUMMARY_FILE, summarize

    storage = StorageOptions(**storage_overrides(args))
    fs, path = filesystem_for(args.output, storage)
    if not fs.exists(path) or not any(p.endswith(".parquet") for p in fs.find(path)):
        print(f"error: no Parquet files under {args.output}", file=sys.stderr)
        return 2
    summary_path = f"{path.rstrip('/')}/{SUMMARY_FILE}"
    written = json.loads(fs.cat(summary_path)) if fs.exists(summary_path) else {}
    arrow_fs, arrow_path = pyarrow_filesystem(args.output, storage)
    table = pq.read_table(arrow_path, filesystem=arrow_fs, columns=COLUMNS)
    price = args.gpu_hourly_usd if args.gpu_hourly_usd is not None else written.get("gpu_hourly_usd")
    summary = summarize(table, args.output, written.get("wall_s", 0.0), price, written.get("engine_busy_fraction"))
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "report.html"
    report.write_text(render(table, summary))
    print("\n".join(summary.lines()))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
