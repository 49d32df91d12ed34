"""The engine on Qwen3-VL, through its adapter: the unpruned engine is transformers' own model, the
glimpse reads the layers' own attention (q/k norms before rotary), DeepStack features follow the
kept tokens past the pruning layer, and shared image prefixes change nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.glimpse.architectures import architecture, architecture_of
from pipeline.glimpse.baseline import transformers_generate
from pipeline.glimpse.cache import PrunableKVCache
from pipeline.glimpse.engine import GlimpseEngine, Request
from pipeline.glimpse.errors import ModuleMismatchError, UnsupportedModelError
from pipeline.glimpse.inputs import decoder_inputs
from pipeline.glimpse.masks import attention_mask
from pipeline.glimpse.modules import GlimpseModules
from pipeline.glimpse.readout import glimpse_logits
from pipeline.glimpse.sampling import SamplingParams
from pipeline.glimpse.selection import SelectionOptions
from pipeline.synthetic.tiny import build_glimpse_modules
from tests.test_engine import mixed_requests, noise_image

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def engine(tiny_qwen3_checkpoint):
    return GlimpseEngine.from_pretrained(tiny_qwen3_checkpoint / "base", tiny_qwen3_checkpoint / "glimpse")


@pytest.fixture(scope="module")
def early_pruning(engine):
    """Modules that prune after decoder layer 0, so two of the three DeepStack additions (after
    layers 1 and 2) fall on the pruned sequence."""
    return build_glimpse_modules(engine.model.config, seed=5, reduce_layer=0)


def fixed_length(requests):
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return [dataclasses.replace(r, sampling=sampling) for r in requests]


def until_eos(tokens, eos):
    stop = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:stop]


def test_the_adapter_is_chosen_by_the_checkpoint(engine):
    assert engine.architecture is architecture("qwen3_vl")
    assert engine.model.config.vision_config.patch_size == 16
    assert len(engine.model.model.visual.deepstack_merger_list) == 3


def test_unpruned_engine_equals_transformers_generate_batched_with_mixed_sizes(engine):
    """Mixed image sizes (one smaller than a patch) and a two-image request, in one batch: the
    engine's tokens are transformers' `generate`'s on the same left-padded batch, and each
    request's alone."""
    requests = fixed_length(mixed_requests())
    prompts = [engine.prepare(r) for r in requests]
    assert [len(p.image_grid_thw) for p in prompts] == [1, 2, 1]
    ours = engine.generate_prepared(requests, prompts, prune=False)
    batched = transformers_generate(engine, prompts, NEW_TOKENS, ignore_eos=True)
    for request, prompt, result, theirs in zip(requests, prompts, ours, batched):
        alone = transformers_generate(engine, [prompt], NEW_TOKENS, ignore_eos=True)[0]
        # min_new_tokens masks EOS in transformers; ignore_eos keeps it: compare up to the first EOS.
        assert until_eos(result.new_tokens, engine.eos_token_ids) == until_eos(theirs, engine.eos_token_ids)
        assert until_eos(result.new_tokens, engine.eos_token_ids) == until_eos(alone, engine.eos_token_ids)
        assert result.n_visual_kept == result.n_visual_tokens, request.id


def test_pruned_answers_are_the_same_alone_and_batched(engine):
    requests = fixed_length(mixed_requests())
    batched = engine.generate(requests, prune=True, emit_masks=True, batch_size=3)
    alone = engine.generate(requests, prune=True, emit_masks=True, batch_size=1)
    for b, a in zip(batched, alone):
        assert b.new_tokens == a.new_tokens and b.kept_mask == a.kept_mask, b.id
        assert b.pruned and b.n_visual_kept <= b.n_visual_tokens


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_glimpse_query_is_the_query_the_layer_attends_with(family, engine, fixture_engine):
    """exp of the glimpse's log-softmax read-out equals the attention weights the layer's own eager
    attention gives the last token: the same norms and rotary. Qwen3-VL's q_norm left out fails."""
    subject = {"qwen2_5_vl": fixture_engine, "qwen3_vl": engine}[family]
    model = subject.model
    prompt = subject.prepare(Request("q", [noise_image(90, 120, 4)], "where is the cat"))
    inputs = decoder_inputs(model, [prompt], subject.pad_token_id, [])
    layers = model.model.language_model
    rotary = layers.rotary_emb(inputs.embeds, inputs.positions)
    width = inputs.embeds.shape[1]
    captured = {}
    layer = layers.layers[0]
    handle = layer.self_attn.register_forward_hook(lambda _m, _i, out: captured.update(weights=out[1]))
    before = layers.config._attn_implementation
    layers.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            last = torch.tensor([width - 1])
            query = subject.architecture.glimpse_query(layer, inputs.embeds, rotary, last)
            cache = PrunableKVCache(len(layers.layers))
            mask = attention_mask(inputs.valid, width, "eager", inputs.embeds.dtype)
            layer(inputs.embeds, attention_mask=mask, position_embeddings=rotary, past_key_values=cache)
            ours = glimpse_logits(layer, query, cache.layer(0)[0], inputs.valid, raw=False).exp()  # [1, T, heads]
    finally:
        handle.remove()
        layers.config._attn_implementation = before
    theirs = captured["weights"][:, :, -1].transpose(1, 2)  # [1, T, heads]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    if family == "qwen3_vl":  # the same read-out without q_norm is measurably another query
        plain = architecture("qwen2_5_vl").glimpse_query(layer, inputs.embeds, rotary, last)
        assert not torch.allclose(plain, query, atol=1e-3)


