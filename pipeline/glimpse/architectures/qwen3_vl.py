"""Qwen3-VL (dense): 16-pixel patches, a vision tower with full attention in every block, learned
position embeddings resampled to each image's grid, DeepStack (features from a few vision blocks,
each merged, added at the visual positions after the first decoder layers) and q/k norms in the
decoder's attention. Everything runs on transformers' own `qwen3_vl` modules."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.glimpse.architectures.base import Architecture, VisionCost
from pipeline.glimpse.vision import VisionFeatures, merge_unit_taps
from pipeline.glimpse.vision_attention import one_call_per_block


class Qwen3_VL(Architecture):
    model_type = "qwen3_vl"
    label = "Qwen3-VL"
    qk_norm = True

    def model_class(self):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def encode_images(self, visual, pixel_values, grid_thw, blocks) -> VisionFeatures:
        """The tower sees patches in merge-unit order, which is raster order of merged cells: no
        reordering. Its DeepStack features come back with the image embeddings."""
        unit = visual.config.spatial_merge_size**2
        with merge_unit_taps(visual.blocks, blocks, unit) as captured:
            with one_call_per_block(visual):
                out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw, return_dict=True)
        return VisionFeatures(
            merged=out.pooler_output,
            selected=[captured[i] for i in blocks],
            deepstack=list(out.deepstack_features or []),
        )

    def vision_cost(self, vision) -> FullAttentionVisionCost:
        return FullAttentionVisionCost(
            **FullAttentionVisionCost.sizes(vision),
            position_embeddings=vision.num_position_embeddings,
            deepstack_mergers=len(vision.deepstack_visual_indexes),
        )


@dataclass(frozen=True)
class FullAttentionVisionCost(VisionCost):
    position_embeddings: int  # rows of the learned position table (interpolated: no products)
    deepstack_mergers: int
    mlp_activations: int = 2  # fc1 and its activation

    def image(self, t: int, h: int, w: int) -> float:
        """Patch embedding, blocks (plain two-layer MLP, attention over each frame whole), the
        merger and one more merger per DeepStack block."""
        patches = t * h * w
        per_block = 2 * patches * self.hidden * 4 * self.hidden + 4 * patches * self.hidden * self.intermediate
        attention = self.depth * 4 * self.hidden * t * (h * w) ** 2
        mergers = (1 + self.deepstack_mergers) * self.merger(patches)
        return self.patch_embedding(patches) + self.depth * per_block + attention + mergers

    def params(self) -> int:
        """Patch embedding (with bias), the position table, blocks (qkv and proj with biases, MLP
        with biases, two LayerNorms), the merger (a LayerNorm before the shuffle) and the DeepStack
        mergers (a LayerNorm after it)."""
        h, i = self.hidden, self.intermediate
        block = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        merger = 2 * h + self.merger_projections()
        deepstack = self.deepstack_mergers * (2 * h * self.merge**2 + self.merger_projections())
        return self.patch_inputs * h + h + self.position_embeddings * h + self.depth * block + merger + deepstack
