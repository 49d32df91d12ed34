"""The seam between the generic engine and one family of vision-language models.

An adapter answers, for its family: how to load a checkpoint; how to run the vision tower while
tapping the blocks the VIP is conditioned on (and any features the decoder takes besides the
image embeddings, such as Qwen3-VL's DeepStack); the 3-D rope positions; the glimpse's query at
a decoder layer; the grid the VIP sees per image; and what the vision tower costs. The prompt
(chat template, image processor) is built by `PromptBuilder` for every family so far.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.glimpse.readout import glimpse_query
from pipeline.glimpse.vision import VisionFeatures


@dataclass(frozen=True)
class VisionCost(ABC):
    """FLOPs (matrix products, 2 per multiply-add) and weights of a vision tower: the sizes every
    family's tower has; subclasses add their own."""

    depth: int
    hidden: int
    intermediate: int
    out_hidden: int
    patch_inputs: int  # channels · temporal patch · patch²
    merge: int  # patches per side of a merged visual token

    @classmethod
    def sizes(cls, vision) -> dict:
        """The shared fields from a vision config."""
        return dict(
            depth=vision.depth,
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            out_hidden=vision.out_hidden_size,
            patch_inputs=vision.in_channels * vision.temporal_patch_size * vision.patch_size**2,
            merge=vision.spatial_merge_size,
        )

    @abstractmethod
    def image(self, t: int, h: int, w: int) -> float:
        """The tower on one image of t × h × w patches, mergers included."""

    @abstractmethod
    def params(self) -> int:
        """Every weight of the tower."""

    def patch_embedding(self, patches: int) -> float:
        return 2 * patches * self.patch_inputs * self.hidden

    def merger(self, patches: int) -> float:
        """One merger: each merge unit's patches concatenated, then two projections."""
        merged_in = self.hidden * self.merge**2
        return 2 * (patches // self.merge**2) * merged_in * (merged_in + self.out_hidden)

    def merger_projections(self) -> int:
        """The weights of one merger's two projections, with biases."""
        merged_in = self.hidden * self.merge**2
        return merged_in * merged_in + merged_in + merged_in * self.out_hidden + self.out_hidden


class Architecture(ABC):
    """One model family. Subclasses name their transformers class and `model_type`."""

    model_type: str
    label: str  # how the README and errors name the family
    qk_norm: bool = False  # the decoder's attention normalises each head's queries and keys before rotary

    @abstractmethod
    def model_class(self):
        """The transformers `…ForConditionalGeneration` class of the family."""

    @abstractmethod
    def encode_images(
        self, visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor, blocks: list[int]
    ) -> VisionFeatures:
        """Runs the vision tower once over the batch's images, keeping `blocks` for the VIP."""

    @abstractmethod
    def vision_cost(self, vision_config) -> VisionCost:
        """The cost model of the family's vision tower."""

    def load(self, model: str | Path, *, dtype: torch.dtype, attn_implementation: str, device: str):
        """The checkpoint's weights, read from safetensors only."""
        return (
            self.model_class()
            .from_pretrained(model, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True)
            .to(device)
        )

    def positions(self, model, ids: torch.Tensor, image: torch.Tensor, grid: torch.Tensor, valid: torch.Tensor):
        """3-D rope positions [3, B, T] of a left-padded batch. transformers 5.x needs
        `mm_token_type_ids` here: without it the positions are silently 1-D."""
        positions, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=image.int(), image_grid_thw=grid, attention_mask=valid.long()
        )
        return positions

    def glimpse_query(self, layer, hidden: torch.Tensor, rotary, column: torch.Tensor) -> torch.Tensor:
        """The query of the token at `column` [B] of each row at decoder `layer`, as the layer's
        attention forms it: [B, heads, 1, head_dim]."""
        return glimpse_query(layer, hidden, rotary, column, normed=self.qk_norm)

    def attention_biases(self, text_config) -> tuple[bool, bool]:
        """Whether the decoder's q/k/v projections, and its o projection, have biases."""
        bias = bool(getattr(text_config, "attention_bias", False))
        return bias, bias

    def vip_grid(self, grid_thw: list[list[int]], merge: int) -> list[tuple[int, int]]:
        """The (rows, columns) of merged visual tokens the VIP lays each image out on."""
        return [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw]
