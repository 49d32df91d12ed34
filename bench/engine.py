"""The engine pruned, the engine unpruned and plain transformers `generate`, on the same requests
in the same batches; a batch-size sweep; optionally a memory cap with each at its largest batch.

    python bench/engine.py [--batch-sizes 1 8 32] [--new-tokens 16] [--repeats 3] [--json out.json]
    python bench/engine.py --preset qwen2.5-vl-7b --device cuda --requests 256 --width 1280 --height 960 \\
        --new-tokens 128 512 --batch-sizes 64 --memory-cap-gib 24 --json gpu.json

Prints one JSON line per (answer length, batch size) with images/s as min/median/max over the
repeats, prefill and decode seconds, peak memory, and the speedups pruned/unpruned and
unpruned/transformers (medians). Default model: the tiny demo checkpoint (built in .cache/tiny
when missing); `--preset` builds a real-size shape with random weights on `--device`. On a GPU the
figures also hold the roofline's prediction for the same run (prefill at the FLOP/s measured
here, decode at `--hbm-tbps`), prefill FLOP/s as a share of `--peak-tflops`, and decode bytes/s
as a share of HBM bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.measure import PeakRSS, machine, spread  # noqa: E402
from bench.workload import Workload  # noqa: E402
from pipeline.glimpse.baseline import transformers_generate  # noqa: E402
from pipeline.glimpse.roofline import RequestShape, Roofline, Roofliner  # noqa: E402

MODES = ("pruned", "unpruned", "transformers")


def load_engine(args):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.preset:
        from pipeline.synthetic.presets import build_engine

        return build_engine(args.preset, dtype=dtype, device=args.device, attn_implementation=args.attn)
    from pipeline.glimpse.engine import GlimpseEngine
    from pipeline.synthetic.tiny import ensure_tiny_checkpoint

    tiny = ensure_tiny_checkpoint(Path(".cache/tiny").resolve())
    return GlimpseEngine.from_pretrained(
        tiny / "base", tiny / "glimpse", dtype=args.dtype, device=args.device, attn_implementation=args.attn
    )


class Timed:
    """One mode's run over all requests: its seconds; for the engine also the seconds spent in
    decode loops (the rest is prefill, merging chunks and building results) and the decode batch
    sizes it chose."""

    def __init__(self, engine, requests, prompts) -> None:
        self.engine, self.requests, self.prompts = engine, requests, prompts
        self.decode_batches: list[int] = []
        self.decode_s = 0.0
        decode = engine._decode

        def timed_decode(state, params):
            started = time.perf_counter()
            try:
                return decode(state, params)
            finally:
                self.decode_s += time.perf_counter() - started
                self.decode_batches.append(len(params))

        engine._decode = timed_decode

    def run(self, mode: str, batch: int, prefill_rows: int | None, budget: int | None) -> dict:
        self.decode_batches.clear()
        self.decode_s = 0.0
        _synchronize()
        started = time.perf_counter()
        for start in range(0, len(self.requests), batch):
            requests, prompts = self.requests[start : start + batch], self.prompts[start : start + batch]
            if mode == "transformers":
                transformers_generate(self.engine, prompts, requests[0].sampling.max_new_tokens, ignore_eos=True)
            else:
                self.engine.generate_prepared(
                    requests, prompts, prune=mode == "pruned", prefill_rows=prefill_rows, cache_budget_bytes=budget
                )
        _synchronize()
        seconds = time.perf_counter() - started
        return {
            "seconds": seconds,
            "prefill_s": seconds - self.decode_s,
            "decode_s": self.decode_s,
            "batches": list(self.decode_batches),
        }


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_bytes(sampler: PeakRSS | None) -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else sampler.peak


def measure(timed: Timed, mode: str, batch: int, repeats: int, prefill_rows, budget) -> dict:
    timed.run(mode, min(batch, len(timed.requests)), prefill_rows, budget)  # warm-up
    runs = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as sampler:
        for _ in range(repeats):
            runs.append(timed.run(mode, batch, prefill_rows, budget))
    n = len(timed.requests)
    out = {
        "images_per_s": spread([n / r["seconds"] for r in runs], 2),
        "seconds": spread([r["seconds"] for r in runs]),
        "peak_memory_gib": round(_peak_bytes(sampler) / 2**30, 2),
    }
    if mode != "transformers":
        out["prefill_s"] = spread([r["prefill_s"] for r in runs])
        out["decode_s"] = spread([r["decode_s"] for r in runs])
        out["decode_batch_sizes"] = sorted(set(runs[-1]["batches"]))
    return out


def roofline_figures(engine, shape: RequestShape, figures: dict, args, batch: int) -> dict:
    """The roofline's prediction for this run, and how close prefill and decode came to the GPU's
    peak FLOP/s and HBM bandwidth (unpruned engine)."""
    costs = engine.costs
    unpruned = figures["unpruned"]
    prefill_flops = args.requests * costs.prefill_flops(list(shape.grid_thw), shape.prompt_tokens, 0, False)
    measured_rate = prefill_flops / unpruned["prefill_s"]["median"]
    roof = Roofliner(costs, Roofline(measured_rate, args.hbm_tbps * 1e12, args.peak_tflops * 1e12))
    predicted = (
        roof.run(shape, args.requests, batch, True).images_per_s
        / roof.run(shape, args.requests, batch, False).images_per_s
    )
    decode_seconds = roof.run(shape, args.requests, batch, False).decode_s  # at full bandwidth
    return {
        "prefill_tflops_per_s": round(measured_rate / 1e12, 1),
        "prefill_share_of_peak": round(measured_rate / (args.peak_tflops * 1e12), 3),
        "decode_share_of_hbm_bandwidth": round(decode_seconds / unpruned["decode_s"]["median"], 3),
        "roofline_pruned_over_unpruned": round(predicted, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="a real-size shape with random weights (pipeline/synthetic/presets.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, else float32")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--requests", type=int, default=Workload.requests)
    parser.add_argument("--width", type=int, default=Workload.width)
    parser.add_argument("--height", type=int, default=Workload.height)
    parser.add_argument("--question-tokens", type=int, default=Workload.question_tokens)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[Workload.new_tokens])
    parser.add_argument("--keep-ratio", type=float, default=Workload.keep_ratio)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prefill-rows", type=int, help="rows per prefill chunk (default: the whole batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--memory-cap-gib", type=float, help="GPU only: cap memory, run each engine mode at its largest batch"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="the GPU's HBM bandwidth (H100 SXM: 3.35)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    torch.manual_seed(0)
    engine = load_engine(args)
    engine.selection = engine.selection.overridden(keep_ratio=args.keep_ratio)
    runs = []
    for new_tokens in args.new_tokens:
        workload = Workload(args.requests, args.width, args.height, args.question_tokens, new_tokens, args.keep_ratio)
        requests = workload.build(engine.prompts.tokenizer)
        prompts = [engine.prepare(r) for r in requests]
        grid = tuple(tuple(g) for g in prompts[0].image_grid_thw.tolist())
        visual = int((prompts[0].input_ids == engine.image_token_id).sum())
        kept = max(1, round(args.keep_ratio * visual))
        shape = RequestShape(grid, len(prompts[0].input_ids), len(prompts[0].input_ids) - visual + kept, new_tokens)
        timed = Timed(engine, requests, prompts)
        for batch in args.batch_sizes:
            figures = {mode: measure(timed, mode, batch, args.repeats, args.prefill_rows, None) for mode in args.modes}
            record = {"workload": workload.describe(), "batch": batch, "visual_tokens": visual, **figures}
            if {"pruned", "unpruned"} <= figures.keys():
                record["pruned_over_unpruned"] = _ratio(figures["pruned"], figures["unpruned"])
            if {"unpruned", "transformers"} <= figures.keys():
                record["unpruned_over_transformers"] = _ratio(figures["unpruned"], figures["transformers"])
            if args.device.startswith("cuda") and "unpruned" in figures:
                record["roofline"] = roofline_figures(engine, shape, figures, args, batch)
            print(json.dumps(record), flush=True)
            runs.append(record)
        if args.memory_cap_gib and args.device.startswith("cuda"):
            runs.append(capped(engine, timed, shape, args))
            print(json.dumps(runs[-1]), flush=True)
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


def capped(engine, timed: Timed, shape: RequestShape, args) -> dict:
    """Under a memory cap, each engine mode decodes as many rows together as its cache budget
    holds (what is left beside the weights and a prefill chunk's workspace)."""
    cap = int(args.memory_cap_gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    prefill_rows = args.prefill_rows or 8
    roof = Roofliner(engine.costs, Roofline(1.0, args.hbm_tbps * 1e12, args.peak_tflops * 1e12))
    budget = int(cap - torch.cuda.memory_allocated() - roof.prefill_workspace_bytes(shape, prefill_rows))
    figures = {
        mode: measure(timed, mode, args.requests, args.repeats, prefill_rows, budget) for mode in ("pruned", "unpruned")
    }
    torch.cuda.set_per_process_memory_fraction(1.0)
    return {
        "memory_cap_gib": args.memory_cap_gib,
        "new_tokens": shape.new_tokens,
        "cache_budget_gib": round(budget / 2**30, 2),
        **figures,
        "pruned_over_unpruned": _ratio(figures["pruned"], figures["unpruned"]),
        "largest_batch_pruned_over_unpruned": round(
            max(figures["pruned"]["decode_batch_sizes"]) / max(figures["unpruned"]["decode_batch_sizes"]), 2
        ),
    }


def _ratio(a: dict, b: dict) -> float:
    return round(a["images_per_s"]["median"] / b["images_per_s"]["median"], 3)


if __name__ == "__main__":
    main()
