"""Rebuilds the trained glimpse modules the demo ships (`pipeline/samples/tiny-glimpse`).

    python -m pipeline.synthetic.demo_modules [--work DIR]

Builds the tiny base model, writes synthetic grounding data (a named shape among clutter and
look-alikes), trains fresh modules on it with `jobs.train` on a local Ray, checks them on
held-out images (kept tokens against the target's box, through the engine's kept masks) and
copies them, with the digest of the base they fit, into the package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pipeline.synthetic.grounding import write_dataset
from pipeline.synthetic.tiny import BASE_DIGEST_FILE, TRAINED_GLIMPSE, base_digest, write_tiny_checkpoint

TRAIN_ROWS, TRAIN_SEED = 2000, 1
HELD_OUT_ROWS, HELD_OUT_SEED = 200, 2
LOOK_ALIKES = 1  # at most one look-alike shape per image, beside the clutter
# The recipe for the tiny model: the release's, with a larger learning rate and batch for a model
# this small, the glimpse read at every layer up to the pruning layer, and a VIP sized for it.
RECIPE = {
    "steps": 400,
    "batch_size": 32,
    "grad_accum": 1,
    "lr": 1e-2,
    "read_layers": "0,1,2",
    "fuse_size": 32,
    "cond_size": 32,
    "log_every": 50,
    "checkpoint_every": 100,
}


def recipe_arguments() -> list[str]:
    return ["--fresh"] + [arg for key, value in RECIPE.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def held_out_score(base: Path, glimpse: Path, manifest: Path):
    """Kept-vs-box scores of the modules on `manifest`, through the engine's kept masks."""
    from PIL import Image

    from pipeline.glimpse.engine import GlimpseEngine, Request
    from pipeline.glimpse.sampling import SamplingParams
    from pipeline.training.data import parse_boxes
    from pipeline.training.evaluate import score

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    engine = GlimpseEngine.from_pretrained(base, glimpse)
    requests = []
    for row in rows:
        with Image.open(row["image"]) as image:
            requests.append(Request(row["id"], [image.copy()], row["question"], SamplingParams(max_new_tokens=1)))
    results = [r.columns() for r in engine.generate(requests, emit_masks=True)]
    return score(results, {row["id"]: parse_boxes(row["boxes"]) for row in rows})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.synthetic.demo_modules", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--work", type=Path, default=Path(".cache/demo-modules"), help="scratch directory")
    args = parser.parse_args(argv)
    from jobs import train

    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    tiny = write_tiny_checkpoint(work / "tiny", with_glimpse=False)
    train_set = write_dataset(work / "train", n=TRAIN_ROWS, seed=TRAIN_SEED, distractors=LOOK_ALIKES)
    held_out = write_dataset(work / "held-out", n=HELD_OUT_ROWS, seed=HELD_OUT_SEED, distractors=LOOK_ALIKES)
    before = held_out_score(tiny / "base", _fresh(tiny, work), held_out)
    out = work / "run"
    command = ["--manifest", str(train_set), "--model", str(tiny / "base"), "--output", str(out), *recipe_arguments()]
    if train.main(command) != 0:
        return 1
    after = held_out_score(tiny / "base", out / "glimpse", held_out)
    print(f"held-out kept-vs-box IoU: {before.iou:.3f} fresh → {after.iou:.3f} trained "
          f"(keeping everything: {after.box_share:.3f}; kept {after.keep_ratio:.1%})")  # fmt: skip
    shutil.rmtree(TRAINED_GLIMPSE, ignore_errors=True)
    shutil.copytree(out / "glimpse", TRAINED_GLIMPSE)
    (TRAINED_GLIMPSE / BASE_DIGEST_FILE).write_text(base_digest(tiny / "base") + "\n")
    print(f"wrote {TRAINED_GLIMPSE}")
    return 0


def _fresh(tiny: Path, work: Path) -> Path:
    """The fresh modules the recipe starts from, saved, to score chance level."""
    from transformers import AutoConfig

    from pipeline.training.recipe import fresh_modules, glimpse_config

    config = glimpse_config(
        AutoConfig.from_pretrained(tiny / "base"),
        read_layers=[int(x) for x in RECIPE["read_layers"].split(",")],
        fuse_size=RECIPE["fuse_size"],
        cond_size=RECIPE["cond_size"],
    )
    fresh_modules(config, seed=0).save(work / "fresh")
    return work / "fresh"


if __name__ == "__main__":
    sys.exit(main())
