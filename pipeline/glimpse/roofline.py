"""Where the time goes, as a roofline sees it: run times and memory-bound batch sizes predicted
from the analytic cost model and a GPU's FLOP/s and HBM bandwidth."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.glimpse.accounting import CostModel


@dataclass(frozen=True)
class RequestShape:
    """One request of a uniform workload: its image grids, prompt tokens before and after pruning
    (the pruned count includes no glimpse token), and answer length."""

    grid_thw: tuple[tuple[int, int, int], ...]
    prompt_tokens: int
    kept_prompt_tokens: int
    new_tokens: int

    def context(self, pruned: bool) -> int:
        """Cache columns a row holds at the end of decoding."""
        return (self.kept_prompt_tokens if pruned else self.prompt_tokens) + self.new_tokens


@dataclass(frozen=True)
class Roofline:
    """A GPU as a roofline sees it: prefill runs at `prefill_flops_per_s` (measured, or a share of
    peak); a decode step is bound by reading its weights and cache at `hbm_bytes_per_s`, or by its
    FLOPs at `peak_flops_per_s`, whichever takes longer."""

    prefill_flops_per_s: float
    hbm_bytes_per_s: float
    peak_flops_per_s: float


# NVIDIA H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3; prefill at 40% of peak.
H100_SXM = Roofline(prefill_flops_per_s=0.4 * 989e12, hbm_bytes_per_s=3.35e12, peak_flops_per_s=989e12)


@dataclass(frozen=True)
class RunPrediction:
    """A run of `requests` identical requests in batches of `batch`, as the roofline predicts it."""

    requests: int
    batch: int
    prefill_s: float
    decode_s: float

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def images_per_s(self) -> float:
        return self.requests / self.seconds


class Roofliner:
    """Predicts run times and memory-bound batch sizes from a cost model and a roofline: the model
    of where the time goes that the benchmarks are held to. Pruning shrinks prefill only in the
    layers after the pruning layer; mostly it shrinks what each decode step reads, and the cache,
    which lets a memory budget hold a larger batch."""

    def __init__(self, costs: CostModel, roofline: Roofline) -> None:
        self.costs, self.roofline = costs, roofline

    def prefill_seconds(self, shape: RequestShape, pruned: bool, sharing: tuple[int, int] = (0, 1)) -> float:
        """One request's prefill at the roofline's prefill FLOP/s; `sharing`: its first
        `sharing[0]` tokens prefilled once for `sharing[1]` requests."""
        grid = list(shape.grid_thw)
        flops = self.costs.prefill_flops(grid, shape.prompt_tokens, shape.kept_prompt_tokens, pruned, *sharing)
        return flops / self.roofline.prefill_flops_per_s

    def decode_step_seconds(self, batch: int, context: int) -> float:
        """One decode step of `batch` rows that each attend to `context` cached columns."""
        costs, text = self.costs, self.costs.text
        read = costs.decode_weight_bytes() + batch * context * costs.kv_bytes_per_token()
        flops = batch * (text.layers * (text.layer(1, 0) + 4 * text.heads * text.head_dim * context) + text.logits())
        return max(read / self.roofline.hbm_bytes_per_s, flops / self.roofline.peak_flops_per_s)

    def run(
        self, shape: RequestShape, requests: int, batch: int, pruned: bool, sharing: tuple[int, int] = (0, 1)
    ) -> RunPrediction:
        """`requests` requests in full batches of `batch` (the last one shorter), sharing prefixes as `sharing` says."""
        prefill = requests * self.prefill_seconds(shape, pruned, sharing)
        prompt = shape.kept_prompt_tokens if pruned else shape.prompt_tokens
        decode = 0.0
        for rows in [batch] * (requests // batch) + ([requests % batch] if requests % batch else []):
            # Step i feeds generated token i and attends to the prompt plus i columns.
            decode += sum(self.decode_step_seconds(rows, prompt + i) for i in range(1, shape.new_tokens))
        return RunPrediction(requests=requests, batch=batch, prefill_s=prefill, decode_s=decode)

    def largest_batch(self, shape: RequestShape, pruned: bool, budget_bytes: float, prefill_rows: int) -> int:
        """The most rows whose decode cache fits `budget_bytes` beside the weights and the
        workspace of one prefill chunk of `prefill_rows` rows (0 when even one row does not)."""
        costs = self.costs
        free = budget_bytes - costs.parameters() * costs.dtype_bytes - self.prefill_workspace_bytes(shape, prefill_rows)
        per_row = shape.context(pruned) * costs.kv_bytes_per_token() + costs.text.vocab * 4
        return max(int(free // per_row), 0)

    def prefill_workspace_bytes(self, shape: RequestShape, rows: int) -> int:
        """A prefill chunk's transient memory, roughly: its full-length cache (held until pruning
        shortens it, or copied into the decode cache), one decoder layer's activations (hidden
        states, q/k/v, the MLP's gate and up) and one vision block's, all rows at once."""
        costs, text, vision = self.costs, self.costs.text, self.costs.vision
        tokens = rows * (shape.prompt_tokens + 1)
        patches = rows * sum(t * h * w for t, h, w in shape.grid_thw)
        cache = tokens * costs.kv_bytes_per_token()
        decoder = tokens * (4 * text.hidden + 2 * text.kv_heads * text.head_dim + 3 * text.intermediate)
        vision_block = patches * (6 * vision.hidden + vision.mlp_activations * vision.intermediate)
        return cache + (decoder + vision_block) * costs.dtype_bytes
