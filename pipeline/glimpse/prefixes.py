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
    Equal prefixes need equal tokens, grids and pixel values. Rows are bucketed by a signature (the
    prefix's tokens, the grids and a sample of the pixels), and only a row whose signature matches
    is compared whole, so grouping a batch costs about one comparison per shared row."""
    lengths, owners, of_row = [], [], []
    buckets: dict[tuple, list[int]] = {}
    for row, prompt in enumerate(prompts):
        length = prefix_length(prompt, image_token_id)
        key = _signature(prompt, length) if length else ("alone", row)
        match = next(
            (u for u in buckets.get(key, []) if torch.equal(prompts[owners[u]].pixel_values, prompt.pixel_values)),
            None,
        )
        if match is None:
            match = len(owners)
            lengths.append(length)
            owners.append(row)
            buckets.setdefault(key, []).append(match)
        of_row.append(match)
    if len(owners) == len(prompts):
        return None
    return SharedPrefixes(lengths, owners, of_row)


def prefill_chunks(
    prompts: list[PreparedPrompt], image_token_id: int | None, rows_per_chunk: int
) -> list[tuple[list[int], SharedPrefixes | None]]:
    """The rows in prefill order (shortest prompt first, so a chunk pads little; rows that share a
    prefix together, at the place of their shortest), cut into chunks of about `rows_per_chunk`:
    a chunk never cuts a group of sharing rows (it grows to the group's end), and rows that share
    with nobody go in chunks of their own, where the unshared prefill costs them no padding between
    a prefix and a question. Each chunk comes with its rows' sharing (None: no sharing). No
    `image_token_id`: no sharing, chunks by length alone."""
    shared = shared_prefixes(prompts, image_token_id) if image_token_id is not None else None
    group = shared.of_row if shared else list(range(len(prompts)))
    size = {g: group.count(g) for g in set(group)}
    shortest: dict[int, int] = {}
    for row, g in enumerate(group):
        shortest[g] = min(shortest.get(g, len(prompts[row].input_ids)), len(prompts[row].input_ids))
    order = sorted(range(len(prompts)), key=lambda row: (shortest[group[row]], group[row], len(prompts[row].input_ids)))
    chunks: list[tuple[list[int], SharedPrefixes | None]] = []
    for sharing in (True, False):
        rows = [row for row in order if (size[group[row]] > 1) == sharing]
        start = 0
        while start < len(rows):
            end = min(start + rows_per_chunk, len(rows))
            while sharing and end < len(rows) and group[rows[end]] == group[rows[end - 1]]:
                end += 1
            chunk = rows[start:end]
            chunks.append((chunk, _within(shared, chunk) if sharing else None))
            start = end
    return chunks


def _within(shared: SharedPrefixes, rows: list[int]) -> SharedPrefixes:
    """The sharing of `rows` (a chunk of whole groups), renumbered from 0."""
    groups = list(dict.fromkeys(shared.of_row[r] for r in rows))
    local = {g: u for u, g in enumerate(groups)}
    owner = {g: rows.index(next(r for r in rows if shared.of_row[r] == g)) for g in groups}
    return SharedPrefixes(
        [shared.lengths[g] for g in groups], [owner[g] for g in groups], [local[shared.of_row[r]] for r in rows]
    )


def _signature(prompt: PreparedPrompt, length: int) -> tuple:
    """What equal prefixes have in common, cheap to compute: the tokens, the grids, and 4,096
    pixel values spread over the whole image (a whole comparison confirms a match)."""
    pixels = prompt.pixel_values.reshape(-1)
    sample = pixels[:: max(1, pixels.numel() // 4096)].float()
    return (
        prompt.input_ids[:length].numpy().tobytes(),
        prompt.image_grid_thw.numpy().tobytes(),
        prompt.pixel_values.dtype,
        pixels.numel(),
        sample.numpy().tobytes(),
    )
