"""What a request costs: analytic FLOPs and KV-cache bytes from the model config, pruned and not.

FLOPs count the matrix products (2 per multiply-add) the engine runs, which is what
`torch.utils.flop_counter.FlopCounterMode` counts too; norms, activations and rotary embeddings
are left out (well under 1% at real sizes). Attention counts the whole query × key rectangle a
masked dense kernel computes: prefill runs with an explicit mask, so causal skipping is not
assumed. A row is costed alone, without the padding of the batch it ran in. Rows that shared an
image prefix (the vision tower and the prefix's keys and values, run once) each carry an equal
share of the prefix's cost, and their own tokens' cost against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.glimpse.architectures import architecture_of
from pipeline.glimpse.config import GlimpseConfig


@dataclass(frozen=True)
class RowCost:
    """Per request. `*_unpruned`: the same request without the glimpse (the baseline engine)."""

    prefill_flops: float
    prefill_flops_unshared: float  # as run, had the row not shared its image prefix
    prefill_flops_unpruned: float
    decode_flops: float
    decode_flops_unpruned: float
    kv_cache_bytes: int
    kv_cache_bytes_unpruned: int


@dataclass(frozen=True)
class _Text:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qkv_bias: bool  # Qwen2.5's q, k, v projections always have biases; Qwen3's as `attention_bias` says (none)
    o_bias: bool  # Qwen3's o projection too, with `attention_bias`; Qwen2.5's never
    qk_norm: bool  # Qwen3: an RMSNorm over each head's q and k (head_dim weights each)

    def layer(self, queries: int, keys: int) -> float:
        """One decoder layer: projections, attention (queries × keys) and the gated MLP."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        projections = 2 * queries * self.hidden * (2 * q_out + 2 * kv_out)
        attention = 4 * self.heads * self.head_dim * queries * keys
        mlp = 6 * queries * self.hidden * self.intermediate
        return projections + attention + mlp

    def logits(self) -> float:
        return 2 * self.hidden * self.vocab

    def layer_params(self) -> int:
        """Projections (q, k, v with biases in Qwen2.5, o without; none in Qwen3), q/k norms in
        Qwen3, the gated MLP, two norms."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q_out + 2 * kv_out) + q_out * self.hidden
        attention += (q_out + 2 * kv_out) * self.qkv_bias + self.hidden * self.o_bias + 2 * self.head_dim * self.qk_norm
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden


@dataclass(frozen=True)
class _Vip:
    fuse: int
    cond: int
    vision_hidden: int
    attention_features: int
    layers: int
    selected_layers: int
    reduce_layer: int

    def flops(self, image_tokens: list[int], text: _Text, prompt_with_glimpse: int) -> float:
        """The glimpse read-out at the selected layers (its query, then its logits against every
        key), then the VIP over every visual token."""
        n = sum(image_tokens)
        query = text.heads * text.head_dim
        readout = self.selected_layers * 2 * query * (text.hidden + prompt_with_glimpse)
        qk = self.fuse + self.cond
        per_layer = (
            2 * n * self.vision_hidden * self.cond  # condition projection
            + 4 * n * qk * qk  # q, k
            + 4 * n * self.fuse * self.fuse  # v, o
            + sum(2 * m * m * (qk + self.fuse) for m in image_tokens)  # attention within each image
            + 12 * n * self.fuse * self.fuse  # gated MLP, 2F wide
        )
        return readout + 2 * n * self.attention_features * self.fuse + self.layers * per_layer + 2 * n * self.fuse


class CostModel:
    """Costs requests for one model (and, optionally, its glimpse modules) at one dtype."""

    def __init__(self, model_config, glimpse: GlimpseConfig | None, dtype_bytes: int) -> None:
        text = getattr(model_config, "text_config", model_config)
        vision = model_config.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        architecture = architecture_of(model_config)
        qkv_bias, o_bias = architecture.attention_biases(text)
        self.text = _Text(
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads,
            head_dim=head_dim,
            intermediate=text.intermediate_size,
            vocab=text.vocab_size,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=architecture.qk_norm,
        )
        self.vision = architecture.vision_cost(vision)
        self.vip = (
            _Vip(
                fuse=glimpse.attn_fuse_size,
                cond=glimpse.visual_cond_size,
                vision_hidden=vision.hidden_size,
                attention_features=glimpse.num_attention_features,
                layers=len(glimpse.selected_visual_layers),
                selected_layers=len(glimpse.selected_layers),
                reduce_layer=glimpse.reduce_layer,
            )
            if glimpse is not None
            else None
        )
        self.tied_embeddings = bool(getattr(model_config, "tie_word_embeddings", False))
        self.dtype_bytes = dtype_bytes

    def parameters(self) -> int:
        """Every weight of the model (the glimpse modules, a few MB, left out)."""
        text = self.text
        embeddings = text.vocab * text.hidden * (1 if self.tied_embeddings else 2)
        return self.vision.params() + embeddings + text.layers * text.layer_params() + text.hidden

    def decode_weight_bytes(self) -> int:
        """What one decode step reads besides the cache: the decoder layers, the final norm and the
        logits matrix (the embedding lookup reads one row per token)."""
        text = self.text
        return (text.layers * text.layer_params() + text.hidden + text.vocab * text.hidden) * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token in every layer."""
        return 2 * self.text.layers * self.text.kv_heads * self.text.head_dim * self.dtype_bytes

    def vision_flops(self, grid_thw: list[tuple[int, int, int]]) -> float:
        return sum(self.vision.image(t, h, w) for t, h, w in grid_thw)

    def prefill_flops(
        self,
        grid_thw: list[tuple[int, int, int]],
        prompt: int,
        kept_prompt: int,
        pruned: bool,
        prefix: int = 0,
        sharers: int = 1,
    ) -> float:
        """Vision tower + decoder layers + the first token's logits. Pruned: layers 0..K see the
        prompt and the glimpse token, the VIP runs, layers K+1.. see the `kept_prompt` tokens.
        With a `prefix` of the prompt shared by `sharers` rows: the vision tower and the prefix
        through the early layers (0..K pruned, all not) once for them all, split evenly; the row's
        own tokens through them against the prefix's keys."""
        text, vision = self.text, self.vision_flops(grid_thw)
        early = self.vip.reduce_layer + 1 if pruned else text.layers
        own = prompt - prefix + (1 if pruned else 0)  # the glimpse token is the row's own
        head = vision + early * text.layer(prefix, prefix) if prefix else 0.0
        flops = (0.0 if prefix else vision) + early * text.layer(own, prefix + own) + text.logits()
        if pruned:
            merged = self.vision.merge**2
            image_tokens = [t * h * w // merged for t, h, w in grid_thw]
            late = text.layers - early
            flops += self.vip.flops(image_tokens, text, prompt + 1) + late * text.layer(kept_prompt, kept_prompt)
        return head / sharers + flops

    def decode_flops(self, prompt: int, generated: int) -> float:
        """The forward passes after the first token: the i-th feeds generated token i (1-based)
        and attends to the `prompt` cached tokens plus i."""
        steps = max(generated - 1, 0)
        text = self.text
        attended = steps * prompt + steps * (steps + 1) // 2
        per_token = text.layers * text.layer(1, 0) + text.logits()
        return steps * per_token + text.layers * 4 * text.heads * text.head_dim * attended

    def row(
        self,
        grid_thw: list[tuple[int, int, int]],
        prompt: int,
        kept_prompt: int,
        generated: int,
        pruned: bool,
        sharing: tuple[int, int] = (0, 1),
    ) -> RowCost:
        """The request's costs as run (`pruned` or not, sharing its first `sharing[0]` tokens with
        `sharing[1]` rows), alone, and as the baseline would have run it (unpruned, alone)."""
        cached = max(generated - 1, 0)  # the last token is never fed back
        return RowCost(
            prefill_flops=self.prefill_flops(grid_thw, prompt, kept_prompt, pruned, *sharing),
            prefill_flops_unshared=self.prefill_flops(grid_thw, prompt, kept_prompt, pruned),
            prefill_flops_unpruned=self.prefill_flops(grid_thw, prompt, prompt, False),
            decode_flops=self.decode_flops(kept_prompt, generated),
            decode_flops_unpruned=self.decode_flops(prompt, generated),
            kv_cache_bytes=(kept_prompt + cached) * self.kv_bytes_per_token(),
            kv_cache_bytes_unpruned=(prompt + cached) * self.kv_bytes_per_token(),
        )


def share_seconds(prefill_s: float, prefill_flops: list[float], finished_s: list[float]) -> list[float]:
    """Splits a batch's engine seconds among its rows: prefill in proportion to each row's prefill
    FLOPs, decode evenly among the rows still running in each interval between two rows finishing.
    The shares add up to prefill_s + max(finished_s)."""
    total = sum(prefill_flops)
    shares = [prefill_s * (f / total if total else 1 / len(prefill_flops)) for f in prefill_flops]
    order = sorted(range(len(finished_s)), key=finished_s.__getitem__)
    previous = 0.0
    for rank, row in enumerate(order):
        interval = (finished_s[row] - previous) / (len(order) - rank)
        for other in order[rank:]:
            shares[other] += interval
        previous = finished_s[row]
    return shares
