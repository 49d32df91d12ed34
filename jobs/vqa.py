"""Answer questions about (or caption) an image corpus on Ray: `python -m jobs.vqa [options]`.

With no input it runs on the bundled sample images with a tiny random-weight model built locally
(its glimpse modules trained, shipped in pipeline/samples/tiny-glimpse).
Exit status: 0 done; 1 done, but more rows failed than --max-failed-fraction allows, or the job
failed while running; 2 refused before any row was answered (bad options, input, model, output
location, lease, or a resume of other work); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import (
    JobArgumentParser,
    add_job_options,
    add_run_options,
    error,
    failed_while_running,
    job_config,
    refused,
    run_main,
)


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(prog="python -m jobs.vqa", description=__doc__.split("\n")[0])
    add_job_options(parser)
    run = add_run_options(parser)
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this job's earlier output; only files a run of the job wrote are removed",
    )
    run.add_argument(
        "--take-over-lease",
        action="store_true",
        help="take the output's lease from another run now, without waiting for its timeout (S3)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(run_job, build_parser().parse_args(argv))


def run_job(args: argparse.Namespace) -> int:
    from pipeline.cluster import ClusterError, start_ray
    from pipeline.job import TooManyFailures, check, run
    from pipeline.lease import LeaseHeld, LeaseLost
    from pipeline.output import OutputError
    from pipeline.storage import UnsupportedURI

    try:
        config = job_config(args)
        checked = check(config)  # before Ray starts: a mistake costs a second, not a cluster start
    except (ValueError, OutputError, UnsupportedURI, OSError) as e:  # options, config, input, model, output
        return refused(e)
    try:
        logs = start_ray(args.ray_address, args.verbose)
    except ClusterError as e:
        return error(str(e))
    try:
        summary = run(config, overwrite=args.overwrite, take_over_lease=args.take_over_lease, checked=checked)
    except (ValueError, OutputError, LeaseHeld) as e:
        return error(str(e))
    except LeaseLost as e:
        return error(f"{e}; nothing was published", 1)
    except TooManyFailures as e:
        print("\n".join([*e.summary.headline(), *e.summary.lines()]))
        return error(str(e), 1)
    except Exception as e:
        return failed_while_running(e, "the job failed", args.verbose, logs)
    print("\n".join([*summary.headline(), *summary.lines()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
