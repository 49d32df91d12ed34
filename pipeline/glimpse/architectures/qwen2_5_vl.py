"""Qwen2.5-VL: 14-pixel patches, a windowed vision tower with a few full-attention blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.vision_utils import get_vision_window_index

from pipeline.glimpse.architectures.base import Architecture, VisionCost
from pipeline.glimpse.vision import VisionFeatures, merge_unit_taps
from pipeline.glimpse.vision_attention import one_call_per_block


class Qwen2_5_VL(Architecture):
    model_type = "qwen2_5_vl"
    label = "Qwen2.5-VL"

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def attention_biases(self, text_config) -> tuple[bool, bool]:
        """q, k and v have biases, o has none, whatever the config says."""
        return True, False

    def encode_images(self, visual, pixel_values, grid_thw, blocks) -> VisionFeatures:
        """One attention call per block (`one_call_per_block`). The blocks see patches in window
        order; the decoder and the VIP use raster order of merged cells. A merge unit is `unit`
        consecutive rows in either order, so its average does not depend on the order."""
        config = visual.config
        with merge_unit_taps(visual.blocks, blocks, config.spatial_merge_size**2) as captured:
            with one_call_per_block(visual):
                out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=config.spatial_merge_size,
            window_size=config.window_size,
            patch_size=config.patch_size,
        )
        raster = torch.argsort(window_index.to(merged.device))
        return VisionFeatures(merged=merged, selected=[captured[i][raster] for i in blocks])

    def vision_cost(self, vision) -> WindowedVisionCost:
        return WindowedVisionCost(
            **WindowedVisionCost.sizes(vision),
            window=vision.window_size // vision.spatial_merge_size // vision.patch_size,
            full_attention_blocks=frozenset(vision.fullatt_block_indexes),
        )


@dataclass(frozen=True)
class WindowedVisionCost(VisionCost):
    window: int  # merged cells per window side
    full_attention_blocks: frozenset[int]
    mlp_activations: int = 3  # gate, up and their product

    def image(self, t: int, h: int, w: int) -> float:
        """Patch embedding, blocks (gated MLP; attention per window, or per frame in the
        full-attention blocks) and the merger."""
        patches = t * h * w
        full = t * (h * w) ** 2
        windowed = (
            t * self.merge**4 * _sum_squares(h // self.merge, self.window) * _sum_squares(w // self.merge, self.window)
        )
        per_block = 2 * patches * self.hidden * 4 * self.hidden + 6 * patches * self.hidden * self.intermediate
        attention = sum(
            4 * self.hidden * (full if i in self.full_attention_blocks else windowed) for i in range(self.depth)
        )
        return self.patch_embedding(patches) + self.depth * per_block + attention + self.merger(patches)

    def params(self) -> int:
        """Patch embedding, blocks (qkv and proj with biases, gated MLP with biases, two norms), the
        merger (an RMSNorm before the shuffle)."""
        h, i = self.hidden, self.intermediate
        block = 4 * h * h + 4 * h + 3 * h * i + 2 * i + h + 2 * h
        return self.patch_inputs * h + self.depth * block + h + self.merger_projections()


def _sum_squares(cells: int, window: int) -> int:
    """Σ of squared window extents along one axis: full windows, then the remainder."""
    full, rest = divmod(cells, window)
    return full * window**2 + rest**2
