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

    def reserve(self, extra: int) -> None:
        """Moves every layer into buffers with room for `extra` more columns, so decode writes in place."""
        for layer_idx in range(len(self.keys)):
            k, v = self.layer(layer_idx)
            shape = (*k.shape[:2], k.shape[2] + extra, k.shape[3])
            self.keys[layer_idx] = k.new_empty(shape)
            self.values[layer_idx] = v.new_empty(shape)
            self.keys[layer_idx][:, :, : k.shape[2]] = k
            self.values[layer_idx][:, :, : v.shape[2]] = v

    def nbytes(self) -> int:
        """Bytes of the columns in use, all layers."""
        return sum(k.element_size() * k[:, :, :n].numel() * 2 for k, n in zip(self.keys, self.lengths) if k is not None)
