"""What would otherwise go wrong silently (or crash deep inside) is refused at load, or avoided."""

from __future__ import annotations

import pytest
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pipeline.glimpse.config import GlimpseConfig
from pipeline.glimpse.engine import GlimpseEngine
from pipeline.glimpse.errors import GlimpseConfigError
from pipeline.glimpse.masks import _boolean
from pipeline.glimpse.modules import GlimpseModules
from tests.conftest import FIXTURE, fixture_requests


def test_modules_with_anchor_positions_are_refused_at_load(tmp_path):
    modules = GlimpseModules.load(FIXTURE / "glimpse")
    modules.config.raw["anchor_positions"] = ["tl", "br"]
    modules.save(tmp_path)
    with pytest.raises(GlimpseConfigError, match=r"anchor_positions=\['tl', 'br'\] is not supported"):
        GlimpseEngine.from_pretrained(FIXTURE / "base", tmp_path)


@pytest.mark.parametrize("anchors", [[], None])
def test_empty_or_null_anchor_positions_load(anchors):
    raw = GlimpseModules.load(FIXTURE / "glimpse").config.to_dict()
    assert GlimpseConfig.from_dict({**raw, "anchor_positions": anchors}).raw["anchor_positions"] == anchors


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_flash_attention_in_float32_is_refused_before_loading(dtype):
    options = {"dtype": dtype} if dtype else {}  # float32 is the default
    with pytest.raises(ValueError, match=r"flash_attention_2.*float32"):
        GlimpseEngine.from_pretrained(FIXTURE / "base", attn_implementation="flash_attention_2", **options)


def test_decode_steps_run_sdpa_where_flash_attention_was_asked(fixture_engine, monkeypatch):
    """No flash-attn here: a stand-in registered as flash_attention_2 records its calls (and
    computes with SDPA from the 2-D padding mask). Prefill goes through it; decode steps do not."""
    queries = []

    def stand_in(module, query, key, value, attention_mask, **kwargs):
        queries.append(query.shape[2])
        mask = _boolean(attention_mask.bool(), query.shape[2])
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", stand_in)
    engine = GlimpseEngine.from_pretrained(FIXTURE / "base", FIXTURE / "glimpse")
    engine.text_config._attn_implementation = engine.attn_implementation = "flash_attention_2"
    requests = fixture_requests(max_new_tokens=4)
    results = engine.generate(requests, batch_size=5)
    assert queries and min(queries) > 1  # prefill only: no one-query (decode) call
    assert engine.text_config._attn_implementation == "flash_attention_2"  # restored after decoding
    expected = fixture_engine.generate(requests, batch_size=5)
    assert [r.new_tokens for r in results] == [r.new_tokens for r in expected]
