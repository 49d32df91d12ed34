"""What the vision tower gives the engine, and the taps on its blocks that the VIP reads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class VisionFeatures:
    """merged [N, H]: image embeddings for the decoder; selected: one [N, V] per requested block,
    each the block output averaged over its merge unit; deepstack: features [N, H] the decoder adds
    at the visual positions after its first layers, one per layer (Qwen3-VL; empty otherwise).
    N = merged tokens of all images, raster order within each image, images in batch order."""

    merged: torch.Tensor
    selected: list[torch.Tensor]
    deepstack: list[torch.Tensor] = field(default_factory=list)


@contextmanager
def merge_unit_taps(blocks, indices: list[int], unit: int) -> Iterator[dict[int, torch.Tensor]]:
    """While open, the outputs of `blocks[i]` for i in `indices`, each averaged over merge units of
    `unit` consecutive rows as soon as the block is done (holding full-resolution outputs of every
    tapped block until the tower finishes would cost memory): {i: [N, V]}, rows in the order the
    blocks see patches."""
    captured: dict[int, torch.Tensor] = {}

    def keep(index):
        def hook(_module, _inputs, output):
            output = output[0] if isinstance(output, tuple) else output  # [N·unit, V]
            captured[index] = output.view(-1, unit, output.shape[-1]).mean(dim=1)

        return hook

    handles = [blocks[i].register_forward_hook(keep(i)) for i in indices]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
