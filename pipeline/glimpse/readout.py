"""The glimpse token's attention at a selected decoder layer: what the VIP reads.

Shared by inference (the glimpse is the last column) and training (the glimpse sits before the
answer, at a column per row).
"""

from __future__ import annotations

import math

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv


def glimpse_query(layer, hidden: torch.Tensor, rotary, column: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """The query of the token at `column` [B] of each row at `layer`, after RoPE: [B, heads, 1, head_dim].
    `normed`: the layer normalises each head's query (`q_norm`) before RoPE, as Qwen3's do."""
    attn = layer.self_attn
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    x = layer.input_layernorm(hidden[rows, column][:, None])
    query = attn.q_proj(x).view(x.shape[0], 1, -1, attn.head_dim)
    query = (attn.q_norm(query) if normed else query).transpose(1, 2)
    cos, sin = (r[rows, column][:, None] for r in rotary)
    return apply_rotary_pos_emb(query, query, cos, sin)[0]


def glimpse_logits(layer, query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, raw: bool) -> torch.Tensor:
    """q·k/sqrt(d) of the glimpse query against every key (GQA heads repeated): [B, T, heads].
    Raw logits when `raw` (the published modules' use_attention_logits), else log-softmax over
    the keys `visible` [B, T] to the glimpse."""
    attn = layer.self_attn
    keys = repeat_kv(keys, attn.num_key_value_groups)
    scores = (query @ keys.transpose(-1, -2))[:, :, 0] / math.sqrt(attn.head_dim)
    if not raw:
        scores = scores.masked_fill(~visible[:, None], float("-inf")).log_softmax(dim=-1)
    return scores.transpose(1, 2)
