"""Report on a finished job: `python -m jobs.report OUTPUT [--out DIR]`.

Reads the job's Parquet (local or s3://), prints the summary table and writes DIR/report.html,
one self-contained page with the plots inlined.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cli import JobArgumentParser, add_storage_options, storage_overrides


def main(argv: list[str] | None = None) -> int:
    parser = JobArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the job's output directory (local path or URI)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where report.html goes (default: report/)")
    parser.add_argument("--gpu-hourly-usd", type=float, help="GPU price per hour (default: the job's)")
    add_storage_options(parser)
    args = parser.parse_args(argv)

    from pipeline.output import OutputDir, OutputError
    from pipeline.report import render
    from pipeline.storage import StorageOptions
    from pipeline.summary import summarize
    from schemas import SUMMARY_COLUMNS

    output = OutputDir(args.output, StorageOptions(**storage_overrides(args)))
    try:
        table = output.read_results(SUMMARY_COLUMNS)  # only the files the job wrote, whatever lies beside them
        written = output.read_summary()
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
