"""Report on a finished job: `python -m jobs.report OUTPUT [--out DIR]`.

Reads the job's Parquet and `_summary.json` (local or s3://), prints the headline and the summary
table, and writes DIR/report.html: one self-contained page with the plots and the gallery inlined.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from jobs.cli import JobArgumentParser, add_storage_options, storage_overrides


def main(argv: list[str] | None = None) -> int:
    parser = JobArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the job's output directory (local path or URI)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where report.html goes (default: report/)")
    parser.add_argument(
        "--hourly-usd", type=float, help="price of one answering device (GPU, or CPU) per hour (default: the job's)"
    )
    parser.add_argument("--gallery", type=int, default=8, metavar="N", help="rows the gallery shows (default: 8)")
    add_storage_options(parser)
    args = parser.parse_args(argv)
    if args.gallery < 0:
        parser.error("--gallery must be 0 or more")
    if args.hourly_usd is not None and not (math.isfinite(args.hourly_usd) and args.hourly_usd >= 0):
        parser.error("--hourly-usd must be a finite price, 0 or more")

    from pipeline.output import OutputDir, OutputError
    from pipeline.report import render
    from pipeline.storage import StorageOptions
    from pipeline.summary import summarize
    from schemas import REPORT_COLUMNS

    storage = StorageOptions(**storage_overrides(args))
    output = OutputDir(args.output, storage)
    try:
        table = output.read_results(REPORT_COLUMNS)  # only the files the job wrote, whatever lies beside them
        written = output.read_summary()
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    price = args.hourly_usd if args.hourly_usd is not None else written.get("hourly_usd")
    summary = summarize(
        table,
        args.output,
        written.get("wall_s", 0.0),
        price,
        written.get("engine_busy_fraction"),
        written.get("device", "CPU"),
        written.get("devices", 1.0),
        written.get("images_encoded"),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "report.html"
    report.write_text(render(table, summary, written.get("lineage"), storage, args.gallery), encoding="utf-8")
    print("\n".join([*summary.headline(), *summary.lines()]))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
