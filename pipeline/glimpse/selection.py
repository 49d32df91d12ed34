"""Which visual tokens a sample keeps, from the VIP's logits."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SelectionOptions:
    """threshold on sigmoid(logit); max_keep_ratio caps the kept share (None: no cap); min_kept floors
    the count. keep_ratio, for benchmarks, keeps exactly that share of the most likely tokens
    (rounded, at least min_kept and 1) whatever the threshold says, so runs compare like with like."""

    threshold: float = 0.5
    max_keep_ratio: float | None = None
    min_kept: int = 1
    keep_ratio: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.max_keep_ratio is not None and not 0.0 < self.max_keep_ratio <= 1.0:
            raise ValueError(f"max_keep_ratio must be in (0, 1], got {self.max_keep_ratio}")
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.min_kept < 0:
            raise ValueError(f"min_kept must be >= 0, got {self.min_kept}")

    def overridden(self, **changes) -> SelectionOptions:
        """A copy with the given options changed; an option given as None stays as it is."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})


def select_tokens(logits: torch.Tensor, options: SelectionOptions) -> torch.Tensor:
    """logits [N] of one sample (all its images) → keep mask [N] bool.

    The sigmoid and the comparison run in the logits' dtype, as the release does
    (model_gp.py, `_get_remain_masks`: `one_logits[-1].sigmoid() > threshold`, topk on those
    probabilities): in bf16 a logit just above the threshold's logit can round onto it and be dropped,
    and the published modules' thresholds were chosen under that arithmetic."""
    probs = logits.sigmoid()  # (N,), the logits' dtype
    n = probs.numel()
    if options.keep_ratio is not None:  # ours, not the release's: ranked by logit, which never saturates
        return _top(logits.float(), min(n, max(1, options.min_kept, round(options.keep_ratio * n))))
    keep = probs > options.threshold
    if options.max_keep_ratio is not None and int(keep.sum()) > options.max_keep_ratio * n:
        keep = _top(probs, max(1, min(n, int(options.max_keep_ratio * n))))
    if int(keep.sum()) < options.min_kept:
        keep |= _top(probs, min(n, options.min_kept))
    return keep


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[torch.topk(scores, k).indices] = True
    return mask
