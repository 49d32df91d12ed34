"""The analytic cost model against what torch counts, the split of batch seconds among rows, and the
roofline model of where a run's time goes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.roofline import GRID, TEMPLATE_TOKENS, VISUAL, image_grid
from pipeline.glimpse.accounting import CostModel, share_seconds
from pipeline.glimpse.engine import GlimpseEngine
from pipeline.glimpse.roofline import H100_SXM, RequestShape, Roofliner
from pipeline.synthetic.presets import PRESETS, cost_model
from tests.conftest import FIXTURE, fixture_requests
from tests.test_engine import mixed_requests

# FlopCounterMode does not see inside CPU SDPA kernels; eager attention runs the same products as matmuls.
ATTENTION = "eager"


@pytest.fixture(scope="module")
def counted_engines(tiny_checkpoint, tiny_qwen3_checkpoint):
    def tiny(path):
        return GlimpseEngine.from_pretrained(path / "base", path / "glimpse", attn_implementation=ATTENTION)

    return {
        "fixture": tiny(FIXTURE),
        "tiny": tiny(tiny_checkpoint),
        "qwen3": tiny(tiny_qwen3_checkpoint),
    }


def counted_flops(engine, request, prune):
    prompt = engine.prepare(request)
    with FlopCounterMode(display=False) as counter:
        (result,) = engine.generate_prepared([request], [prompt], prune=prune)
    return counter.get_total_flops(), result


@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("max_new_tokens", [1, 9])
@pytest.mark.parametrize("engine_name", ["fixture", "tiny", "qwen3"])
def test_flops_formula_matches_flop_counter(counted_engines, engine_name, max_new_tokens, prune):
    engine = counted_engines[engine_name]
    requests = fixture_requests(max_new_tokens) if engine_name == "fixture" else mixed_requests()
    for request in requests:
        request.sampling = replace(request.sampling, max_new_tokens=max_new_tokens)
        counted, result = counted_flops(engine, request, prune)
        estimated = result.cost.prefill_flops + result.cost.decode_flops
        assert estimated == pytest.approx(counted, rel=0.01), (request.id, estimated, counted)
        if max_new_tokens == 1:
            assert result.cost.decode_flops == 0


def test_unpruned_estimate_is_what_the_baseline_runs(counted_engines):
    engine = counted_engines["fixture"]
    for request in fixture_requests(6):
        pruned_count, pruned = counted_flops(engine, request, prune=True)
        baseline_count, baseline = counted_flops(engine, request, prune=False)
        if baseline.new_tokens != pruned.new_tokens:
            continue  # decode lengths differ; the estimate assumes the pruned answer's length
        unpruned_estimate = pruned.cost.prefill_flops_unpruned + pruned.cost.decode_flops_unpruned
        assert unpruned_estimate == pytest.approx(baseline_count, rel=0.01), request.id
        assert pruned.cost.kv_cache_bytes_unpruned == baseline.cost.kv_cache_bytes


def test_kv_bytes_follow_kept_tokens(fixture_engine):
    (result,) = fixture_engine.generate(fixture_requests(5)[3:4])
    per_token = 2 * 4 * 2 * 16 * 4  # keys and values, 4 layers, 2 KV heads, head_dim 16, float32
    assert result.n_visual_kept < result.n_visual_tokens
    assert result.cost.kv_cache_bytes == (result.n_prompt_tokens_kept + result.n_generated_tokens - 1) * per_token
    assert result.cost.kv_cache_bytes_unpruned == (result.n_prompt_tokens + result.n_generated_tokens - 1) * per_token


def test_batch_engine_seconds_are_shared_out(fixture_engine):
    requests = fixture_requests(8)
    for request, length in zip(requests, [2, 8, 5, 8, 1]):
        request.sampling = replace(request.sampling, max_new_tokens=length)
    results = fixture_engine.generate(requests, batch_size=len(requests))
    batch_seconds = results[0].batch_prefill_s + max(r.batch_decode_s for r in results)
    assert sum(r.engine_s for r in results) == pytest.approx(batch_seconds)
    assert all(r.engine_s > 0 for r in results)


def test_share_seconds_splits_decode_among_running_rows():
    # Prefill 2 s by FLOPs 1:3; decode: both run until 1 s, then the second alone until 3 s.
    assert share_seconds(2.0, [1.0, 3.0], [1.0, 3.0]) == pytest.approx([0.5 + 0.5, 1.5 + 0.5 + 2.0])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_parameter_count_equals_the_models(family):
    from pipeline.glimpse.architectures import architecture
    from pipeline.synthetic.tiny import TinySpec, build_config, build_model

    specs = [
        TinySpec(architecture=family),
        TinySpec(architecture=family, tie_word_embeddings=True, kv_heads=1),
    ]
    if family == "qwen3_vl":  # head_dim apart from hidden / heads, DeepStack from two blocks
        specs.append(TinySpec(architecture=family, head_dim=24, deepstack_blocks=(1, 3), position_embeddings=36))
    for spec in specs:
        model = build_model(spec, 400)
        assert CostModel(model.config, None, 4).parameters() == sum(p.numel() for p in model.parameters()), spec
    # Qwen3 projections get biases, o's included, with `attention_bias`; Qwen2.5's q, k, v always have them.
    config = build_config(TinySpec(architecture=family), 400)
    config.text_config.attention_bias = True
    model = architecture(family).model_class()._from_config(config)
    assert CostModel(config, None, 4).parameters() == sum(p.numel() for p in model.parameters())
    for name, preset in PRESETS.items():
        if preset.spec.architecture != family:
            continue
        with torch.device("meta"):
            big = build_model(preset.spec, 400, device="meta")
        assert CostModel(big.config, None, 2).parameters() == sum(p.numel() for p in big.parameters()), name


def test_qwen3_vl_8b_preset_has_the_published_size():
    """Qwen3-VL-8B-Instruct has 8.77B parameters (8,767,123,696 counted on the preset's meta-device
    model, which the test above holds the cost model to)."""
    costs = cost_model("qwen3-vl-8b")
    assert costs.parameters() == pytest.approx(8.77e9, rel=0.01)
    assert costs.parameters() == 8_767_123_696
    assert costs.vision.params() == 576_388_336
    assert costs.vip.reduce_layer == 23
    assert image_grid("qwen3-vl-8b") == (1, 60, 80)  # 1280×960 in 16-pixel patches, whole 32-pixel cells
    assert image_grid("qwen2.5-vl-7b") == GRID[0]


def seven_b_roofline():
    """The issue's setting: Qwen2.5-VL-7B, bf16, one 1280×960 image (68×92 patches), a 20-token
    question, keep ratio 7.4%, on an H100."""
    prompt = VISUAL + 20 + TEMPLATE_TOKENS
    return Roofliner(cost_model("qwen2.5-vl-7b"), H100_SXM), VISUAL, prompt, prompt - VISUAL + round(0.074 * VISUAL)


@pytest.mark.parametrize(("new_tokens", "capped_low", "capped_high"), [(128, 1.3, 1.55), (512, 1.6, 1.8)])
def test_roofline_reproduces_the_published_shape_of_the_savings(new_tokens, capped_low, capped_high):
    """Pruning cuts prefill by about a fifth; at equal batch the run is about 1.3x faster; under a
    24 GiB budget the pruned batch is far larger and the gain grows with the answer length."""
    roof, visual, prompt, kept = seven_b_roofline()
    shape = RequestShape(((1, 68, 92),), prompt, kept, new_tokens)
    costs = roof.costs
    shrink = 1 - costs.prefill_flops([(1, 68, 92)], prompt, kept, True) / costs.prefill_flops(
        [(1, 68, 92)], prompt, kept, False
    )
    assert 0.15 < shrink < 0.25
    equal = roof.run(shape, 256, 64, True).images_per_s / roof.run(shape, 256, 64, False).images_per_s
    assert 1.2 < equal < 1.4
    budget = 24 * 2**30
    pruned_batch, unpruned_batch = (roof.largest_batch(shape, p, budget, prefill_rows=8) for p in (True, False))
    capped = (
        roof.run(shape, 256, pruned_batch, True).images_per_s / roof.run(shape, 256, unpruned_batch, False).images_per_s
    )
    assert capped_low < capped < capped_high
    if new_tokens == 128:
        assert pruned_batch >= 5 * unpruned_batch
    # The largest batch fits the budget and one more row does not.
    used = costs.parameters() * 2 + roof.prefill_workspace_bytes(shape, 8)
    per_row = shape.context(True) * costs.kv_bytes_per_token() + costs.text.vocab * 4
    assert used + pruned_batch * per_row <= budget < used + (pruned_batch + 1) * per_row


def test_decode_steps_are_bandwidth_bound_at_small_batch_and_grow_with_the_cache():
    roof, *_ = seven_b_roofline()
    weights_only = roof.costs.decode_weight_bytes() / H100_SXM.hbm_bytes_per_s
    assert roof.decode_step_seconds(1, 0) == pytest.approx(weights_only)
    assert roof.decode_step_seconds(64, 2000) > roof.decode_step_seconds(64, 200) > weights_only
