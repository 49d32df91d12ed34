"""Answer a few requests without Ray: `python -m pipeline.glimpse --model DIR --requests cases.json --out out.jsonl`.

cases.json is a list of {"id", "images": [paths relative to --root], "question"} (or JSON lines of
them; "image" for one image), optionally with "max_new_tokens", "temperature", "top_p", "seed" per
case. Each output line is one result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.glimpse", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    p.add_argument("--model", required=True, help="Qwen2.5-VL checkpoint: hub id or local directory")
    p.add_argument("--glimpse", help="directory of GlimpsePrune modules (config.json + new_modules_gp.pt)")
    p.add_argument("--requests", required=True, type=Path, help="cases.json")
    p.add_argument("--root", type=Path, help="directory image paths are relative to (default: that of --requests)")
    p.add_argument("--out", required=True, type=Path, help="output JSON Lines file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64, help="default for cases that do not set their own")
    p.add_argument("--no-prune", action="store_true", help="baseline: answer without the glimpse")
    p.add_argument("--threshold", type=float, help="keep tokens with sigmoid(VIP logit) above this (default: modules')")
    p.add_argument("--max-keep-ratio", type=float, help="keep at most this share of visual tokens")
    p.add_argument("--min-kept", type=int, help="keep at least this many visual tokens")
    p.add_argument("--keep-ratio", type=float, help="benchmarks: keep exactly this share of visual tokens")
    p.add_argument("--ignore-eos", action="store_true", help="benchmarks: generate exactly max_new_tokens")
    p.add_argument("--emit-masks", action="store_true", help="add each result's kept_mask")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--min-pixels", type=int, help="image processor's min_pixels (default: checkpoint's)")
    p.add_argument("--max-pixels", type=int, help="image processor's max_pixels (default: checkpoint's)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if (args.threshold, args.max_keep_ratio, args.min_kept, args.keep_ratio) != (None,) * 4 and not args.glimpse:
        p.error("--threshold/--max-keep-ratio/--min-kept/--keep-ratio need --glimpse")
    return args


def load_requests(path: Path, root: Path, max_new_tokens: int, ignore_eos: bool = False):
    """cases.json → Requests, with images opened; errors name the case and the file."""
    from PIL import Image

    from pipeline.glimpse.engine import Request
    from pipeline.glimpse.sampling import SamplingParams

    try:
        text = path.read_text()
        cases = json.loads(text) if path.suffix != ".jsonl" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot read requests from {path}: {e}") from e
    if not isinstance(cases, list):
        raise SystemExit(f"{path} must hold a JSON list of cases, got {type(cases).__name__}")
    requests = []
    for n, case in enumerate(cases):
        if "image" in case and "images" not in case:
            case = {**case, "images": [case["image"]]}
        missing = {"id", "images", "question"} - set(case)
        if missing:
            raise SystemExit(f"case #{n} in {path} lacks {sorted(missing)}")
        images = []
        for rel in case["images"]:
            try:
                with Image.open(root / rel) as im:
                    im.load()
                    images.append(im.copy())
            except OSError as e:
                raise SystemExit(f"case {case['id']!r}: cannot open image {root / rel}: {e}") from e
        sampling = SamplingParams(
            max_new_tokens=case.get("max_new_tokens", max_new_tokens),
            temperature=case.get("temperature", 0.0),
            top_p=case.get("top_p", 1.0),
            seed=case.get("seed", 0),
            ignore_eos=ignore_eos,
        )
        requests.append(Request(id=str(case["id"]), images=images, question=case["question"], sampling=sampling))
    return requests


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from pipeline.glimpse.engine import GlimpseEngine

    requests = load_requests(args.requests, args.root or args.requests.parent, args.max_new_tokens, args.ignore_eos)
    engine = GlimpseEngine.from_pretrained(
        args.model,
        args.glimpse,
        dtype=args.dtype,
        device=args.device,
        attn_implementation=args.attn,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
    if engine.can_prune:
        engine.selection = engine.selection.overridden(
            threshold=args.threshold,
            max_keep_ratio=args.max_keep_ratio,
            min_kept=args.min_kept,
            keep_ratio=args.keep_ratio,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started, done = time.perf_counter(), 0
    with args.out.open("w") as out:
        for start in range(0, len(requests), args.batch_size):
            chunk = requests[start : start + args.batch_size]
            for result in engine.generate(
                chunk, prune=not args.no_prune, emit_masks=args.emit_masks, batch_size=args.batch_size
            ):
                row = result.columns()
                if not args.emit_masks:
                    row.pop("kept_mask")
                    row.pop("image_grid_thw")
                out.write(json.dumps(row) + "\n")
            out.flush()
            done += len(chunk)
            print(f"{done}/{len(requests)} requests, {time.perf_counter() - started:.1f}s", file=sys.stderr)
    print(f"wrote {done} results to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
