"""Command-line options generated from JobConfig's fields, so the two never disagree."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from types import UnionType
from typing import Literal, NoReturn, Union, get_args, get_origin

from pipeline.config import JobConfig, Options

EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception): ")
INTERRUPTED = 130  # exit status after Ctrl-C: rerun the same command to resume
STORAGE_FLAGS = {"s3_endpoint_url": "endpoint_url", "s3_region": "region", "s3_anon": "anon"}

# --help shows the options in these groups, in this order; every JobConfig field is in one.
OPTION_GROUPS = {
    "input": (
        "manifest",
        "images",
        "dataset",
        "image_column",
        "question_column",
        "id_column",
        "prompt",
        "max_new_tokens",
    ),
    "model": (
        "model",
        "model_revision",
        "glimpse",
        "glimpse_revision",
        "prune",
        "tiny_model_dir",
        "dtype",
        "attn",
        "min_pixels",
        "max_pixels",
    ),
    "pruning": ("threshold", "max_keep_ratio", "min_kept", "keep_ratio", "ignore_eos"),
    "limits on inputs": ("max_image_bytes", "max_image_pixels", "max_question_tokens"),
    "batching and resources": (
        "batch_size",
        "prefill_rows",
        "kv_cache_gib",
        "num_actors",
        "gpus_per_actor",
        "rows_per_block",
        "prepare_batch_size",
        "prepare_cpus",
        "group_by_image",
        "repartition_by_image",
    ),
    "output and accounting": (
        "output",
        "control_fraction",
        "control_rows",
        "metric",
        "keep_masks",
        "hourly_usd",
        "progress_interval_s",
        "max_failed_fraction",
        "lease_timeout_s",
    ),
}


class JobArgumentParser(argparse.ArgumentParser):
    """argparse, with no abbreviated options (`--max-new-token` is not `--max-new-tokens`) and a
    mistake reported in one line, without the usage block."""

    def __init__(self, **kwargs) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_job_options(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, JobConfig, OPTION_GROUPS)


def add_config_options(parser: argparse.ArgumentParser, config: type[Options], groups: dict) -> None:
    """`--config YAML`, one option per field of `config` in `groups`, and the storage options."""
    parser.add_argument("--config", metavar="YAML", help="job options from a YAML file; the command line wins")
    fields = config.model_fields
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            field = fields[name]
            given = field.is_required() or field.default in (None, False)  # required: no default to show
            default = "" if given else f" (default: {field.default})"
            group.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                default=None,
                help=f"{field.description}{default}",
                **_kind(field.annotation),
            )
    add_storage_options(parser.add_argument_group("storage (credentials: job YAML or AWS environment variables)"))


def add_storage_options(parser) -> None:
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    parser.add_argument("--s3-region", help="S3 region (else AWS_REGION)")
    parser.add_argument("--s3-anon", action="store_true", default=None, help="anonymous S3 access")


def storage_overrides(args: argparse.Namespace) -> dict:
    """The storage options given on the command line (credentials come from YAML or the environment)."""
    return {key: getattr(args, flag) for flag, key in STORAGE_FLAGS.items() if getattr(args, flag) is not None}


def job_config(args: argparse.Namespace) -> JobConfig:
    return config_from_args(args, JobConfig)


def config_from_args(args: argparse.Namespace, config: type[Options]):
    """YAML (if any) overlaid with the options given."""
    given = {name: getattr(args, name) for name in config.model_fields if getattr(args, name, None) is not None}
    storage = storage_overrides(args)
    if args.config:
        loaded = config.from_yaml(args.config, **given)
        if storage:
            loaded = loaded.model_copy(update={"storage": loaded.storage.model_copy(update=storage)})
        return loaded
    return config.validated({**given, "storage": storage})


def add_run_options(parser: argparse.ArgumentParser):
    """The "this run" group every job has (where to run, how loud); returns it for a job's own."""
    run = parser.add_argument_group("this run")
    run.add_argument(
        "--ray-address",
        help="Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray started for this job)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="show Ray's own INFO and WARNING lines")
    return run


def run_main(job, args: argparse.Namespace) -> int:
    """Runs `job(args)` with our own progress and summary lines shown (other libraries' INFO lines,
    such as botocore's "Found credentials", stay out of the terminal); Ctrl-C ends it with 130."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    try:
        return job(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED


def error(message: str, code: int = 2) -> int:
    """A problem reported in one line on stderr, no traceback; returns the exit status."""
    print(f"error: {message}", file=sys.stderr)
    return code


def refused(problem: Exception) -> int:
    """A mistake found before anything ran: one line, exit 2. OS errors keep their kind."""
    return error(f"{type(problem).__name__}: {problem}" if isinstance(problem, OSError) else str(problem))


def failed_while_running(problem: Exception, what: str, verbose: bool, logs: str | None) -> int:
    """A failure at run time: one line naming its cause and the logs, exit 1 (with -v, the traceback)."""
    if verbose:
        raise problem
    where = logs or "the Ray session's log directory"
    return error(f"{what}: {root_cause(problem)} (rerun with -v for Ray's output; logs in {where})", 1)


def root_cause(error: BaseException) -> str:
    """What failed, in one line. Ray wraps a worker's error in its own, with the worker's
    traceback as text: the last exception line in it that is not Ray's own names the cause."""
    chain = [error]
    while (inner := getattr(error, "cause", None) or error.__cause__) is not None and inner not in chain:
        chain.append(error := inner)
    lines = [line.strip() for e in chain for line in str(e).splitlines()]
    named = [line for line in lines if EXCEPTION_LINE.match(line)]
    own = [line for line in named if not line.startswith("ray.")]
    if own:
        return own[-1]
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1]}" if text else type(error).__name__


def _kind(annotation) -> dict:
    base = annotation
    if get_origin(annotation) in (Union, UnionType):  # `X | None`: the option's type is X
        base = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(base) is Literal:
        return {"choices": list(get_args(base))}
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": base}
