"""Answer questions about (or caption) an image corpus on Ray: `python -m jobs.vqa [options]`.

With no input it runs on the bundled sample images with a tiny random-weight model built locally.
Exit status: 0 done; 1 done, but more rows failed than --max-failed-fraction allows; 2 refused
before any row was answered (bad options, ids, output location, lease, or a resume of other work);
130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.cli import add_job_options, job_config

INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.vqa", description=__doc__.split("\n")[0])
    add_job_options(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this job's earlier output; only files a run of the job wrote are removed",
    )
    parser.add_argument(
        "--take-over-lease",
        action="store_true",
        help="take the output's lease from another run now, without waiting for its timeout (S3)",
    )
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, or a local Ray)")
    args = parser.parse_args(argv)
    try:
        config = job_config(args)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_job(config, args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED


def run_job(config, args: argparse.Namespace) -> int:
    import ray

    from pipeline.job import TooManyFailures, run
    from pipeline.lease import LeaseHeld, LeaseLost
    from pipeline.output import OutputError
    from pipeline.sources import ManifestError

    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False)
    try:
        summary = run(config, overwrite=args.overwrite, take_over_lease=args.take_over_lease)
    except (OutputError, ManifestError, LeaseHeld) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LeaseLost as e:
        print(f"error: {e}; nothing was published", file=sys.stderr)
        return 1
    except TooManyFailures as e:
        print("\n".join(e.summary.lines()))
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
