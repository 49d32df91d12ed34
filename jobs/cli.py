"""Command-line options generated from JobConfig's fields, so the two never disagree."""

from __future__ import annotations

import argparse
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from pipeline.config import JobConfig

STORAGE_FLAGS = {"s3_endpoint_url": "endpoint_url", "s3_region": "region", "s3_anon": "anon"}


def add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="job YAML; command-line options override it")
    for name, field in JobConfig.model_fields.items():
        if name == "storage":
            continue
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, help=field.description, **_kind(field.annotation)
        )
    add_storage_options(parser)


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    parser.add_argument("--s3-region", help="S3 region (else AWS_REGION)")
    parser.add_argument("--s3-anon", action="store_true", default=None, help="anonymous S3 access")


def storage_overrides(args: argparse.Namespace) -> dict:
    """The storage options given on the command line (credentials come from YAML or the environment)."""
    return {key: getattr(args, flag) for flag, key in STORAGE_FLAGS.items() if getattr(args, flag) is not None}


def job_config(args: argparse.Namespace) -> JobConfig:
    """YAML (if any) overlaid with the options given."""
    given = {name: getattr(args, name) for name in JobConfig.model_fields if getattr(args, name, None) is not None}
    storage = storage_overrides(args)
    if args.config:
        config = JobConfig.from_yaml(args.config, **given)
        if storage:
            config = config.model_copy(update={"storage": config.storage.model_copy(update=storage)})
        return config
    return JobConfig.validated({**given, "storage": storage})


def _kind(annotation) -> dict:
    base = annotation
    if get_origin(annotation) in (Union, UnionType):  # `X | None`: the option's type is X
        base = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(base) is Literal:
        return {"choices": list(get_args(base))}
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": base}
