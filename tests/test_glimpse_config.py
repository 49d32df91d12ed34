"""Reading and writing back a published GlimpsePrune `config.json`."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.glimpse.config import GlimpseConfig
from pipeline.glimpse.errors import GlimpseConfigError
from tests.conftest import FIXTURE

REQUIRED = [
    "selected_layers",
    "reduce_layer",
    "le_layers",
    "selected_visual_layers",
    "attn_fuse_size",
    "visual_cond_size",
    "attn_fuse_num_heads",
]


def published() -> dict:
    return json.loads((FIXTURE / "glimpse" / "config.json").read_text())


def test_a_published_config_round_trips():
    raw = published()
    config = GlimpseConfig.from_dict(raw)
    assert config.to_dict() == raw
    assert (config.selected_layers, config.reduce_layer, config.selected_visual_layers) == ([2], 2, [3, 1])
    assert (config.attn_fuse_size, config.visual_cond_size, config.attn_fuse_num_heads) == (32, 32, 4)
    assert (config.min_remain_num, config.max_remain_ratio) == (1, None)
    # Read from the model config (the top level, and vision_config), not written back.
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 4, 4)
    assert config.rms_norm_eps == 1e-05
    assert (config.vision_hidden_size, config.vision_depth, config.vision_window_size) == (32, 4, 112)


def test_optional_fields_take_their_defaults_and_are_written_back():
    raw = published()
    for name in ("le_length", "reduce_threshold", "min_remain_num", "max_remain_ratio", "le_dropout_prob"):
        del raw[name]
    defaults = {"le_length": 1, "reduce_threshold": 0.5, "min_remain_num": 0, "max_remain_ratio": None}
    assert GlimpseConfig.from_dict(raw).to_dict() == {**raw, **defaults, "le_dropout_prob": 0.0}
    assert GlimpseConfig.from_dict({**raw, "min_remain_num": None}).min_remain_num == 0


@pytest.mark.parametrize("name", REQUIRED)
def test_a_missing_required_field_is_named(name):
    raw = published()
    del raw[name]
    with pytest.raises(GlimpseConfigError, match=f"missing the field '{name}'"):
        GlimpseConfig.from_dict(raw)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: [], "a glimpse config is a JSON object, not list"),
        (lambda raw: raw | {"le_layers": None}, "le_layers is not a list of layer indices: None"),
        (lambda raw: raw | {"selected_layers": "abc"}, "selected_layers is not a list of layer indices: 'abc'"),
        (lambda raw: raw | {"selected_visual_layers": [-1]}, "selected_visual_layers is not a list of layer indices"),
        (lambda raw: raw | {"selected_visual_layers": []}, "selected_visual_layers is empty"),
        (lambda raw: raw | {"reduce_layer": -1, "selected_layers": [0]}, "reduce_layer -1 is negative"),
        (lambda raw: raw | {"attn_fuse_size": "wide"}, "attn_fuse_size is not a whole number: 'wide'"),
        (lambda raw: raw | {"vision_config": "x"}, "the glimpse config's vision_config is not an object"),
        (lambda raw: raw | {"attn_fuse_num_heads": 0}, "attn_fuse_num_heads 0 must be at least 1"),
        (lambda raw: raw | {"attn_fuse_size": -32}, "attn_fuse_size -32 must be at least 1"),
        (lambda raw: raw | {"reduce_threshold": float("nan")}, "reduce_threshold nan must be in [0, 1]"),
        (lambda raw: raw | {"reduce_threshold": -5}, "reduce_threshold -5.0 must be in [0, 1]"),
        (lambda raw: raw | {"max_remain_ratio": "abc"}, "max_remain_ratio is not a number or null: 'abc'"),
        (lambda raw: raw | {"max_remain_ratio": -1}, "max_remain_ratio -1.0 must be in (0, 1] or null"),
        (lambda raw: raw | {"min_remain_num": -3}, "min_remain_num -3 is negative"),
        (lambda raw: raw | {"attn_fuse_global": "false"}, "attn_fuse_global is not true or false: 'false'"),
        (lambda raw: raw | {"reduce_layer": 2.7}, "reduce_layer is not a whole number: 2.7"),
        (lambda raw: raw | {"attn_fuse_hidden_act": None}, "attn_fuse_hidden_act is not a string: None"),
    ],
)
def test_a_malformed_config_is_refused_naming_the_field(change, message):
    """A config the engine could not run is a GlimpseConfigError at load, naming what is wrong,
    not a TypeError deep inside the model."""
    raw = json.loads((FIXTURE / "glimpse" / "config.json").read_text())
    with pytest.raises(GlimpseConfigError, match=re.escape(message)):
        GlimpseConfig.from_dict(change(raw))
