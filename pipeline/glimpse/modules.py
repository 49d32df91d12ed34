"""GlimpsePrune's trained modules: glimpse embeddings and the VIP, in the published format.

`new_modules_gp.pt` holds four entries (`learnable_embeddings`, `le_proj`, `le_norm`,
`attn_fuser`); the attribute names below are chosen so that `state_dict()` keys match them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLRMSNorm,
    apply_rotary_pos_emb_vision,
)

from pipeline.glimpse.config import CONFIG_FILE, MODULES_FILE, GlimpseConfig, check_fits
from pipeline.glimpse.errors import GlimpseConfigError, ModuleMismatchError

VIP_NORM_EPS = 1e-6
VIP_ROPE_THETA = 10000.0


class VipAttention(nn.Module):
    """Self-attention over visual tokens whose queries and keys also see a vision condition."""

    def __init__(self, fuse_size: int, cond_size: int, num_heads: int) -> None:
        super().__init__()
        qk_size = fuse_size + cond_size
        self.num_heads = num_heads
        self.q_proj = nn.Linear(qk_size, qk_size, bias=False)
        self.k_proj = nn.Linear(qk_size, qk_size, bias=False)
        self.v_proj = nn.Linear(fuse_size, fuse_size, bias=False)
        self.o_proj = nn.Linear(fuse_size, fuse_size, bias=False)

    def forward(self, x, cond, rotary, segments):
        """x [N, F], cond [N, C], rotary = (cos, sin) each [N, d]; segments: (start, end, mask|None)."""
        n = x.shape[0]
        qk_in = torch.cat([x, cond], dim=-1)
        q = self.q_proj(qk_in).view(n, self.num_heads, -1)  # (N, heads, d)
        k = self.k_proj(qk_in).view(n, self.num_heads, -1)
        v = self.v_proj(x).view(n, self.num_heads, -1)  # (N, heads, F/heads)
        q, k = apply_rotary_pos_emb_vision(q, k, *rotary)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, N, ·)
        out = torch.cat(
            [
                F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], attn_mask=mask)[0]
                for a, b, mask in segments
            ],
            dim=1,
        )  # (heads, N, F/heads)
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


class VipMLP(nn.Module):
    def __init__(self, size: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(size, 2 * size)
        self.up_proj = nn.Linear(size, 2 * size)
        self.down_proj = nn.Linear(2 * size, size)
        self.act_fn = ACT2FN[act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class VipLayer(nn.Module):
    def __init__(self, fuse_size: int, cond_size: int, num_heads: int, act: str) -> None:
        super().__init__()
        self.norm1 = Qwen2_5_VLRMSNorm(fuse_size, eps=VIP_NORM_EPS)
        self.norm2 = Qwen2_5_VLRMSNorm(fuse_size, eps=VIP_NORM_EPS)
        self.attn = VipAttention(fuse_size, cond_size, num_heads)
        self.mlp = VipMLP(fuse_size, act)

    def forward(self, x, cond, rotary, segments):
        x = x + self.attn(self.norm1(x), cond, rotary, segments)
        return x + self.mlp(self.norm2(x))


class VisualTokenImportancePredictor(nn.Module):
    """The VIP (published name `AttnFuserV1`): glimpse attention + vision features → keep logits."""

    def __init__(self, config: GlimpseConfig) -> None:
        super().__init__()
        fuse, cond, heads = config.attn_fuse_size, config.visual_cond_size, config.attn_fuse_num_heads
        n = len(config.selected_visual_layers)
        self.config = config
        self.attn_in_proj = nn.Linear(config.num_attention_features, fuse)
        self.cond_in_projs = nn.ModuleList(nn.Linear(config.vision_hidden_size, cond) for _ in range(n))
        self.layers = nn.ModuleList(VipLayer(fuse, cond, heads, config.attn_fuse_hidden_act) for _ in range(n))
        # Only the last layer has an output head unless the modules were trained with deep supervision;
        # Identity keeps the published state-dict indices (`attn_out_projs.{n-1}`).
        self.attn_out_projs = nn.ModuleList(
            nn.Linear(fuse, 1) if (i == n - 1 or config.deep_supervision) else nn.Identity() for i in range(n)
        )
        head_dim = (fuse + cond) // heads
        inv_freq = 1.0 / (VIP_ROPE_THETA ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, grid_hw: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D rotary angles of each merged cell, raster order per image: cos, sin [N, head_dim].

        Computed in `inv_freq`'s dtype, which is the modules' dtype once they are moved to the
        model's: the release (model_gp.py, `AttnFuserV1.rot_pos_emb` with transformers 4.51's
        `Qwen2_5_VisionRotaryEmbedding`) casts its VIP, buffer included, to the model's dtype and
        takes `torch.outer(arange(max_hw, dtype=inv_freq.dtype), inv_freq)` and `emb.cos()` there.
        In bf16 that rounds each angle (and cos/sin) to bf16, and the modules were trained on
        those angles; in fp32 it is the same arithmetic as before."""
        rows, cols = [], []
        for h, w in grid_hw:
            rows.append(torch.arange(h, device=device).repeat_interleave(w))
            cols.append(torch.arange(w, device=device).repeat(h))
        inv_freq = self.inv_freq.to(device)  # (head_dim/4,)
        pos = [torch.cat(axis)[:, None].to(inv_freq.dtype) for axis in (rows, cols)]  # 2 × (N, 1)
        angles = torch.cat([p * inv_freq for p in pos], dim=-1)  # (N, head_dim/2), rows' angles then cols'
        emb = torch.cat([angles, angles], dim=-1)  # (N, head_dim)
        return emb.cos(), emb.sin()

    def segments(self, grid_hw: list[tuple[int, int]], device) -> list[tuple[int, int, torch.Tensor | None]]:
        """Attention groups: each image whole (global), or each image's vision windows (local)."""
        out, start = [], 0
        win = self.config.window_cells
        for h, w in grid_hw:
            mask = None
            if not self.config.attn_fuse_global:
                rows = torch.arange(h, device=device).repeat_interleave(w) // win
                cols = torch.arange(w, device=device).repeat(h) // win
                window = rows * (w // win + 1) + cols
                mask = window[:, None] == window[None, :]
            out.append((start, start + h * w, mask))
            start += h * w
        return out

    def forward(self, attn_feats, vis_feats, grid_hw):
        """attn_feats [N, A], vis_feats n × [N, V], grid_hw merged (h, w) per image → logits [N]."""
        return self.supervised_outputs(attn_feats, vis_feats, grid_hw)[-1]

    def supervised_outputs(self, attn_feats, vis_feats, grid_hw) -> list[torch.Tensor]:
        """Logits [N] after each layer with an output head: the last layer's, and with
        deep_supervision every layer's. Training puts its localisation loss on each."""
        x = self.attn_in_proj(attn_feats)  # (N, F)
        rotary = self.rotary(grid_hw, x.device)
        segments = self.segments(grid_hw, x.device)
        outputs = []
        for cond_proj, layer, head, feats in zip(self.cond_in_projs, self.layers, self.attn_out_projs, vis_feats):
            x = layer(x, cond_proj(feats), rotary, segments)
            if not isinstance(head, nn.Identity):
                outputs.append(head(x).squeeze(-1))
        return outputs


class GlimpseModules(nn.Module):
    """Glimpse embeddings (one per layer in le_layers) and the VIP."""

    def __init__(self, config: GlimpseConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.learnable_embeddings = nn.Parameter(torch.zeros(len(config.le_layers), config.le_length, hidden))
        self.le_proj = nn.Linear(hidden, hidden)
        self.le_norm = Qwen2_5_VLRMSNorm(hidden, eps=config.rms_norm_eps)
        self.attn_fuser = VisualTokenImportancePredictor(config)

    def glimpse_embeddings(self) -> dict[int, torch.Tensor]:
        """g_l = le_norm(le_proj(e_l)) for each layer l in le_layers: {layer: [H]}."""
        return {
            layer: self.le_norm(self.le_proj(self.learnable_embeddings[j]))[0]
            for j, layer in enumerate(self.config.le_layers)
        }

    def published_state(self) -> dict[str, Any]:
        return {
            "learnable_embeddings": self.learnable_embeddings.detach().cpu(),
            "le_proj": {k: v.cpu() for k, v in self.le_proj.state_dict().items()},
            "le_norm": {k: v.cpu() for k, v in self.le_norm.state_dict().items()},
            "attn_fuser": {k: v.cpu() for k, v in self.attn_fuser.state_dict().items()},
        }

    def save(self, directory: str | Path) -> None:
        """Writes `config.json` + `new_modules_gp.pt`, the format `load` and the original code read."""
        import json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True))
        torch.save(self.published_state(), directory / MODULES_FILE)

    @classmethod
    def load(cls, directory: str | Path, model_config=None) -> GlimpseModules:
        """Loads the published format (tensors only: `weights_only=True`); checks fit when given the model's config."""
        directory = Path(directory)
        config = GlimpseConfig.load(directory)
        if model_config is not None:
            check_fits(config, model_config)
        path = directory / MODULES_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise GlimpseConfigError(f"no glimpse modules at {path}") from e
        modules = cls(config)
        missing = {"learnable_embeddings", "le_proj", "le_norm", "attn_fuser"} - set(state)
        if missing:
            raise GlimpseConfigError(f"{path} lacks the entries {sorted(missing)}")
        try:
            with torch.no_grad():
                if state["learnable_embeddings"].shape != modules.learnable_embeddings.shape:
                    raise RuntimeError(
                        f"learnable_embeddings has shape {tuple(state['learnable_embeddings'].shape)}, "
                        f"config implies {tuple(modules.learnable_embeddings.shape)}"
                    )
                modules.learnable_embeddings.copy_(state["learnable_embeddings"])
                modules.le_proj.load_state_dict(state["le_proj"])
                modules.le_norm.load_state_dict(state["le_norm"])
                modules.attn_fuser.load_state_dict(state["attn_fuser"])
        except RuntimeError as e:
            raise ModuleMismatchError(f"{path} does not match its own config.json: {e}") from e
        return modules