def test_deepstack_follows_the_kept_tokens_past_the_pruning_layer(engine, early_pruning):
    """Pruning after layer 0 keeping every visual token is the unpruned model: the DeepStack
    features of layers 1 and 2 land on the right tokens of the shortened sequence."""
    keep_all = GlimpseEngine(engine.model, engine.prompts, early_pruning, SelectionOptions(keep_ratio=1.0))
    requests = fixed_length(mixed_requests())
    unpruned = keep_all.generate(requests, prune=False, batch_size=3)
    pruned = keep_all.generate(requests, prune=True, batch_size=3)
    for a, b in zip(unpruned, pruned):
        assert b.pruned and b.n_visual_kept == b.n_visual_tokens
        assert b.new_tokens == a.new_tokens, b.id
    half = GlimpseEngine(engine.model, engine.prompts, early_pruning, SelectionOptions(keep_ratio=0.5))
    assert all(r.n_visual_kept < r.n_visual_tokens for r in half.generate(requests, prune=True, batch_size=3))


@pytest.mark.parametrize("prune", [True, False])
def test_shared_image_prefixes_change_nothing(engine, early_pruning, prune):
    """Three questions about each of two images and a lone one: the same tokens and kept masks with
    the prefix run once as with every row run whole, DeepStack past the pruning layer included."""
    shared = GlimpseEngine(engine.model, engine.prompts, early_pruning)
    whole = GlimpseEngine(engine.model, engine.prompts, early_pruning)
    whole.share_prefixes = False
    images = [noise_image(96, 128, 7), noise_image(64, 64, 8)]
    questions = ["what is in the picture", "where is the cat", "describe the image in detail"]
    requests = [
        Request(f"{i}-{q}", [image], q, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        for i, image in enumerate(images)
        for q in questions
    ] + [Request("lone", [noise_image(80, 50, 9)], "where is the cat", SamplingParams(max_new_tokens=NEW_TOKENS))]
    prompts = [engine.prepare(r) for r in requests]
    ours = shared.generate_prepared(requests, prompts, prune=prune, emit_masks=True)
    theirs = whole.generate_prepared(requests, prompts, prune=prune, emit_masks=True)
    assert shared.images_encoded == 3 and whole.images_encoded == len(requests)
    assert [r.prefix_shared_by for r in ours] == [3] * 6 + [1]
    for a, b in zip(ours, theirs):
        assert a.new_tokens == b.new_tokens and a.kept_mask == b.kept_mask, a.id


def test_modules_trained_on_another_family_are_refused(engine, tmp_path):
    """The fixture's modules (the release's, for Qwen2.5-VL) have the tiny Qwen3-VL's sizes: only
    the family they were trained on tells them apart."""
    from tests.conftest import FIXTURE

    with pytest.raises(ModuleMismatchError, match="trained on a qwen2_5_vl model, this is a qwen3_vl model"):
        GlimpseModules.load(FIXTURE / "glimpse", engine.model.config)


def test_a_family_without_an_adapter_is_named(engine):
    config = engine.model.config.__class__()
    config.model_type = "llava"
    with pytest.raises(UnsupportedModelError, match="'llava' is not supported; supported: qwen2_5_vl, qwen3_vl"):
        architecture_of(config)
