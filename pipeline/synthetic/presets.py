"""Real-size Qwen2.5-VL and Qwen3-VL shapes with random weights, for benchmarks where no checkpoint
can be downloaded: the arithmetic, memory and timings of the real model, meaningless text.

Sizes are those of the published configs; the glimpse modules use the published GlimpsePrune
settings for that model (pruning layer, VIP vision blocks, VIP widths), or the recipe's defaults
where none are published (Qwen3-VL).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.synthetic.tiny import TinySpec, build_glimpse_modules, build_model
from pipeline.training.recipe import default_layer, default_vision_blocks


@dataclass(frozen=True)
class Preset:
    spec: TinySpec
    reduce_layer: int
    selected_visual_layers: list[int]
    max_pixels: int = 12845056  # the image processor's limit: Qwen2.5-VL's 12845056, Qwen3-VL's 16777216


# Both sizes share Qwen2.5-VL's vision tower.
QWEN2_5_VL_VISION = dict(
    vision_depth=32,
    vision_hidden=1280,
    vision_heads=16,
    vision_intermediate=3420,
    full_attention_blocks=(7, 15, 23, 31),
)

PRESETS = {
    "qwen2.5-vl-7b": Preset(
        TinySpec(
            layers=28,
            hidden=3584,
            heads=28,
            kv_heads=4,
            intermediate=18944,
            **QWEN2_5_VL_VISION,
            embedding_rows=152064,
            rope_theta=1e6,
        ),
        reduce_layer=18,
        selected_visual_layers=[31, 23, 15, 7],
    ),
    "qwen2.5-vl-3b": Preset(
        TinySpec(
            layers=36,
            hidden=2048,
            heads=16,
            kv_heads=2,
            intermediate=11008,
            **QWEN2_5_VL_VISION,
            embedding_rows=151936,
            rope_theta=1e6,
            tie_word_embeddings=True,
        ),
        reduce_layer=23,
        selected_visual_layers=[31, 23, 15, 7],
    ),
    # Qwen3-VL-8B-Instruct: 16-pixel patches, a 27-block full-attention tower with learned
    # position embeddings (48 × 48), DeepStack from vision blocks 8, 16, 24, q/k norms, untied
    # embeddings. No GlimpsePrune modules are published for Qwen3-VL: the recipe's defaults
    # (pruning at layer round(36 · 9/14) = 23, VIP on vision blocks 26, 19, 13, 6) at the
    # published VIP widths (fuse 256, cond 512).
    "qwen3-vl-8b": Preset(
        TinySpec(
            architecture="qwen3_vl",
            layers=36,
            hidden=4096,
            heads=32,
            kv_heads=8,
            head_dim=128,
            intermediate=12288,
            vision_depth=27,
            vision_hidden=1152,
            vision_heads=16,
            vision_intermediate=4304,
            position_embeddings=2304,
            deepstack_blocks=(8, 16, 24),
            embedding_rows=151936,
            rope_theta=5e6,
        ),
        reduce_layer=default_layer(36, 4096),
        selected_visual_layers=default_vision_blocks(27),
        max_pixels=16777216,
    ),
}


def build_engine(name: str, *, dtype, device, attn_implementation: str = "sdpa", layers: int | None = None):
    """A GlimpseEngine of preset `name` with random weights, made on `device`; the tiny model's
    tokenizer and image processor (any ids below the vocabulary size will do). `layers` shortens
    the decoder (and moves the pruning layer proportionally), for trying the path on a CPU."""
    from dataclasses import replace

    from pipeline.glimpse.engine import GlimpseEngine
    from pipeline.glimpse.prompts import PromptBuilder
    from pipeline.synthetic.tiny import build_image_processor, build_tokenizer

    preset = PRESETS[name]
    spec, reduce_layer = preset.spec, preset.reduce_layer
    if layers is not None:
        reduce_layer = min(layers - 1, reduce_layer * layers // spec.layers)
        spec = replace(spec, layers=layers)
    tokenizer = build_tokenizer(TinySpec().vocab_size)
    model = build_model(spec, len(tokenizer), dtype=dtype, device=device, attn_implementation=attn_implementation)
    modules = build_glimpse_modules(
        model.config,
        spec.seed,
        reduce_layer=reduce_layer,
        selected_visual_layers=preset.selected_visual_layers,
        fuse_size=256,
        cond_size=512,
    )
    # The family's own pixel limit: a 1280×960 image keeps its size (rounded to whole merged cells).
    prompts = PromptBuilder(
        tokenizer,
        build_image_processor(preset.max_pixels, architecture=spec.architecture),
        model.config.image_token_id,
        model.config.vision_config.spatial_merge_size,
    )
    return GlimpseEngine(model, prompts, modules)


def cost_model(name: str, dtype_bytes: int = 2):
    """The cost model of preset `name` with its glimpse modules, built without allocating weights."""
    import torch

    from pipeline.glimpse.accounting import CostModel
    from pipeline.synthetic.tiny import build_config

    preset = PRESETS[name]
    config = build_config(preset.spec, TinySpec().vocab_size)
    with torch.device("meta"):
        modules = build_glimpse_modules(
            config, 0, preset.reduce_layer, preset.selected_visual_layers, fuse_size=256, cond_size=512
        )
    return CostModel(config, modules.config, dtype_bytes)
