"""Report on a finished job: `python -m jobs.report OUTPUT [--out DIR]`.

Reads the job's Parquet and `_summary.json` (local or s3://), prints the headline and the summary
table, and writes DIR/report.html: one self-contained page with the plots and the gallery inlined.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from jobs.cli import JobArgumentParser, add_storage_options, storage_overrides

MAX_GALLERY = 200  # rows the gallery may show: each inlines its pictures, so more make a page too large to open


def main(argv: list[str] | None = None) -> int:
    parser = JobArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the job's output directory (local path or URI)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where report.html goes (default: report/)")
    parser.add_argument(
        "--hourly-usd", type=float, help="price of one answering device (GPU, or CPU) per hour (default: the job's)"
    )
    parser.add_argument(
        "--gallery", type=int, default=8, metavar="N", help=f"rows the gallery shows, 0 to {MAX_GALLERY} (default: 8)"
    )
    add_storage_options(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.gallery <= MAX_GALLERY:
        parser.error(f"--gallery must be 0 to {MAX_GALLERY}")
    if args.hourly_usd is not None and not (math.isfinite(args.hourly_usd) and args.hourly_usd >= 0):
        parser.error("--hourly-usd must be a finite price, 0 or more")

    import pyarrow as pa
    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline.output import OutputDir, OutputError
    from pipeline.report import render, write
    from pipeline.storage import StorageOptions
    from pipeline.summary import resummarize
    from schemas import REPORT_COLUMNS

    storage = StorageOptions(**storage_overrides(args))
    output = OutputDir(args.output, storage)
    try:
        output.require_finished()  # a running job's rows are not yet all there, nor its summary
        table = output.read_results(REPORT_COLUMNS)  # only the files the job wrote, whatever lies beside them
        written = output.read_summary()
    except OutputError as e:
        return _fail(str(e))
    except (OSError, BotoCoreError, ClientError, pa.ArrowException) as e:  # unreachable, refused, or corrupt
        return _fail(f"cannot read {args.output}: {type(e).__name__}: {e}")
    summary = resummarize(table, args.output, written, args.hourly_usd)
    page = render(table, summary, written.get("lineage"), storage, args.gallery)
    try:
        report = write(page, args.out)  # only now: a report that failed leaves no empty folder behind
    except OSError as e:
        return _fail(f"cannot write the report to {args.out}: {type(e).__name__}: {e}")
    print("\n".join([*summary.headline(), *summary.lines()]))
    print(f"report: {report}")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
