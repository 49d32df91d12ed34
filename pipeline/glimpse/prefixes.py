"""Rows that share an image prefix: the same images and the same tokens up to the last image token.

Attention is causal and the question comes after the images, so everything up to the end of the
image (the vision tower, every layer's keys and values of the system prompt and image tokens) is
the same for every question about it. The engine prefills such a prefix once per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.glimpse.prompts import PreparedPrompt


@dataclass(frozen=True)
class SharedPrefixes:
    """A chunk's rows grouped by prefix. Per prefix: its length in tokens and the row it is read
    from; per row: the index of its prefix."""

    lengths: list[int]
    owners: list[int]
    of_row: list[int]

    def sharing(self) -> list[tuple[int, int]]:
        """Per row: (its prefix's tokens, how many rows of the chunk share that prefix)."""
        counts = [self.of_row.count(u) for u in range(len(self.lengths))]
        return [(self.lengths[u], counts[u]) for u in self.of_row]


def prefix_length(prompt: PreparedPrompt, image_token_id: int) -> int:
    """Tokens up to and including the last image token; 0 for a prompt without images."""
    where = (prompt.input_ids == image_token_id).nonzero()
    return int(where[-1]) + 1 if len(where) else 0


def shared_prefixes(prompts: list[PreparedPrompt], image_token_id: int) -> SharedPrefixes | None:
    """The rows grouped by the prefix they share; None when no two rows share one (nothing to gain).
    Equal prefixes need equal tokens, grids and pixel values: two images of one size differ only there."""
    lengths, owners, of_row = [], [], []
    for row, prompt in enumerate(prompts):
        length = prefix_length(prompt, image_token_id)
        match = next(
            (
                u
                for u, owner in enumerate(owners)
                if length and _same_prefix(prompts[owner], prompt, lengths[u], length)
            ),
            None,
        )
        if match is None:
            match = len(owners)
            lengths.append(length)
            owners.append(row)
        of_row.append(match)
    if len(owners) == len(prompts):
        return None
    return SharedPrefixes(lengths, owners, of_row)


def prefill_order(prompts: list[PreparedPrompt], image_token_id: int | None) -> list[int]:
    """Rows shortest prompt first (a chunk pads little), the rows that share an image prefix kept
    together at the place of their shortest, so that they land in one prefill chunk. No
    `image_token_id`: no sharing, by length alone."""
    shared = shared_prefixes(prompts, image_token_id) if image_token_id is not None else None
    group = shared.of_row if shared else list(range(len(prompts)))
    shortest: dict[int, int] = {}
    for row, g in enumerate(group):
        shortest[g] = min(shortest.get(g, len(prompts[row].input_ids)), len(prompts[row].input_ids))
    return sorted(range(len(prompts)), key=lambda row: (shortest[group[row]], group[row], len(prompts[row].input_ids)))


def _same_prefix(owner: PreparedPrompt, prompt: PreparedPrompt, owner_length: int, length: int) -> bool:
    return (
        owner_length == length
        and torch.equal(owner.input_ids[:length], prompt.input_ids[:length])
        and torch.equal(owner.image_grid_thw, prompt.image_grid_thw)
        and owner.pixel_values.dtype == prompt.pixel_values.dtype
        and torch.equal(owner.pixel_values, prompt.pixel_values)
    )
