"""The vision tower with one attention call per block (`vision_attention`) and hooks that average
block outputs as they come (`encode_images`) give what transformers' own SDPA tower gives."""

from __future__ import annotations

import weakref
from collections import Counter
from contextlib import contextmanager, nullcontext

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_window_index

from pipeline.glimpse.architectures import architecture
from pipeline.glimpse.vision_attention import NAME, one_call_per_block
from pipeline.synthetic.tiny import TinySpec, build_config
from tests.conftest import fixture_requests

encode_images = architecture("qwen2_5_vl").encode_images

# (t, h, w) in patches. Merged windows are 4×4 cells (window 112, patch 14, merge 2): 10×14 patches
# give 5×7 cells, edge windows of 1 and 3 rows/columns; 16×16 fills its windows; 2×2 is one cell.
ODD_EDGES = [(1, 10, 14)]
SEVERAL = [(1, 10, 14), (1, 22, 18), (1, 2, 2), (1, 16, 16), (1, 6, 30)]
TINY = [(1, 2, 2)]

SPECS = {
    "fixture-shape": TinySpec(),  # 4 blocks, full attention in 1 and 3
    "deeper": TinySpec(vision_depth=8, vision_hidden=64, vision_heads=4, full_attention_blocks=(3, 7)),
}


def vision_tower(spec: TinySpec, window_size: int = 112):
    config = build_config(spec, 400).vision_config
    config.window_size = window_size
    torch.manual_seed(spec.seed)
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation="sdpa").eval()


def inputs(visual, grids):
    grid = torch.tensor(grids)
    torch.manual_seed(1)
    patch = visual.config.in_channels * visual.config.temporal_patch_size * visual.config.patch_size**2
    return torch.randn(int(grid.prod(dim=1).sum()), patch), grid


def reference_features(visual, pixels, grid, blocks, attention=nullcontext):
    """What encode_images gave before: full-resolution block outputs kept by the hooks, averaged
    over merge units after the tower; run under `attention` (default: the tower's own)."""
    captured = {}
    handles = [
        visual.blocks[i].register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i, out)) for i in blocks
    ]
    with attention():
        merged = visual(pixels, grid_thw=grid).pooler_output
    for handle in handles:
        handle.remove()
    config = visual.config
    window_index, _ = get_vision_window_index(grid, config.spatial_merge_size, config.window_size, config.patch_size)
    raster = torch.argsort(window_index)
    unit = config.spatial_merge_size**2
    return merged, [captured[i].view(-1, unit, captured[i].shape[-1]).mean(dim=1)[raster] for i in blocks]


@contextmanager
def counting_attention_calls(visual):
    """Yields a Counter: block index -> SDPA calls made while that block ran."""
    counts, current = Counter(), [None]
    original = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        counts[current[0]] += 1
        return original(*args, **kwargs)

    handles = [
        block.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i))
        for i, block in enumerate(visual.blocks)
    ]
    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        yield counts
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("window_size", [112, 56])
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("grids", [ODD_EDGES, SEVERAL, TINY], ids=["odd-edges", "several", "tiny"])
@torch.inference_mode()
def test_equals_transformers_sdpa_tower(spec, window_size, grids):
    visual = vision_tower(spec, window_size)
    pixels, grid = inputs(visual, grids)
    blocks = list(range(spec.vision_depth))
    merged, selected = reference_features(visual, pixels, grid, blocks)
    ours = encode_images(visual, pixels, grid, blocks)
    torch.testing.assert_close(ours.merged, merged, rtol=0, atol=1e-5)
    for got, want in zip(ours.selected, selected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert visual.config._attn_implementation == "sdpa"  # selected only while encoding


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
@torch.inference_mode()
def test_one_attention_call_per_block(spec):
    visual = vision_tower(spec)
    pixels, grid = inputs(visual, SEVERAL)
    _, cu_windows = get_vision_window_index(grid, 2, 112, 14)
    depth, full = spec.vision_depth, visual.config.fullatt_block_indexes
    segments = {i: len(grid) if i in full else len(cu_windows) - 1 for i in range(depth)}
    with counting_attention_calls(visual) as counts:
        visual(pixels, grid_thw=grid)
    assert counts == segments  # transformers': one call per window or image
    assert all(n > 1 for n in counts.values())
    with counting_attention_calls(visual) as counts:
        encode_images(visual, pixels, grid, [])
    assert counts == {i: 1 for i in range(depth)}


@torch.inference_mode()
def test_fixture_features_unchanged_exactly(fixture_engine):
    """The averaging moved into the hooks changes no bit: same fixture images, same attention."""
    visual = fixture_engine.model.model.visual
    prompts = [fixture_engine.prepare(r) for r in fixture_requests()]
    pixels = torch.cat([p.pixel_values for p in prompts])
    grid = torch.cat([p.image_grid_thw for p in prompts])
    blocks = fixture_engine.modules.config.selected_visual_layers
    merged, selected = reference_features(visual, pixels, grid, blocks, lambda: one_call_per_block(visual))
    ours = encode_images(visual, pixels, grid, blocks)
    assert torch.equal(ours.merged, merged)
    assert all(torch.equal(got, want) for got, want in zip(ours.selected, selected, strict=True))
    merged, selected = reference_features(visual, pixels, grid, blocks)  # transformers' own attention
    torch.testing.assert_close(ours.merged, merged, rtol=0, atol=1e-5)
    for got, want in zip(ours.selected, selected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_hooks_keep_no_full_resolution_output():
    """Block 0's output is gone once block 2 starts: the hook kept only its [N/4, V] average."""
    visual = vision_tower(TinySpec())
    pixels, grid = inputs(visual, SEVERAL)
    seen = {}
    visual.blocks[0].register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", weakref.ref(out)))
    visual.blocks[2].register_forward_pre_hook(lambda _m, _a: seen.__setitem__("alive", seen["out"]() is not None))
    features = encode_images(visual, pixels, grid, [0])
    assert not seen["alive"]
    assert features.selected[0].shape == (pixels.shape[0] // 4, visual.config.hidden_size)


def test_replaces_sdpa_only():
    visual = vision_tower(TinySpec())
    with one_call_per_block(visual):
        assert visual.config._attn_implementation == NAME
    assert visual.config._attn_implementation == "sdpa"
    for other in ("eager", "flash_attention_2"):  # set as from_pretrained would, not run here
        visual.config._attn_implementation = other
        with one_call_per_block(visual):
            assert visual.config._attn_implementation == other
