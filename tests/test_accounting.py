"""The analytic cost model against what torch counts, and the split of batch seconds among rows."""

from __future__ import annotations

from dataclasses import replace

import pytest
from torch.utils.flop_counter import FlopCounterMode

from pipeline.glimpse.accounting import share_seconds
from pipeline.glimpse.engine import GlimpseEngine
from tests.conftest import FIXTURE, fixture_requests
from tests.test_engine import mixed_requests

# FlopCounterMode does not see inside CPU SDPA kernels; eager attention runs the same products as matmuls.
ATTENTION = "eager"


@pytest.fixture(scope="module")
def counted_engines(tiny_checkpoint):
    return {
        "fixture": GlimpseEngine.from_pretrained(FIXTURE / "base", FIXTURE / "glimpse", attn_implementation=ATTENTION),
        "tiny": GlimpseEngine.from_pretrained(
            tiny_checkpoint / "base", tiny_checkpoint / "glimpse", attn_implementation=ATTENTION
        ),
    }


def counted_flops(engine, request, prune):
    prompt = engine.prepare(request)
    with FlopCounterMode(display=False) as counter:
        (result,) = engine.generate_prepared([request], [prompt], prune=prune)
    return counter.get_total_flops(), result


@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("max_new_tokens", [1, 9])
@pytest.mark.parametrize("engine_name", ["fixture", "tiny"])
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
    batch_seconds = results[0].prefill_s + max(r.decode_s for r in results)
    assert sum(r.engine_s for r in results) == pytest.approx(batch_seconds)
    assert all(r.engine_s > 0 for r in results)


def test_share_seconds_splits_decode_among_running_rows():
    # Prefill 2 s by FLOPs 1:3; decode: both run until 1 s, then the second alone until 3 s.
    assert share_seconds(2.0, [1.0, 3.0], [1.0, 3.0]) == pytest.approx([0.5 + 0.5, 1.5 + 0.5 + 2.0])
