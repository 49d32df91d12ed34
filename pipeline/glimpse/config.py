"""The GlimpsePrune fields of a published `config.json`, typed.

The published `config.json` is the full model config plus the GlimpsePrune fields; we keep the
whole dict (`raw`) so that saving writes back exactly what was loaded, and read only the fields
the method needs into typed attributes.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from pipeline.glimpse.errors import GlimpseConfigError, ModuleMismatchError

CONFIG_FILE = "config.json"
MODULES_FILE = "new_modules_gp.pt"

SUPPORTED_FUSER = "AttnFuserV1"

# Where a model-config field is published: "text" (`text_config`, falling back to the top level)
# or "vision" (`vision_config`), and under which key.
_MODEL_CONFIG = "model_config"


def _from_model(section: str, key: str, default: Any) -> Any:
    return field(default=default, metadata={_MODEL_CONFIG: (section, key)})


# Checks by field type, strict as JSON types are: "false" is not false, 2.7 is not a layer.
def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(value)
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(value)
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(value)
    return value


def _layer_list(value: Any) -> list[int]:
    """A list of layer indices: whole numbers, none negative."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(value)
    return list(value)


def _zero_if_null(value: Any) -> int:
    return 0 if value is None else _whole(value)


def _optional_number(value: Any) -> float | None:
    return None if value is None else _number(value)


_CONVERTERS = {int: _whole, float: _number, bool: _flag, str: _text, list[int]: _layer_list}
_KINDS = {
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list[int]: "a list of layer indices",
    float | None: "a number or null",
}


@dataclass
class GlimpseConfig:
    """What GlimpsePrune computes with; field names follow the published config.

    Fields without a default must be in the published config."""

    selected_layers: list[int]
    reduce_layer: int
    le_layers: list[int]
    selected_visual_layers: list[int]
    attn_fuse_size: int
    visual_cond_size: int
    attn_fuse_num_heads: int
    le_length: int = 1
    le_norm_type: str = "rmsnorm"
    use_attention_logits: bool = True
    attn_fuse_type: str = SUPPORTED_FUSER
    attn_fuse_hidden_act: str = "silu"
    attn_fuse_global: bool = True
    deep_supervision: bool = False
    reduce_threshold: float = 0.5
    min_remain_num: int = field(default=0, metadata={"convert": _zero_if_null})  # null: no minimum
    max_remain_ratio: float | None = field(default=None, metadata={"convert": _optional_number})
    # The model-config fields the modules were built for (hidden size, heads, vision tower):
    # checked against the base model at load time, and not written back by `to_dict`.
    hidden_size: int = _from_model("text", "hidden_size", 0)
    num_hidden_layers: int = _from_model("text", "num_hidden_layers", 0)
    num_attention_heads: int = _from_model("text", "num_attention_heads", 0)
    rms_norm_eps: float = _from_model("text", "rms_norm_eps", 1e-6)
    vision_hidden_size: int = _from_model("vision", "hidden_size", 0)
    vision_depth: int = _from_model("vision", "depth", 0)
    spatial_merge_size: int = _from_model("vision", "spatial_merge_size", 2)
    vision_window_size: int = _from_model("vision", "window_size", 112)
    vision_patch_size: int = _from_model("vision", "patch_size", 14)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.reduce_layer < 0:
            raise GlimpseConfigError(f"reduce_layer {self.reduce_layer} is negative")
        for name in ("attn_fuse_size", "visual_cond_size", "attn_fuse_num_heads", "spatial_merge_size"):
            if getattr(self, name) < 1:
                raise GlimpseConfigError(f"{name} {getattr(self, name)} must be at least 1")
        if not 0.0 <= self.reduce_threshold <= 1.0:
            raise GlimpseConfigError(f"reduce_threshold {self.reduce_threshold} must be in [0, 1]")
        if self.max_remain_ratio is not None and not 0.0 < self.max_remain_ratio <= 1.0:
            raise GlimpseConfigError(f"max_remain_ratio {self.max_remain_ratio} must be in (0, 1] or null")
        if self.min_remain_num < 0:
            raise GlimpseConfigError(f"min_remain_num {self.min_remain_num} is negative")
        if not self.attn_fuse_global and self.window_cells < 1:
            raise GlimpseConfigError(
                f"a windowed VIP (attn_fuse_global false) needs windows of at least one merged token: "
                f"window_size {self.vision_window_size} px is under {self.spatial_merge_size} × "
                f"{self.vision_patch_size} px"
            )
        _check_activation(self.attn_fuse_hidden_act)
        anchors = self.raw.get("anchor_positions")
        if anchors:
            raise GlimpseConfigError(
                f"anchor_positions={anchors!r} is not supported: GlimpsePrune always keeps those corner visual "
                "tokens ('tl', 'tr', 'bl', 'br'), which this engine does not do, so its answers would differ "
                "silently; use modules whose config has anchor_positions empty or null"
            )
        if self.attn_fuse_type != SUPPORTED_FUSER:
            raise GlimpseConfigError(
                f"attn_fuse_type={self.attn_fuse_type!r} is not supported; expected {SUPPORTED_FUSER!r}"
            )
        if self.le_norm_type != "rmsnorm":
            raise GlimpseConfigError(f"le_norm_type={self.le_norm_type!r} is not supported; expected 'rmsnorm'")
        if self.le_length != 1:
            raise GlimpseConfigError(f"le_length={self.le_length} is not supported; expected 1")
        if not self.selected_layers:
            raise GlimpseConfigError("selected_layers is empty: the glimpse needs at least one layer to read")
        if max(self.selected_layers) > self.reduce_layer:
            raise GlimpseConfigError(
                f"selected_layers {self.selected_layers} must not come after reduce_layer {self.reduce_layer}"
            )
        if not self.selected_visual_layers:
            raise GlimpseConfigError("selected_visual_layers is empty: the VIP needs at least one vision block")
        if 0 not in self.le_layers:
            raise GlimpseConfigError(f"le_layers {self.le_layers} must include layer 0 (the appended glimpse token)")
        if (self.attn_fuse_size + self.visual_cond_size) % self.attn_fuse_num_heads:
            raise GlimpseConfigError(
                f"attn_fuse_size + visual_cond_size ({self.attn_fuse_size} + {self.visual_cond_size}) "
                f"must be divisible by attn_fuse_num_heads ({self.attn_fuse_num_heads})"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GlimpseConfig:
        """Reads the published layout: GlimpsePrune fields at top level next to the model config.
        Raises GlimpseConfigError naming the field that is missing or of the wrong kind."""
        if not isinstance(raw, dict):
            raise GlimpseConfigError(f"a glimpse config is a JSON object, not {type(raw).__name__}")
        text = raw.get("text_config") or raw
        vision = raw.get("vision_config") or {}
        for name, section in (("text_config", text), ("vision_config", vision)):
            if not isinstance(section, dict):
                raise GlimpseConfigError(f"the glimpse config's {name} is not an object")
        types = get_type_hints(cls)
        values = {}
        for f in fields(cls):
            if f.name == "raw":
                continue
            if _MODEL_CONFIG in f.metadata:
                section, key = f.metadata[_MODEL_CONFIG]
                value = text.get(key, raw.get(key, f.default)) if section == "text" else vision.get(key, f.default)
            elif f.default is MISSING and f.name not in raw:
                raise GlimpseConfigError(f"glimpse config is missing the field {f.name!r}")
            else:
                value = raw.get(f.name, f.default)
            convert = f.metadata.get("convert") or _CONVERTERS.get(types[f.name])
            try:
                values[f.name] = convert(value) if convert else value
            except (TypeError, ValueError):
                kind = _KINDS.get(types[f.name], "valid")
                raise GlimpseConfigError(f"the glimpse config's {f.name} is not {kind}: {value!r:.60}") from None
        return cls(**values, raw=dict(raw))

    @classmethod
    def load(cls, directory: str | Path) -> GlimpseConfig:
        path = Path(directory) / CONFIG_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise GlimpseConfigError(f"no glimpse config at {path}") from e
        except json.JSONDecodeError as e:
            raise GlimpseConfigError(f"glimpse config {path} is not valid JSON: {e}") from e
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The published layout: the raw dict with the GlimpsePrune fields as they are now."""
        out = dict(self.raw)
        for f in fields(self):
            if f.name != "raw" and _MODEL_CONFIG not in f.metadata:
                out[f.name] = getattr(self, f.name)
        out.setdefault("le_dropout_prob", 0.0)
        out.setdefault("anchor_positions", [])
        return out

    @property
    def window_cells(self) -> int:
        """A windowed VIP's window side in merged tokens (the vision config's window, in pixels)."""
        if self.vision_patch_size < 1:
            return 0
        return self.vision_window_size // self.spatial_merge_size // self.vision_patch_size

    @property
    def num_attention_features(self) -> int:
        """A: the width of the attention features the VIP reads (selected layers × heads)."""
        return len(self.selected_layers) * self.num_attention_heads


def _check_activation(name: str) -> None:
    """The VIP's activation must be one transformers has (imported here: torch comes with it)."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise GlimpseConfigError(
            f"attn_fuse_hidden_act {name!r:.40} is not an activation transformers has (e.g. 'silu', 'gelu')"
        )


