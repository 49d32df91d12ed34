"""Synthetic grounding data: find the named shape among look-alikes and clutter.

GlimpsePrune learns which visual tokens a question needs. Where this project is tested nothing can
be downloaded, so its modules are trained on the tiny random-weight model (pipeline/synthetic/tiny.py)
with drawn data: each image holds one target shape in a named colour, 0-2 distractors that share its
colour or its shape, and grey clutter. Only the question says which shape is the target, and the
target's box says which tokens a pruner that follows the question keeps; a held-out set (another
seed) shows whether pruning learnt that.

    python -m pipeline.synthetic.grounding --out DIR --n N [--seed S] [--size 224] [--distractors 2]

writes DIR/images/<id>.png and DIR/manifest.jsonl, a manifest `python -m jobs.vqa --manifest` runs.
Its rows also carry `answer` and `boxes` (the target's box, normalised to [0, 1]), which the job ignores.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours, far from the low-saturation background and clutter: a pixel of one of these
# exact values belongs to a target or a distractor.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "orange": (240, 120, 20),
    "purple": (140, 40, 190),
}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = ("where is the {name}", "find the {name}", "locate the {name}")
TARGET_SCALE = (0.20, 0.35)  # the side of the target and distractors, as a fraction of the shorter image side
CLUTTER_SCALE = (0.04, 0.12)
CLUTTER_COUNT = (4, 9)
GAP = 4  # pixels kept free between shapes, and between a shape and the image edge

Box = tuple[int, int, int, int]  # pixels x1, y1, x2, y2; x2 and y2 exclusive


def make_example(
    rng: random.Random, index: int, size: tuple[int, int] = (224, 224), distractors: int = 2
) -> tuple[Image.Image, dict]:
    """One image and its row: `id`, `question`, `answer` and `boxes`, the target's tight box
    [[x1, y1, x2, y2]] normalised by width and height (it covers pixels x1·W ≤ x < x2·W)."""
    image = background(rng, size)
    draw_clutter(rng, image)
    target = (rng.choice(SHAPES), rng.choice(list(COLORS)))
    shorter = min(size)
    taken = [place(rng, size, round(rng.uniform(*TARGET_SCALE) * shorter), [])]
    others = []
    for _ in range(rng.randint(0, distractors)):
        box = place(rng, size, round(rng.uniform(*TARGET_SCALE) * shorter), taken)
        if box is not None:  # no room left: fewer distractors
            taken.append(box)
            kind, color = look_alike(rng, target)
            others.append(
                {"name": f"{color} {kind}", "boxes": [normalised(paint(image, kind, box, COLORS[color]), size)]}
            )
    kind, color = target
    x1, y1, x2, y2 = paint(image, kind, taken[0], COLORS[color])
    width, height = size
    name = f"{color} {kind}"
    row = {
        "id": f"grounding-{index:06d}",
        "question": rng.choice(QUESTIONS).format(name=name),
        "answer": f"the {name} is {position((x1 + x2) / 2 / width, (y1 + y2) / 2 / height)}",
        "boxes": [normalised((x1, y1, x2, y2), size)],
        "look_alikes": others,  # what else a question could name here, and where it is
    }
    return image, row


def normalised(box: Box, size: tuple[int, int]) -> list[float]:
    width, height = size
    x1, y1, x2, y2 = box
    return [round(x1 / width, 6), round(y1 / height, 6), round(x2 / width, 6), round(y2 / height, 6)]


def write_dataset(
    out_dir: str | Path, n: int, seed: int, size: tuple[int, int] = (224, 224), distractors: int = 2
) -> Path:
    """Writes `n` examples as out_dir/images/<id>.png and out_dir/manifest.jsonl; returns the manifest.

    Example i depends only on (seed, i), so a larger `n` extends a set without changing it. Image
    paths are absolute: the job resolves a relative path against its working directory, not the
    manifest's."""
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        image, row = make_example(random.Random(f"{seed}:{index}"), index, size, distractors)
        path = out / "images" / f"{row['id']}.png"
        image.save(path, format="PNG")
        lines.append(json.dumps({"id": row["id"], "image": str(path)} | row) + "\n")
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(lines))
    return manifest


