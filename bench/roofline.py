"""What the roofline model predicts for the issue's GPU setting, from the cost model alone (no GPU):
a preset (default Qwen2.5-VL-7B) in bf16 on an H100 SXM (prefill at 40% of peak), 256 requests of
one 1280×960 image (Qwen2.5-VL: 1,564 visual tokens; Qwen3-VL: 1,200) and a 20-token question,
keep ratio 7.4%.

    python bench/roofline.py [--preset qwen3-vl-8b] [--json out.json]

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
from pipeline.synthetic.presets import PRESETS, cost_model  # noqa: E402

# The Qwen2.5-VL-7B setting, as other benchmarks use it.
GRID = ((1, 68, 92),)  # 1280×960 resized to 1288×952: 68×92 patches, 34×46 merged tokens
VISUAL = 34 * 46
TEMPLATE_TOKENS = 10
WIDTH, HEIGHT = 1280, 960


def image_grid(preset: str, width: int = WIDTH, height: int = HEIGHT) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the preset's image processor gives an image of this size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from pipeline.synthetic.tiny import PATCH_SIZE

    spec = PRESETS[preset].spec
    patch, merge = PATCH_SIZE[spec.architecture], 2
    factor = patch * merge
    resized_h, resized_w = smart_resize(
        height, width, factor, min_pixels=4 * factor**2, max_pixels=PRESETS[preset].max_pixels
    )
    return (1, resized_h // patch, resized_w // patch)


def predictions(
    new_tokens: int,
    keep_ratio: float = 0.074,
    budget_gib: float = 24,
    batch: int = 64,
    preset: str = "qwen2.5-vl-7b",
) -> dict:
    costs = cost_model(preset)
    roof = Roofliner(costs, H100_SXM)
    grid = (image_grid(preset),)
    visual = sum(t * h * w for t, h, w in grid) // costs.vision.merge**2
    prompt = visual + 20 + TEMPLATE_TOKENS
    shape = RequestShape(grid, prompt, prompt - visual + round(keep_ratio * visual), new_tokens)
    prefill = {p: costs.prefill_flops(list(grid), prompt, shape.kept_prompt_tokens, p) for p in (True, False)}
    equal = {p: roof.run(shape, 256, batch, p) for p in (True, False)}
    largest = {p: roof.largest_batch(shape, p, budget_gib * 2**30, prefill_rows=8) for p in (True, False)}
    capped = {p: roof.run(shape, 256, largest[p], p) for p in (True, False)}
    return {
        "preset": preset,
        "new_tokens": new_tokens,
        "visual_tokens": visual,
        "prefill_flops_pruned_over_unpruned": prefill[True] / prefill[False],
        "equal_batch": batch,
        "equal_batch_images_per_s": {"pruned": equal[True].images_per_s, "unpruned": equal[False].images_per_s},
        "equal_batch_pruned_over_unpruned": equal[True].images_per_s / equal[False].images_per_s,
        "budget_gib": budget_gib,
        "largest_batch": {"pruned": largest[True], "unpruned": largest[False]},
        "capped_images_per_s": {"pruned": capped[True].images_per_s, "unpruned": capped[False].images_per_s},
        "capped_pruned_over_unpruned": capped[True].images_per_s / capped[False].images_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen2.5-vl-7b", choices=sorted(PRESETS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    figures = [predictions(n, preset=args.preset) for n in (128, 512)]
    for f in figures:
        print(json.dumps(f))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
