"""Many questions per image: the engine with and without shared image prefixes, pruned and unpruned.

    python bench/shared_prefixes.py [--images 64] [--questions 5] [--batch-size 40] [--json out.json]
    python bench/shared_prefixes.py --preset qwen2.5-vl-7b --device cuda --width 1280 --height 960 \\
        --new-tokens 32 --batch-size 40 --prefill-rows 10 --json gpu.json

Each image gets `--questions` questions of one token count; the requests of an image lie next to
each other, so a batch (a multiple of the questions) holds whole images. Prints images/s and
questions/s (min/median/max over the repeats) for each of unshared and shared, pruned and
unpruned, and the roofline's prediction of images/s for the same four runs with the
Qwen2.5-VL-7B shape on an H100.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.engine import load_engine  # noqa: E402
from bench.measure import machine, spread  # noqa: E402
from bench.workload import WORDS, Workload, fixed_length_question  # noqa: E402
from pipeline.glimpse.engine import Request  # noqa: E402
from pipeline.glimpse.roofline import H100_SXM, RequestShape, Roofliner  # noqa: E402

CASES = [(share, prune) for prune in (True, False) for share in (False, True)]


def questions_about_each_image(workload: Workload, tokenizer, questions: int) -> list[Request]:
    """`questions` requests per image of `workload`, each question a different rotation of the
    workload's words at one token count."""
    base = workload.build(tokenizer)
    asked = []
    for q in range(questions):
        words = [*WORDS[q:], *WORDS[:q]]
        asked.append(fixed_length_question(tokenizer, workload.question_tokens, words))
    return [replace(r, id=f"{r.id}-q{q}", question=text) for r in base for q, text in enumerate(asked)]


def run(engine, requests, prompts, share: bool, prune: bool, batch: int, prefill_rows: int | None) -> float:
    engine.share_prefixes = share
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(requests), batch):
        engine.generate_prepared(
            requests[start : start + batch], prompts[start : start + batch], prune, prefill_rows=prefill_rows
        )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="a real-size shape with random weights (pipeline/synthetic/presets.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, else float32")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--questions", type=int, default=5, help="questions per image")
    parser.add_argument("--width", type=int, default=Workload.width)
    parser.add_argument("--height", type=int, default=Workload.height)
    parser.add_argument("--question-tokens", type=int, default=Workload.question_tokens)
    parser.add_argument("--new-tokens", type=int, default=Workload.new_tokens)
    parser.add_argument("--keep-ratio", type=float, default=Workload.keep_ratio)
    parser.add_argument(
        "--batch-size", type=int, default=40, help="requests per engine call; a multiple of --questions"
    )
    parser.add_argument("--prefill-rows", type=int, help="rows per prefill chunk (default: the whole batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.batch_size % args.questions:
        parser.error("--batch-size must be a multiple of --questions, so that a batch holds whole images")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    engine = load_engine(args)
    engine.selection = engine.selection.overridden(keep_ratio=args.keep_ratio)
    workload = Workload(args.images, args.width, args.height, args.question_tokens, args.new_tokens, args.keep_ratio)
    requests = questions_about_each_image(workload, engine.prompts.tokenizer, args.questions)
    prompts = [engine.prepare(r) for r in requests]
    figures: dict = {"machine": machine(), "workload": {**workload.describe(), "questions_per_image": args.questions}}
    seconds = {}
    for share, prune in CASES:
        name = _name(share, prune)
        run(engine, requests[: args.batch_size], prompts[: args.batch_size], share, prune, args.batch_size, None)
        runs = [
            run(engine, requests, prompts, share, prune, args.batch_size, args.prefill_rows)
            for _ in range(args.repeats)
        ]
        seconds[name] = min(runs)
        figures[name] = {
            "images_per_s": spread([args.images / s for s in runs], 2),
            "questions_per_s": spread([len(requests) / s for s in runs], 2),
        }
        print(json.dumps({name: figures[name]}), flush=True)
    for prune in ("pruned", "unpruned"):
        figures[f"shared over unshared, {prune}"] = round(seconds[f"unshared {prune}"] / seconds[f"shared {prune}"], 2)
    figures["roofline, Qwen2.5-VL-7B on an H100"] = roofline(args, len(requests))
    print(json.dumps({k: v for k, v in figures.items() if k.startswith(("shared over", "roofline"))}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def roofline(args, requests: int) -> dict:
    """Images/s the roofline predicts for the four runs with the Qwen2.5-VL-7B shape on an H100 (a
    1280×960 image, as bench/roofline.py has it), batches of `--batch-size`."""
    from bench.roofline import GRID, TEMPLATE_TOKENS, VISUAL
    from pipeline.synthetic.presets import cost_model

    prompt = TEMPLATE_TOKENS + VISUAL + args.question_tokens
    shape = RequestShape(GRID, prompt, prompt - VISUAL + round(args.keep_ratio * VISUAL), args.new_tokens)
    prefix = VISUAL + 4  # `<|im_start|>user\n<|vision_start|>` and the image: what the questions share
    roof = Roofliner(cost_model("qwen2.5-vl-7b"), H100_SXM)
    out = {}
    for share, prune in CASES:
        prediction = roof.run(shape, requests, args.batch_size, prune, (prefix, args.questions) if share else (0, 1))
        out[f"{_name(share, prune)} images_per_s"] = round(prediction.images_per_s / args.questions, 2)
    return out


def _name(share: bool, prune: bool) -> str:
    return f"{'shared' if share else 'unshared'} {'pruned' if prune else 'unpruned'}"


if __name__ == "__main__":
    main()
