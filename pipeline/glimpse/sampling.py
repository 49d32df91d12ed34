"""Choosing the next token for a whole decode batch in one pass: greedy rows by argmax, sampled
rows by temperature + top-p.

A sampled row draws one uniform number per step from a hash of (seed, step), with no generator
state. A request's tokens then depend only on its own logits, seed and step: they come out the
same alone or in any batch, in any order, with any padding. Every step costs the same few
batched ops at any batch size, where a Python loop over rows would launch ops for each row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; seed makes a sampled answer the same alone or in any batch;
    ignore_eos generates exactly max_new_tokens (for benchmarks: a fixed answer length)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class BatchSampler:
    """The sampling settings of a decode batch's rows as tensors; `sampler(logits, step)` picks
    every row's token at answer position `step` (0 for the token after the prompt)."""

    def __init__(self, params: list[SamplingParams], device) -> None:
        sampled = [not p.greedy for p in params]
        # Known on the host, so that batches that need no sampling or no top-p skip that work.
        self.sampling = any(sampled)
        self.nucleus = any(s and p.top_p < 1.0 for s, p in zip(sampled, params))
        if not self.sampling:
            return
        self.greedy = torch.tensor([not s for s in sampled], device=device)  # [B]
        # Greedy rows get temperature 1 (their draw is discarded) and rows without top-p get an
        # infinite one (nothing is cut, even where the float sum of all probabilities passes 1).
        settings = [(p.temperature or 1.0, p.top_p if p.top_p < 1.0 else float("inf")) for p in params]
        self.temperature, self.top_p = torch.tensor(settings, dtype=torch.float64, device=device).T  # [B] each
        self.uniforms = _uniforms([p.seed for p in params], max(p.max_new_tokens for p in params), device)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """logits [B, V] → token ids [B]. Inverse-CDF sampling: the first token whose cumulative
        probability (in vocabulary order, so that no row depends on how others sort) passes u·total."""
        greedy = logits.argmax(dim=-1)
        if not self.sampling:
            return greedy
        # float64: a float32 running sum over ~150k tokens would misplace visible probability mass.
        probs = (logits / self.temperature[:, None]).softmax(dim=-1)  # [B, V] float64
        if self.nucleus:
            # Keep the tokens of the smallest most-likely set whose mass reaches top_p (the most
            # likely token always stays): those at or above that set's smallest probability (so a
            # tie at the cut keeps every tied token, whatever order the sort left them in).
            ordered = probs.sort(dim=-1, descending=True).values
            outside = ordered.cumsum(dim=-1) - ordered > self.top_p[:, None]
            floor = ordered.masked_fill(outside, 1.0).amin(dim=-1, keepdim=True)  # [B, 1]
            probs = probs.masked_fill(probs < floor, 0.0)
        cumulative = probs.cumsum(dim=-1)  # [B, V]
        target = self.uniforms[:, step, None] * cumulative[:, -1:]  # [B, 1], below the total
        # right=True: the first index whose cumulative sum exceeds the target, never a zero-probability token.
        sampled = torch.searchsorted(cumulative, target, right=True)[:, 0]
        return torch.where(self.greedy, greedy, sampled)


_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """x · c mod 2^32 for x in [0, 2^32): in halves of c, so that no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """MurmurHash3's finaliser: a bijection of 32-bit words in which every output bit depends on
    every input bit. Plain integer ops: works on Python ints and int64 tensors alike."""
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return x ^ (x >> 16)


def _uniforms(seeds: list[int], steps: int, device) -> torch.Tensor:
    """[B, steps] float64 in [0, 1): row b's draw at step t, a hash of (seeds[b], t) alone.
    Counter-based like Philox: a key per seed, a word per step, mixed together."""
    words = torch.tensor([[seed % 2**64 >> 32, seed & _MASK32] for seed in seeds], device=device)  # [B, 2]
    key = _mix32(_mix32(words[:, 0]) ^ words[:, 1] ^ 0x9E3779B9)  # [B]
    counter = _mix32(_mix32(torch.arange(steps, device=device)) ^ 0x7F4A7C15)  # [steps]
    return _mix32(_mix32(key[:, None] ^ counter)).double() / 2.0**32  # [B, steps]
