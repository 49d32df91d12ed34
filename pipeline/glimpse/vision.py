"""The vision tower run once per batch, also keeping the block outputs the VIP is conditioned on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.vision_utils import get_vision_window_index

from pipeline.glimpse.vision_attention import one_call_per_block


@dataclass
class VisionFeatures:
    """merged [N, H]: image embeddings for the decoder; selected: one [N, V] per requested block,
    each the block output averaged over its 2×2 merge unit. N = merged tokens of all images, raster
    order within each image, images in batch order."""

    merged: torch.Tensor
    selected: list[torch.Tensor]


def encode_images(visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor, blocks: list[int]) -> VisionFeatures:
    """Runs `visual` (Qwen2.5-VL's vision tower) with forward hooks on `blocks`, one attention call
    per block (`one_call_per_block`)."""
    config = visual.config
    unit = config.spatial_merge_size**2
    captured: dict[int, torch.Tensor] = {}

    def keep(index):
        # Averaged as soon as the block is done: a full-resolution output of every hooked block
        # would be held until the tower finishes. A merge unit is `unit` consecutive rows in
        # the window order the blocks see, so the average does not depend on that order.
        def hook(_module, _inputs, output):
            output = output[0] if isinstance(output, tuple) else output  # [N·unit, V]
            captured[index] = output.view(-1, unit, output.shape[-1]).mean(dim=1)  # [N, V]

        return hook

    handles = [visual.blocks[i].register_forward_hook(keep(i)) for i in blocks]
    try:
        with one_call_per_block(visual):
            out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
    finally:
        for handle in handles:
            handle.remove()
    merged = out.pooler_output if hasattr(out, "pooler_output") else out
    # Blocks see patches in window order; the decoder and the VIP use raster order of merged cells.
    window_index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=config.spatial_merge_size,
        window_size=config.window_size,
        patch_size=config.patch_size,
    )
    raster = torch.argsort(window_index.to(merged.device))
    selected = [captured[i][raster] for i in blocks]
    return VisionFeatures(merged=merged, selected=selected)
