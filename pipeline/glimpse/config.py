"""The GlimpsePrune fields of a published `config.json`, typed.

The published `config.json` is the full model config plus the GlimpsePrune fields; we keep the
whole dict (`raw`) so that saving writes back exactly what was loaded, and read only the fields
the method needs into typed attributes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.glimpse.errors import GlimpseConfigError

CONFIG_FILE = "config.json"
MODULES_FILE = "new_modules_gp.pt"

SUPPORTED_FUSER = "AttnFuserV1"


@dataclass
class GlimpseConfig:
    """What GlimpsePrune computes with; field names follow the published config."""

    selected_layers: list[int]
    reduce_layer: int
    le_layers: list[int]
    selected_visual_layers: list[int]
    le_length: int = 1
    le_norm_type: str = "rmsnorm"
    use_attention_logits: bool = True
    attn_fuse_type: str = SUPPORTED_FUSER
    attn_fuse_size: int = 256
    visual_cond_size: int = 512
    attn_fuse_num_heads: int = 4
    attn_fuse_hidden_act: str = "silu"
    attn_fuse_global: bool = True
    deep_supervision: bool = False
    reduce_threshold: float = 0.5
    min_remain_num: int = 1
    max_remain_ratio: float | None = None
    # The model-config fields the modules were built for (hidden size, heads, vision tower):
    # checked against the base model at load time.
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    rms_norm_eps: float = 1e-6
    vision_hidden_size: int = 0
    vision_depth: int = 0
    spatial_merge_size: int = 2
    vision_window_size: int = 112
    vision_patch_size: int = 14
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
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
        if 0 not in self.le_layers:
            raise GlimpseConfigError(f"le_layers {self.le_layers} must include layer 0 (the appended glimpse token)")
        if (self.attn_fuse_size + self.visual_cond_size) % self.attn_fuse_num_heads:
            raise GlimpseConfigError(
                f"attn_fuse_size + visual_cond_size ({self.attn_fuse_size} + {self.visual_cond_size}) "
                f"must be divisible by attn_fuse_num_heads ({self.attn_fuse_num_heads})"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GlimpseConfig:
        """Reads the published layout: GlimpsePrune fields at top level next to the model config."""
        text = raw.get("text_config") or raw
        vision = raw.get("vision_config") or {}
        try:
            return cls(
                selected_layers=list(raw["selected_layers"]),
                reduce_layer=int(raw["reduce_layer"]),
                le_layers=list(raw["le_layers"]),
                selected_visual_layers=list(raw["selected_visual_layers"]),
                le_length=int(raw.get("le_length", 1)),
                le_norm_type=raw.get("le_norm_type", "rmsnorm"),
                use_attention_logits=bool(raw.get("use_attention_logits", True)),
                attn_fuse_type=raw.get("attn_fuse_type", SUPPORTED_FUSER),
                attn_fuse_size=int(raw["attn_fuse_size"]),
                visual_cond_size=int(raw["visual_cond_size"]),
                attn_fuse_num_heads=int(raw["attn_fuse_num_heads"]),
                attn_fuse_hidden_act=raw.get("attn_fuse_hidden_act", "silu"),
                attn_fuse_global=bool(raw.get("attn_fuse_global", True)),
                deep_supervision=bool(raw.get("deep_supervision", False)),
                reduce_threshold=float(raw.get("reduce_threshold", 0.5)),
                min_remain_num=int(raw.get("min_remain_num") or 0),
                max_remain_ratio=raw.get("max_remain_ratio"),
                hidden_size=int(text.get("hidden_size", raw.get("hidden_size", 0))),
                num_hidden_layers=int(text.get("num_hidden_layers", raw.get("num_hidden_layers", 0))),
                num_attention_heads=int(text.get("num_attention_heads", raw.get("num_attention_heads", 0))),
                rms_norm_eps=float(text.get("rms_norm_eps", raw.get("rms_norm_eps", 1e-6))),
                vision_hidden_size=int(vision.get("hidden_size", 0)),
                vision_depth=int(vision.get("depth", 0)),
                spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
                vision_window_size=int(vision.get("window_size", 112)),
                vision_patch_size=int(vision.get("patch_size", 14)),
                raw=dict(raw),
            )
        except KeyError as e:
            raise GlimpseConfigError(f"glimpse config is missing the field {e.args[0]!r}") from e

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
        for name in (
            "selected_layers",
            "reduce_layer",
            "le_layers",
            "selected_visual_layers",
            "le_length",
            "le_norm_type",
            "use_attention_logits",
            "attn_fuse_type",
            "attn_fuse_size",
            "visual_cond_size",
            "attn_fuse_num_heads",
            "attn_fuse_hidden_act",
            "attn_fuse_global",
            "deep_supervision",
            "reduce_threshold",
            "min_remain_num",
            "max_remain_ratio",
        ):
            out[name] = getattr(self, name)
        out.setdefault("le_dropout_prob", 0.0)
        out.setdefault("anchor_positions", [])
        return out

    @property
    def num_attention_features(self) -> int:
        """A: the width of the attention features the VIP reads (selected layers × heads)."""
        return len(self.selected_layers) * self.num_attention_heads
