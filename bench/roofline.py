"""What the roofline model predicts for the issue's GPU setting, from the cost model alone (no GPU):
Qwen2.5-VL-7B in bf16 on an H100 SXM (prefill at 40% of peak), 256 requests of one 1280×960
image (1,564 visual tokens) and a 20-token question, keep ratio 7.4%.

    python bench/roofline.py [--json out.json]

Prints, for 128 and 512 new tokens: pruned/unpruned images/s at equal batch (64), and under a
24 GiB memory budget each at its largest batch (prefill in chunks of 8 rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from pipeline.glimpse.roofline import H100_SXM, RequestShape, Roofliner  # noqa: E402
from pipeline.synthetic.presets import cost_model  # noqa: E402

GRID = ((1, 68, 92),)  # 1280×960 resized to 1288×952: 68×92 patches, 34×46 merged tokens
VISUAL = 34 * 46
TEMPLATE_TOKENS = 10


def predictions(new_tokens: int, keep_ratio: float = 0.074, budget_gib: float = 24, batch: int = 64) -> dict:
    roof = Roofliner(cost_model("qwen2.5-vl-7b"), H100_SXM)
    prompt = VISUAL + 20 + TEMPLATE_TOKENS
    shape = RequestShape(GRID, prompt, prompt - VISUAL + round(keep_ratio * VISUAL), new_tokens)
    equal = {p: roof.run(shape, 256, batch, p) for p in (True, False)}
    largest = {p: roof.largest_batch(shape, p, budget_gib * 2**30, prefill_rows=8) for p in (True, False)}
    capped = {p: roof.run(shape, 256, largest[p], p) for p in (True, False)}
    return {
        "new_tokens": new_tokens,
        "equal_batch": batch,
        "equal_batch_images_per_s": {"pruned": equal[True].images_per_s, "unpruned": equal[False].images_per_s},
        "equal_batch_pruned_over_unpruned": equal[True].images_per_s / equal[False].images_per_s,
        "budget_gib": budget_gib,
        "largest_batch": {"pruned": largest[True], "unpruned": largest[False]},
        "capped_pruned_over_unpruned": capped[True].images_per_s / capped[False].images_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    figures = [predictions(n) for n in (128, 512)]
    for f in figures:
        print(json.dumps(f))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
