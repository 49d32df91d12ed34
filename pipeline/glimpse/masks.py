"""Attention masks for left-padded batches, in the form each attention implementation takes."""

from __future__ import annotations

import torch


def _boolean(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """[B, 1, q_len, K] True where the query may attend: causal, padding excluded. A padding query
    attends to itself so that no row is empty (an empty row gives NaN in SDPA)."""
    k_len = valid.shape[1]
    q_pos = torch.arange(k_len - q_len, k_len, device=valid.device)[:, None]
    k_pos = torch.arange(k_len, device=valid.device)[None, :]
    allowed = ((k_pos <= q_pos)[None] & valid[:, None, :]) | (k_pos == q_pos)[None]
    return allowed[:, None]


def _additive(valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    allowed = _boolean(valid, q_len)
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


MASK_BUILDERS = {
    "sdpa": lambda valid, q_len, dtype: _boolean(valid, q_len),
    "eager": _additive,
    # flash-attn takes the 2-D padding mask and applies causality itself.
    "flash_attention_2": lambda valid, q_len, dtype: valid.int(),
}


def attention_mask(valid: torch.Tensor, q_len: int, implementation: str, dtype: torch.dtype):
    """valid [B, K] (False at padding) → the mask for the last q_len queries against K keys."""
    try:
        build = MASK_BUILDERS[implementation]
    except KeyError as e:
        raise ValueError(
            f"no attention mask for implementation {implementation!r}; known: {sorted(MASK_BUILDERS)}"
        ) from e
    return build(valid, q_len, dtype)
