"""A KV cache the decoder's attention fills through `update`, and that pruning can shorten.

Transformers' attention only calls `update(key, value, layer_idx)`; owning the storage lets the
engine drop columns after the glimpse, drop finished rows, and decode into pre-allocated buffers.
"""

from __future__ import annotations

import torch


class PrunableKVCache:
    """Per decoder layer: keys and values [B, kv_heads, T, head_dim], the first `lengths[l]` columns in use."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        used, new = self.lengths[layer_idx], key.shape[2]
        stored = self.keys[layer_idx]
        if stored is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        elif used + new <= stored.shape[2]:
            stored[:, :, used : used + new] = key
            self.values[layer_idx][:, :, used : used + new] = value
        else:
            self.keys[layer_idx] = torch.cat([stored[:, :, :used], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx][:, :, :used], value], dim=2)
        self.lengths[layer_idx] = used + new
        return self.layer(layer_idx)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        used = self.lengths[layer_idx]
        return self.keys[layer_idx][:, :, :used], self.values[layer_idx][:, :, :used]

    def gather_columns(self, index: torch.Tensor, layers: range) -> None:
        """Keeps, for each row b, the columns index[b] (index [B, T']) of `layers`."""
        for layer_idx in layers:
            k, v = self.layer(layer_idx)
            idx = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self.keys[layer_idx], self.values[layer_idx] = k.gather(2, idx), v.gather(2, idx)
            self.lengths[layer_idx] = index.shape[1]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps only the batch rows `rows` (finished requests leave the batch)."""
        for layer_idx, k in enumerate(self.keys):
            if k is not None:
                self.keys[layer_idx] = k.index_select(0, rows)
                self.values[layer_idx] = self.values[layer_idx].index_select(0, rows)

    @classmethod
    def merged(cls, caches: list[PrunableKVCache], extra: int) -> PrunableKVCache:
        """One cache holding the rows of `caches` in order, each right-aligned (left-padded) to the
        widest, in buffers with room for `extra` more columns: decode then writes in place. The only
        copy of the (pruned) prefill cache; padding columns are zeros, masked out by the caller.

        Consumes `caches`: each layer of theirs is released once copied, so the merge holds at most
        the merged cache and one layer of the inputs, not both caches whole."""
        width = max(c.lengths[0] for c in caches)
        rows = sum(c.keys[0].shape[0] for c in caches)
        out = cls(len(caches[0].keys))
        for layer_idx in range(len(out.keys)):
            k0 = caches[0].keys[layer_idx]
            shape = (rows, k0.shape[1], width + extra, k0.shape[3])  # (B, kv_heads, T, head_dim)
            out.keys[layer_idx], out.values[layer_idx] = k0.new_zeros(shape), k0.new_zeros(shape)
            out.lengths[layer_idx] = width
            start = 0
            for cache in caches:
                k, v = cache.layer(layer_idx)
                end = start + k.shape[0]
                out.keys[layer_idx][start:end, :, width - k.shape[2] : width] = k
                out.values[layer_idx][start:end, :, width - k.shape[2] : width] = v
                cache.keys[layer_idx] = cache.values[layer_idx] = None
                start = end
            del k0, k, v  # the inputs' layer goes now, not when the next layer's views replace these
        return out
