"""Train GlimpsePrune's modules on Ray Train: `python -m jobs.train --manifest URI --model M --output DIR ...`.

Only the glimpse embeddings and the VIP train; the base model is frozen. Rerun the same command
after an interruption and it resumes from the last checkpoint in OUTPUT/checkpoints. Exit status:
0 trained; 1 the run failed; 2 refused before training (bad options, data, model or output);
130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import (
    JobArgumentParser,
    add_config_options,
    add_run_options,
    config_from_args,
    error,
    failed_while_running,
    refused,
    run_main,
)
from pipeline.training.config import TrainConfig

OPTION_GROUPS = {
    "input": ("manifest", "dataset", "image_column", "id_column", "min_pixels", "max_pixels"),
    "model and modules": (
        "model",
        "model_revision",
        "init_glimpse",
        "fresh",
        "layer",
        "read_layers",
        "vision_blocks",
        "fuse_size",
        "cond_size",
        "vip_heads",
        "dtype",
        "attn",
    ),
    "recipe": (
        "steps",
        "batch_size",
        "grad_accum",
        "lr",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "loc_weight",
        "dice_weight",
        "bce_weight",
        "le_weight",
        "seed",
    ),
    "resources": ("num_workers", "use_gpu", "prepare_batch_size", "max_image_bytes", "max_image_pixels"),
    "output": ("output", "log_every", "checkpoint_every", "keep_checkpoints"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    add_config_options(parser, TrainConfig, OPTION_GROUPS)
    add_run_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(train, build_parser().parse_args(argv))


def train(args: argparse.Namespace) -> int:
    from pipeline.checkpoints import CheckpointError
    from pipeline.cluster import ClusterError, start_ray
    from pipeline.glimpse.errors import GlimpseError
    from pipeline.storage import UnsupportedURI
    from pipeline.training.run import NothingTrained, TrainingError, check, run

    try:
        config = config_from_args(args, TrainConfig)
        checked = check(config)
    except (ValueError, CheckpointError, GlimpseError, UnsupportedURI, OSError) as e:
        return refused(e)
    try:
        logs = start_ray(args.ray_address, args.verbose)
    except ClusterError as e:
        return error(str(e))
    try:
        summary = run(config, checked)
    except TrainingError as e:
        return error(str(e))
    except NothingTrained as e:
        return error(str(e), 1)
    except Exception as e:
        return failed_while_running(e, "training failed", args.verbose, logs)
    final = summary["final"] or {}
    print(
        f"trained {summary['steps']} steps on {summary['examples_consumed']} examples "
        f"({summary['epochs']:.2f} epochs of {summary['rows']} rows); last window: loss {final.get('loss', 0):.4f}, "
        f"kept {final.get('keep_ratio', 0):.1%} of visual tokens, IoU with the boxes {final.get('iou', 0):.3f}; "
        f"modules in {summary['glimpse']}"
    )
    if summary["failed_rows"]:
        print(f"{summary['failed_rows']} rows could not be prepared and were skipped (see _train_summary.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