def background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A light, low-saturation background: plain, or with fine grey noise."""
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.float64)
    pixels[:] = grey(rng, 175, 235)
    if rng.random() < 0.5:
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, rng.uniform(3.0, 10.0), (height, width, 1))
        pixels += noise
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def draw_clutter(rng: random.Random, image: Image.Image) -> None:
    """Small grey shapes (filled or outlined) and lines: things a question never asks about."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(rng.randint(*CLUTTER_COUNT)):
        side = max(3, round(rng.uniform(*CLUTTER_SCALE) * min(width, height)))
        x, y = rng.randrange(width - side), rng.randrange(height - side)
        color = grey(rng, 80, 200)
        kind = rng.choice(SHAPES + ("line",))
        if kind == "line":
            end = (rng.randrange(width), rng.randrange(height))
            draw.line([(x, y), end], fill=color, width=rng.randint(1, 3))
        elif rng.random() < 0.5:
            draw_shape(draw, kind, (x, y, x + side, y + side), fill=color)
        else:
            draw_shape(draw, kind, (x, y, x + side, y + side), outline=color, width=rng.randint(1, 2))


def grey(rng: random.Random, low: int, high: int) -> tuple[int, int, int]:
    """A grey of brightness in [low, high], tinted by at most 8 per channel."""
    value = rng.randint(low, high)
    return tuple(min(255, max(0, value + rng.randint(-8, 8))) for _ in range(3))


def place(rng: random.Random, size: tuple[int, int], side: int, taken: list[Box]) -> Box | None:
    """A side×side box inside the image, GAP pixels from its edges and from every taken box;
    None when 100 tries found no room."""
    width, height = size
    for _ in range(100):
        x, y = rng.randint(GAP, width - GAP - side), rng.randint(GAP, height - GAP - side)
        box = (x, y, x + side, y + side)
        if not any(overlaps(box, other) for other in taken):
            return box
    return None


def overlaps(a: Box, b: Box) -> bool:
    """Whether the boxes come closer than GAP pixels."""
    return a[0] < b[2] + GAP and b[0] < a[2] + GAP and a[1] < b[3] + GAP and b[1] < a[3] + GAP


def look_alike(rng: random.Random, target: tuple[str, str]) -> tuple[str, str]:
    """A distractor's (shape, colour): the target's colour or its shape, or neither, never both."""
    kind, color = target
    other_kind = rng.choice([k for k in SHAPES if k != kind])
    other_color = rng.choice([c for c in COLORS if c != color])
    return rng.choice([(other_kind, color), (kind, other_color), (other_kind, other_color)])


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: Box, **style) -> None:
    """Draws the shape filling the box; `style` is ImageDraw's (fill, outline, width)."""
    x1, y1, x2, y2 = box
    right, bottom = x2 - 1, y2 - 1  # ImageDraw's coordinates include the last pixel
    if kind == "circle":
        draw.ellipse((x1, y1, right, bottom), **style)
    elif kind == "square":
        draw.rectangle((x1, y1, right, bottom), **style)
    else:
        draw.polygon([((x1 + right) / 2, y1), (right, bottom), (x1, bottom)], **style)


def paint(image: Image.Image, kind: str, box: Box, color: tuple[int, int, int]) -> Box:
    """Fills the shape with exactly `color` (no antialiasing); returns its tight pixel box."""
    mask = Image.new("L", image.size, 0)
    draw_shape(ImageDraw.Draw(mask), kind, box, fill=255)
    image.paste(color, mask=mask)
    return mask.getbbox()


def position(x: float, y: float) -> str:
    """Where a point (normalised) lies, in thirds of the image: "at the top left", "in the center"…"""
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else None
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else None
    if vertical and horizontal:
        return f"at the {vertical} {horizontal}"
    if vertical:
        return f"at the {vertical}"
    if horizontal:
        return f"on the {horizontal}"
    return "in the center"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for images/ and manifest.jsonl")
    parser.add_argument("--n", required=True, type=int, help="number of examples")
    parser.add_argument("--seed", type=int, default=0, help="another seed, other examples (e.g. held out)")
    parser.add_argument(
        "--size",
        type=int,
        default=224,
        help="side of the square images, in pixels (224: 8×8 visual tokens of Qwen2.5-VL, 7×7 of Qwen3-VL)",
    )
    parser.add_argument("--distractors", type=int, default=2, help="at most this many look-alike shapes per image")
    args = parser.parse_args(argv)
    manifest = write_dataset(args.out, args.n, args.seed, (args.size, args.size), args.distractors)
    print(f"wrote {args.n} examples ({args.size}×{args.size}, seed {args.seed}) to {manifest}")


if __name__ == "__main__":
    main()
