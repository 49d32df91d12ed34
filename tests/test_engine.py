"""Engine behaviour beyond the fixture: baseline parity with transformers, options, sampling, stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.glimpse.baseline import transformers_generate
from pipeline.glimpse.engine import GlimpseEngine, Request
from pipeline.glimpse.errors import ModuleMismatchError, RequestError
from pipeline.glimpse.modules import GlimpseModules
from pipeline.glimpse.sampling import SamplingParams
from pipeline.glimpse.selection import SelectionOptions
from tests.conftest import FIXTURE, fixture_cases, fixture_requests


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint):
    return GlimpseEngine.from_pretrained(tiny_checkpoint / "base", tiny_checkpoint / "glimpse")


def mixed_requests():
    """Mixed image sizes, one request with two images, different answer lengths."""
    return [
        Request("one", [noise_image(100, 140, 0)], "what is in the picture", SamplingParams(max_new_tokens=12)),
        Request(
            "two", [noise_image(60, 60, 1), noise_image(200, 90, 2)], "describe", SamplingParams(max_new_tokens=10)
        ),
        Request("small", [noise_image(3, 5, 3)], "where is the cat", SamplingParams(max_new_tokens=5)),
    ]


def test_baseline_equals_transformers_generate(tiny_engine):
    requests = mixed_requests()
    ours = tiny_engine.generate(requests, prune=False, batch_size=len(requests))
    for request, result in zip(requests, ours):
        alone = transformers_generate(tiny_engine, [tiny_engine.prepare(request)], request.sampling.max_new_tokens)
        assert result.new_tokens == alone[0], request.id
        assert result.n_visual_kept == result.n_visual_tokens
        assert result.n_prompt_tokens_kept == result.n_prompt_tokens


def test_transformers_generate_batched_matches_the_engine_at_a_fixed_length(tiny_engine):
    requests = [
        Request(r.id, r.images, r.question, SamplingParams(max_new_tokens=7, ignore_eos=True)) for r in mixed_requests()
    ]
    prompts = [tiny_engine.prepare(r) for r in requests]
    ours = tiny_engine.generate_prepared(requests, prompts, prune=False)
    theirs = transformers_generate(tiny_engine, prompts, 7, ignore_eos=True)
    assert [len(t) for t in theirs] == [7, 7, 7]
    assert all(r.n_generated_tokens == 7 and r.finish_reason == "length" for r in ours)
    # min_new_tokens masks EOS in transformers; ignore_eos keeps it: compare up to the first EOS.
    for result, tokens in zip(ours, theirs):
        stop = next((i for i, t in enumerate(result.new_tokens) if t in tiny_engine.eos_token_ids), 7)
        assert result.new_tokens[:stop] == tokens[:stop]


def test_two_images_and_tiny_image_are_answered_the_same_alone_and_batched(tiny_engine):
    requests = mixed_requests()
    batched = tiny_engine.generate(requests, prune=True, emit_masks=True, batch_size=3)
    alone = tiny_engine.generate(requests, prune=True, emit_masks=True, batch_size=1)
    for a, b in zip(batched, alone):
        assert (a.new_tokens, a.kept_mask) == (b.new_tokens, b.kept_mask)
    two = batched[1]
    # 60x60 → 56x56 → 2x2 merged; 200x90 → 196x84 → 7x3 merged.
    assert two.n_visual_tokens == 4 + 21 == len(two.kept_mask)
    small = batched[2]
    assert small.n_visual_tokens >= 1 and small.n_generated_tokens == 5
    assert 1 <= small.n_visual_kept <= small.n_visual_tokens


def test_max_keep_ratio_keeps_the_top_share(fixture_engine):
    c2 = fixture_requests()[1]
    full = fixture_engine.generate([c2], emit_masks=True)[0]
    assert full.n_visual_kept == 92
    fixture_engine.selection = SelectionOptions(threshold=0.5, max_keep_ratio=0.25, min_kept=1)
    try:
        capped = fixture_engine.generate([c2], emit_masks=True)[0]
    finally:
        fixture_engine.selection = SelectionOptions(threshold=0.5, max_keep_ratio=None, min_kept=1)
    assert capped.n_visual_kept == int(0.25 * 99)
    assert all(f >= c for f, c in zip(full.kept_mask, capped.kept_mask))  # the top share of what passed


def test_min_kept_adds_the_most_likely_tokens(fixture_engine):
    c1 = fixture_requests()[0]
    assert fixture_engine.generate([c1], emit_masks=True)[0].n_visual_kept == 1
    fixture_engine.selection = SelectionOptions(threshold=0.5, max_keep_ratio=None, min_kept=5)
    try:
        result = fixture_engine.generate([c1], emit_masks=True)[0]
    finally:
        fixture_engine.selection = SelectionOptions(threshold=0.5, max_keep_ratio=None, min_kept=1)
    assert result.n_visual_kept == 5
    assert result.kept_mask[fixture_cases()[0]["glimpse"]["kept_masks"][0].index(1)] == 1
    assert result.n_prompt_tokens_kept == result.n_prompt_tokens - 64 + 5


def test_modules_for_another_model_fail_at_load_naming_the_mismatch(tiny_checkpoint):
    with pytest.raises(ModuleMismatchError, match="num_hidden_layers: modules were built for 4, the model has 3"):
        GlimpseEngine.from_pretrained(tiny_checkpoint / "base", FIXTURE / "glimpse")


def test_modules_round_trip_in_the_published_format(tmp_path):
    loaded = GlimpseModules.load(FIXTURE / "glimpse")
    loaded.save(tmp_path)
    again = GlimpseModules.load(tmp_path)
    original = torch.load(FIXTURE / "glimpse" / "new_modules_gp.pt", weights_only=True)
    saved = torch.load(tmp_path / "new_modules_gp.pt", weights_only=True)
    assert set(saved) == set(original)
    for name in ("le_proj", "le_norm", "attn_fuser"):
        assert saved[name].keys() == original[name].keys()
        assert all(torch.equal(saved[name][k], original[name][k]) for k in original[name])
    assert torch.equal(again.learnable_embeddings, loaded.learnable_embeddings)
    assert again.config.to_dict() == loaded.config.to_dict()


def test_end_of_sequence_stops_a_row_while_others_go_on(fixture_engine):
    c1, c2 = fixture_requests()[:2]  # greedy answers start [90, ...] and [227, 146, 90, ...]
    saved = fixture_engine.eos_token_ids
    fixture_engine.eos_token_ids = {90}
    try:
        r1, r2 = fixture_engine.generate([c1, c2], batch_size=2)
    finally:
        fixture_engine.eos_token_ids = saved
    assert (r1.new_tokens, r1.finish_reason) == ([90], "stop")
    assert (r2.new_tokens, r2.finish_reason) == ([227, 146, 90], "stop")
    assert r1.batch_decode_s <= r2.batch_decode_s


def test_ignore_eos_generates_exactly_max_new_tokens(fixture_engine):
    c1, c2 = fixture_requests()[:2]
    c1.sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    saved = fixture_engine.eos_token_ids
    fixture_engine.eos_token_ids = {90}  # c1's first greedy token
    try:
        r1, r2 = fixture_engine.generate([c1, c2], batch_size=2)
    finally:
        fixture_engine.eos_token_ids = saved
    assert (r1.new_tokens, r1.finish_reason) == (fixture_cases()[0]["glimpse"]["new_tokens"], "length")
    assert r2.finish_reason == "stop"


def test_chunked_prefill_under_a_cache_budget_answers_the_same(fixture_engine, monkeypatch):
    requests = fixture_requests()
    prompts = [fixture_engine.prepare(r) for r in requests]
    whole = fixture_engine.generate_prepared(requests, prompts, emit_masks=True)
    decode_batches = []
    decode = fixture_engine._decode
    monkeypatch.setattr(
        fixture_engine, "_decode", lambda state, params: decode_batches.append(len(params)) or decode(state, params)
    )
    widest = max(len(p.input_ids) for p in prompts) + 8
    budget = 2 * widest * fixture_engine.costs.kv_bytes_per_token()  # room for two rows at least
    split = fixture_engine.generate_prepared(
        requests, prompts, emit_masks=True, prefill_rows=1, cache_budget_bytes=budget
    )
    assert [(r.id, r.new_tokens, r.kept_mask) for r in split] == [(r.id, r.new_tokens, r.kept_mask) for r in whole]
    assert sum(decode_batches) == 5 and 2 <= max(decode_batches) < 5, decode_batches


def test_max_new_tokens_per_request(fixture_engine):
    requests = fixture_requests()[:2]
    requests[0].sampling = SamplingParams(max_new_tokens=3)
    r1, r2 = fixture_engine.generate(requests, batch_size=2)
    assert r1.new_tokens == fixture_cases()[0]["glimpse"]["new_tokens"][:3] and r1.finish_reason == "length"
    assert r2.new_tokens == fixture_cases()[1]["glimpse"]["new_tokens"]


def test_sampling_is_seeded_per_request(tiny_engine):
    def sampled(seed):
        return Request(
            "s",
            [noise_image(80, 80, 5)],
            "describe",
            SamplingParams(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=seed),
        )

    alone = tiny_engine.generate([sampled(1)])[0].new_tokens
    in_batch = tiny_engine.generate([mixed_requests()[0], sampled(1), sampled(2)], batch_size=3)
    assert in_batch[1].new_tokens == alone
    assert in_batch[2].new_tokens != alone
    greedy = tiny_engine.generate([mixed_requests()[0]])[0]
    assert in_batch[0].new_tokens == greedy.new_tokens


def test_a_request_without_images_is_refused(tiny_engine):
    with pytest.raises(RequestError, match="at least one image"):
        tiny_engine.generate([Request("none", [], "hello")])


def test_an_unresizable_image_is_refused_with_its_size(tiny_engine):
    with pytest.raises(RequestError, match=r"\(3000, 10\)"):
        tiny_engine.generate([Request("thin", [noise_image(10, 3000, 0)], "hello")])


def test_min_and_max_pixels_change_the_grid(tiny_checkpoint):
    small = GlimpseEngine.from_pretrained(tiny_checkpoint / "base", max_pixels=56 * 56)
    prompt = small.prepare(Request("x", [noise_image(400, 400, 0)], "q"))
    assert prompt.image_grid_thw.tolist() == [[1, 4, 4]]


def test_decode_launches_a_step_only_while_a_row_may_need_it(fixture_engine, monkeypatch):
    """Tokens are read one step late; with lengths known, no step past the last needed one runs,
    and an end-of-sequence token costs at most the one step already launched."""
    steps = []
    step = fixture_engine._decode_step
    monkeypatch.setattr(fixture_engine, "_decode_step", lambda *a: steps.append(len(a[0])) or step(*a))
    c1, c2 = fixture_requests()[:2]
    c1.sampling, c2.sampling = SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=6)
    r1, r2 = fixture_engine.generate([c1, c2], batch_size=2)
    assert (r1.n_generated_tokens, r2.n_generated_tokens) == (3, 6)
    assert steps == [2, 2, 2, 1, 1]  # 5 steps after the prefill's token; c1 leaves once finished

    steps.clear()
    monkeypatch.setattr(fixture_engine, "eos_token_ids", {146})  # c2's second greedy token
    (r2,) = fixture_engine.generate([fixture_requests()[1]], batch_size=1)
    assert (r2.new_tokens, r2.finish_reason) == ([227, 146], "stop")
    assert len(steps) == 2  # the step after 146 was launched before 146 was read


def test_pixel_values_travel_in_the_model_dtype_without_changing_answers(fixture_engine):
    """The CPU stage sends pixel values in the model's dtype: float32 exactly; bf16 in half the
    bytes, and a bf16 model answers the same as from float32 (its vision tower casts first)."""
    from pipeline.glimpse.prompts import PreparedPrompt

    requests = fixture_requests()[:3]
    prompts = [fixture_engine.prepare(r) for r in requests]
    as_float32 = [PreparedPrompt.from_columns(p.columns("float32")) for p in prompts]
    as_bf16 = [PreparedPrompt.from_columns(p.columns("bfloat16")) for p in prompts]
    for p, f, b in zip(prompts, as_float32, as_bf16):
        assert torch.equal(f.pixel_values, p.pixel_values) and torch.equal(f.input_ids, p.input_ids)
        assert torch.equal(f.image_grid_thw, p.image_grid_thw)
        assert b.pixel_values.dtype == torch.bfloat16 and torch.equal(b.pixel_values, p.pixel_values.bfloat16())
        assert len(p.columns("bfloat16")["pixel_values"]) * 2 == len(p.columns("float32")["pixel_values"])

    bf16_engine = GlimpseEngine.from_pretrained(FIXTURE / "base", FIXTURE / "glimpse", dtype="bfloat16")
    from_float32 = bf16_engine.generate_prepared(requests, as_float32, emit_masks=True)
    from_bf16 = bf16_engine.generate_prepared(requests, as_bf16, emit_masks=True)
    assert [(r.new_tokens, r.kept_mask) for r in from_bf16] == [(r.new_tokens, r.kept_mask) for r in from_float32]
