"""Fresh GlimpsePrune modules for a base model: the published settings, and the release's init.

Published (0-based): Qwen2.5-VL-7B (28 layers) reads and prunes at layer 18, Qwen2.5-VL-3B (36
layers) at 23; both condition the VIP on vision blocks 31, 23, 15, 7, with attn_fuse_size 256,
visual_cond_size 512 and 4 VIP heads. Other sizes get the same proportions.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.glimpse.config import GlimpseConfig
from pipeline.glimpse.modules import GlimpseModules

PUBLISHED_LAYER = {(28, 3584): 18, (36, 2048): 23}  # (decoder layers, hidden size) → selected layer
VIP_CONDITION_BLOCKS = 4


def default_layer(layers: int, hidden: int) -> int:
    """The published layer for a published size, else the same depth (9/14 of the way), leaving
    at least one layer after it to run on the pruned sequence."""
    published = PUBLISHED_LAYER.get((layers, hidden))
    if published is not None:
        return published
    return max(0, min(round(layers * 9 / 14), layers - 2))


def default_vision_blocks(depth: int) -> list[int]:
    """The last block and evenly spaced ones before it: 31, 23, 15, 7 for a 32-block tower."""
    step = depth / VIP_CONDITION_BLOCKS
    return sorted({max(0, round(depth - i * step) - 1) for i in range(VIP_CONDITION_BLOCKS)}, reverse=True)


def glimpse_config(
    model_config,
    *,
    layer: int | None = None,
    read_layers: list[int] | None = None,
    vision_blocks: list[int] | None = None,
    fuse_size: int = 256,
    cond_size: int = 512,
    vip_heads: int = 4,
    threshold: float = 0.5,
) -> GlimpseConfig:
    """The published module config for `model_config` (the model config plus GlimpsePrune's
    fields), with the pruning layer, the layers the glimpse is read at (default: the pruning
    layer), the VIP's vision blocks and sizes overridable."""
    text = getattr(model_config, "text_config", model_config)
    layer = default_layer(text.num_hidden_layers, text.hidden_size) if layer is None else layer
    raw = model_config.to_dict()
    raw.update(
        selected_layers=read_layers or [layer],
        reduce_layer=layer,
        le_layers=list(range(text.num_hidden_layers)),
        selected_visual_layers=vision_blocks or default_vision_blocks(model_config.vision_config.depth),
        le_length=1,
        le_norm_type="rmsnorm",
        use_attention_logits=True,
        attn_fuse_type="AttnFuserV1",
        attn_fuse_size=fuse_size,
        visual_cond_size=cond_size,
        attn_fuse_num_heads=vip_heads,
        attn_fuse_hidden_act="silu",
        attn_fuse_global=True,
        deep_supervision=False,
        reduce_threshold=threshold,
        min_remain_num=1,
        max_remain_ratio=None,
        le_dropout_prob=0.0,
        anchor_positions=[],
    )
    return GlimpseConfig.from_dict(raw)


def fresh_modules(config: GlimpseConfig, seed: int) -> GlimpseModules:
    """Modules initialised as the release's `_init_weights` does: glimpse embeddings ~ N(0, 0.02),
    every norm weight 1, every projection's weight Xavier-uniform and its bias 0."""
    generator = torch.Generator().manual_seed(seed)
    modules = GlimpseModules(config)
    with torch.no_grad():
        modules.learnable_embeddings.normal_(0.0, 0.02, generator=generator)
        for name, param in modules.named_parameters():
            if name == "learnable_embeddings":
                continue
            if "norm" in name:
                nn.init.ones_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.xavier_uniform_(param, generator=generator)
    return modules
