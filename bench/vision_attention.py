"""Qwen2.5-VL's vision tower with transformers' SDPA attention (one call per window or image) and
with ours (one padded call per block, `pipeline/glimpse/vision_attention.py`), on one 1280×960
image (grid 1×68×92: 6,256 patches, 108 windows), at the real 7B vision shape (hidden 1280, 16
heads, window 112, patch 14, full attention in blocks 7/15/23/31) with random fp32 weights,
first `--blocks` blocks only (default 8: blocks 0-6 windowed, 7 full).

    python bench/vision_attention.py [--blocks 8] [--repeats 3] [--device cpu] [--json out.json]

Prints one JSON line each for the tower forward and for the attention alone (random q/k/v, no
projections) of a windowed and of a full-attention block: SDPA calls per run and min/median/max
ms over the repeats (after one warm-up run), before and after. The tower's time is mostly its
matmuls, the same before and after; the saving is per call: Python and dispatch on a CPU, also a
kernel launch on a GPU. On a CPU the padding costs more than the calls it saves: its gathers
allocate fresh ~35 MB buffers, which glibc maps and page-faults anew each time (set
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ high to see the copies alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.measure import machine, spread  # noqa: E402
from pipeline.glimpse.vision_attention import one_call_per_block, padded_varlen_attention  # noqa: E402
from pipeline.synthetic.presets import PRESETS  # noqa: E402
from pipeline.synthetic.tiny import build_config  # noqa: E402

GRID = [[1, 68, 92]]  # 1280×960 resized to 1288×952


@contextmanager
def counting_sdpa():
    """Yields a one-item list counting calls to torch.nn.functional.scaled_dot_product_attention."""
    count, original = [0], torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        yield count
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def measure(run: Callable[[], object], repeats: int, device: torch.device) -> dict:
    """SDPA calls of one run, and ms per run over `repeats` runs after a warm-up."""
    with counting_sdpa() as count:
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return {"sdpa_calls": count[0], "ms": spread(times, 1)}


def transformers_loop(module, query, key, value, cu_seqlens):
    """The non-flash branch of Qwen2_5_VLVisionAttention.forward: one SDPA call per segment."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    splits = [torch.split(x, lengths, dim=2) for x in (query, key, value)]
    outs = [sdpa_attention_forward(module, q, k, v, None, scaling=module.scaling)[0] for q, k, v in zip(*splits)]
    return torch.cat(outs, dim=1)


@torch.inference_mode()
def main() -> None:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    config = build_config(PRESETS["qwen2.5-vl-7b"].spec, 400).vision_config
    config.depth = args.blocks
    torch.manual_seed(0)
    with device:
        visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation="sdpa").eval()
        grid = torch.tensor(GRID)
        pixels = torch.randn(int(grid.prod()), config.in_channels * config.temporal_patch_size * config.patch_size**2)

    def report(record):
        record["speedup_median"] = round(record["before"]["ms"]["median"] / record["after"]["ms"]["median"], 2)
        print(json.dumps(record), flush=True)
        figures.append(record)

    figures = []
    record = {"part": "tower", "blocks": args.blocks, "grid": GRID, "device": machine()}
    run = lambda: visual(pixels, grid_thw=grid)  # noqa: E731
    record["before"] = measure(run, args.repeats, device)
    with one_call_per_block(visual):
        record["after"] = measure(run, args.repeats, device)
    report(record)

    # The attention alone on random q/k/v [1, heads, N, head_dim].
    attn = visual.blocks[0].attn
    _, cu_windows = get_vision_window_index(grid, config.spatial_merge_size, config.window_size, config.patch_size)
    q, k, v = torch.randn(3, 1, config.num_heads, pixels.shape[0], attn.head_dim, device=device)
    for part, cu in (("attention, windowed", cu_windows), ("attention, full", get_vision_cu_seqlens(grid))):
        longest = int((cu[1:] - cu[:-1]).max())
        record = {"part": part, "segments": len(cu) - 1, "grid": GRID, "device": machine()}
        record["before"] = measure(lambda cu=cu: transformers_loop(attn, q, k, v, cu), args.repeats, device)
        record["after"] = measure(
            lambda cu=cu, n=longest: padded_varlen_attention(
                attn, q, k, v, None, cu_seq_lens_q=cu, max_length_q=n, scaling=attn.scaling
            ),
            args.repeats,
            device,
        )
        report(record)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
