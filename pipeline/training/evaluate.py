"""Did pruning keep the evidence? Kept tokens against box tokens, from the engine's `--emit-masks`.

    python -m pipeline.glimpse --model BASE --glimpse MODULES --requests held_out/manifest.jsonl \\
        --emit-masks --max-new-tokens 1 --out kept.jsonl
    python -m pipeline.training.evaluate --results kept.jsonl --manifest held_out/manifest.jsonl

prints the mean intersection-over-union of kept and box tokens per row, beside what keeping
every token would score (the boxes' share of the image: where an untrained VIP sits).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.glimpse.objective import ref_token_mask
from pipeline.training.data import parse_boxes

# Qwen2.5-VL (14-pixel patches) and Qwen3-VL (16-pixel) both merge 2×2 patches into one visual token;
# `image_grid_thw` counts patches, so the merged grid is the same arithmetic for either.
MERGE = 2


@dataclass
class KeptScore:
    rows: int
    iou: float  # mean over rows of |kept ∩ box| / |kept ∪ box|
    keep_ratio: float  # mean share of visual tokens kept
    box_share: float  # mean share of visual tokens in the boxes: the IoU of keeping everything
    recall: float  # mean share of box tokens kept
    precision: float  # mean share of kept tokens in a box


def kept_iou(kept: list[int], grid_thw: list[list[int]], boxes: list[list[float]], merge: int = MERGE):
    """(IoU, keep ratio, box share, recall, precision) of one row; its one image's merged grid."""
    (_, h, w), *others = grid_thw
    if others:
        raise ValueError("box scores need one image per row")
    if len(kept) != (h // merge) * (w // merge):
        raise ValueError(f"a kept mask of {len(kept)} tokens does not fit the grid {h}×{w} merged by {merge}")
    kept_mask = torch.tensor(kept, dtype=torch.bool)
    box = ref_token_mask(boxes, (h // merge, w // merge))
    hit, union = int((kept_mask & box).sum()), int((kept_mask | box).sum())
    n_kept, n_box = int(kept_mask.sum()), int(box.sum())
    return (
        hit / union if union else 1.0,
        n_kept / kept_mask.numel(),
        n_box / box.numel(),
        hit / n_box if n_box else 1.0,
        hit / n_kept if n_kept else 0.0,
    )


def score(results: list[dict], boxes_by_id: dict[str, list[list[float]]]) -> KeptScore:
    rows = []
    for result in results:
        if result.get("kept_mask") is None:
            raise ValueError(f"result {result['id']!r} has no kept_mask: run the engine with --emit-masks and pruning")
        rows.append(kept_iou(result["kept_mask"], result["image_grid_thw"], boxes_by_id[result["id"]]))
    if not rows:
        raise ValueError("no results to score")
    means = [sum(column) / len(rows) for column in zip(*rows)]
    return KeptScore(len(rows), *means)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, type=Path, help="the engine's JSON lines, with --emit-masks")
    parser.add_argument("--manifest", required=True, type=Path, help="JSON lines with id and boxes")
    args = parser.parse_args(argv)
    try:
        manifest = [json.loads(line) for line in args.manifest.read_text().splitlines() if line.strip()]
        results = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        boxes = {str(row["id"]): parse_boxes(row["boxes"]) for row in manifest}
        if len(boxes) != len(manifest):
            raise ValueError(f"{args.manifest} repeats ids")
        unknown = [r["id"] for r in results if r["id"] not in boxes]
        if unknown:
            raise ValueError(f"{len(unknown)} results have ids the manifest lacks, e.g. {unknown[0]!r}")
        result = score(results, boxes)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        parser.exit(2, f"error: {type(e).__name__}: {e}\n")
    print(
        f"{result.rows} rows: kept-vs-box IoU {result.iou:.3f} (keeping everything: {result.box_share:.3f}); "
        f"kept {result.keep_ratio:.1%} of visual tokens; recall {result.recall:.3f}, precision {result.precision:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
