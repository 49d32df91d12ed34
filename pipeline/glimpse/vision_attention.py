"""One attention call per vision block instead of one per window.

Qwen2.5-VL's vision attention attends within segments of the packed sequence (`cu_seqlens`): a
window of 8×8 patches in the windowed blocks, a whole image in the full-attention blocks. With
SDPA or eager it splits q/k/v by segment and calls attention once per segment (a 1280×960 image
has 108 windows: ~3,000 small calls over 28 windowed blocks); only for implementations whose name
says "flash" (`is_flash_attention_requested`) does it make one varlen call with `cu_seq_lens_q`.
No other seam reaches that call without copying the model classes, so the function here is
registered under a name containing "flash": the module then hands it the whole sequence and the
segment bounds, and it runs one SDPA call over the segments padded to the longest one, padding
keys masked out.

torch 2.13's `torch.nn.attention.varlen.varlen_attn` would avoid the padding, but it runs only on
the CUDA flash kernel (fp16/bf16; not on a CPU), hence padded SDPA.

`one_call_per_block` selects the name on the vision tower's config, only while `encode_images`
runs the tower and only in place of SDPA; the decoder keeps its own implementation. It assigns
`_attn_implementation` directly: `set_attn_implementation` would take a "flash" name for a hub
kernel to download.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "flash_varlen_via_padded_sdpa"


def padded_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    cu_seq_lens_q: torch.Tensor,
    max_length_q: int,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention within each segment `cu_seq_lens_q[i]:cu_seq_lens_q[i+1]` of the packed sequence
    (the same bounds for keys), in one SDPA call. query/key/value [1, heads, N, D]; returns
    [N, heads, D] in sequence order, as the flash varlen call does."""
    heads, total, head_dim = query.shape[1:]
    segments = cu_seq_lens_q.numel() - 1
    if segments * max_length_q == total:  # all segments full length: a view, no mask
        mask = None

        def batch(x):  # [1, heads, N, D] -> [S, heads, L, D]
            return x[0].view(heads, segments, max_length_q, head_dim).transpose(0, 1)

    else:
        starts = cu_seq_lens_q[:-1, None].long()
        offsets = torch.arange(max_length_q, device=query.device)
        mask = offsets < cu_seq_lens_q[1:, None] - starts  # [S, L]: real rows of each padded segment
        index = (starts + offsets).clamp(max=total - 1)  # [S, L]; padding reads some row, masked out as a key

        def batch(x):  # [1, heads, N, D] -> [S, heads, L, D]
            return x[0][:, index].transpose(0, 1)

    out = F.scaled_dot_product_attention(
        batch(query),
        batch(key),
        batch(value),
        attn_mask=None if mask is None else mask[:, None, None, :],
        dropout_p=dropout,
        scale=scaling,
    ).transpose(1, 2)  # [S, L, heads, D]
    return (out.reshape(total, heads, head_dim) if mask is None else out[mask]), None


AttentionInterface.register(NAME, padded_varlen_attention)


@contextmanager
def one_call_per_block(visual) -> Iterator[None]:
    """Within the block, `visual` (the vision tower) uses `padded_varlen_attention` in place of
    SDPA. Other implementations are left alone: flash already makes one varlen call per block,
    and eager is chosen on purpose (its products are matmuls that FLOP counters see)."""
    config = visual.config
    previous = config._attn_implementation
    if previous == "sdpa":
        config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