def check_fits(config: GlimpseConfig, model_config) -> None:
    """Raises ModuleMismatchError naming every way the modules do not fit the model (a transformers
    config): the family they were trained on (or, where their config does not name it, the patch
    size), the sizes they were built for, and layer indices within the model's."""
    text = getattr(model_config, "text_config", model_config)
    vision = model_config.vision_config
    problems = []
    built_for = config.raw.get("model_type") or ""  # absent or null: told apart by the patch size below
    if not isinstance(built_for, str):
        problems.append(f"the modules' model_type {built_for!r:.40} is not a string")
    elif (family := built_for.removesuffix("_gp")) not in ("", model_config.model_type):  # the release's "…_gp"
        problems.append(f"trained on a {family} model, this is a {model_config.model_type} model")
    for name, ours, theirs in (
        ("hidden_size", config.hidden_size, text.hidden_size),
        ("num_hidden_layers", config.num_hidden_layers, text.num_hidden_layers),
        ("num_attention_heads", config.num_attention_heads, text.num_attention_heads),
        ("vision hidden_size", config.vision_hidden_size, vision.hidden_size),
        ("vision patch_size", config.vision_patch_size, vision.patch_size),
        ("vision spatial_merge_size", config.spatial_merge_size, vision.spatial_merge_size),
    ):
        if ours != theirs:
            problems.append(f"{name}: modules were built for {ours}, the model has {theirs}")
    layers = text.num_hidden_layers
    for name, values in (("le_layers", config.le_layers), ("selected_layers", config.selected_layers)):
        if max(values) >= layers:
            problems.append(f"{name} {values} reach past the model's {layers} decoder layers")
    if config.reduce_layer >= layers:
        problems.append(f"reduce_layer {config.reduce_layer} is past the model's {layers} decoder layers")
    if max(config.selected_visual_layers) >= vision.depth:
        problems.append(
            f"selected_visual_layers {config.selected_visual_layers} "
            f"reach past the vision tower's {vision.depth} blocks"
        )
    if problems:
        raise ModuleMismatchError("glimpse modules do not fit the model: " + "; ".join(problems))
