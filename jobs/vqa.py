"""Answer questions about (or caption) an image corpus on Ray: `python -m jobs.vqa [options]`.

With no input it runs on the bundled sample images with a tiny random-weight model built locally.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.cli import add_job_options, job_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.vqa", description=__doc__.split("\n")[0])
    add_job_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace Parquet files already in the output")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, or a local Ray)")
    args = parser.parse_args(argv)
    try:
        config = job_config(args)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import ray

    from pipeline.job import run
    from pipeline.sources import ManifestError

    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False)
    try:
        summary = run(config, overwrite=args.overwrite)
    except (FileExistsError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
