"""The synthetic grounding data: deterministic per seed, boxes tight around the named target, and a
manifest the job reads from any working directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.sources import manifest_table
from pipeline.storage import StorageOptions
from pipeline.synthetic.grounding import COLORS, SHAPES, main, make_example, write_dataset


def rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def files(out: Path) -> dict[str, bytes]:
    """Every file under `out`, the manifest's absolute image paths made relative to `out`."""
    found = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    found["manifest.jsonl"] = found["manifest.jsonl"].replace(f"{out.resolve()}/".encode(), b"")
    return found


def target_mask(image: Image.Image, row: dict) -> np.ndarray:
    """Pixels of exactly the named target's colour."""
    color = next(name for name in COLORS if f" {name} " in f" {row['question']} ")
    return (np.asarray(image) == COLORS[color]).all(axis=-1)


def pixel_box(row: dict, size: tuple[int, int]) -> tuple[int, int, int, int]:
    (x1, y1, x2, y2), (width, height) = row["boxes"][0], size
    return round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height)


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    write_dataset(tmp_path / "a", 6, seed=3)
    write_dataset(tmp_path / "b", 6, seed=3)
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_other_seeds_draw_other_examples(tmp_path):
    a = rows(write_dataset(tmp_path / "a", 8, seed=0))
    b = rows(write_dataset(tmp_path / "b", 8, seed=1))
    assert [r["boxes"] for r in a] != [r["boxes"] for r in b]
    images = [(tmp_path / d / "images" / f"{r['id']}.png").read_bytes() for d, rs in (("a", a), ("b", b)) for r in rs]
    assert len(set(images)) == len(images)


def test_a_larger_set_extends_a_smaller_one(tmp_path):
    small = rows(write_dataset(tmp_path / "small", 3, seed=5))
    large = rows(write_dataset(tmp_path / "large", 5, seed=5))
    strip = [{k: v for k, v in r.items() if k != "image"} for r in large[:3]]
    assert strip == [{k: v for k, v in r.items() if k != "image"} for r in small]


@pytest.mark.parametrize("size", [(224, 224), (336, 280)])
def test_boxes_are_normalised_and_tight_around_the_target(size):
    for index in range(40):
        image, row = make_example(random.Random(index), index, size)
        assert image.size == size and image.mode == "RGB"
        [[x1, y1, x2, y2]] = row["boxes"]
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        left, top, right, bottom = pixel_box(row, size)
        assert 0.19 * min(size) <= right - left <= 0.36 * min(size)  # the target is 20-35% of the side
        inside = target_mask(image, row)[top:bottom, left:right]
        # The box is tight: the target's colour touches each of its four edges.
        assert inside[:, 0].any() and inside[:, -1].any() and inside[0].any() and inside[-1].any()


def test_without_distractors_all_of_the_targets_colour_is_in_its_box():
    for index in range(40):
        image, row = make_example(random.Random(index), index, distractors=0)
        mask = target_mask(image, row)
        left, top, right, bottom = pixel_box(row, image.size)
        assert mask.sum() == mask[top:bottom, left:right].sum() > 0


def test_distractors_share_the_targets_colour_or_shape_and_the_question_names_the_target():
    same_color_elsewhere = 0
    for index in range(60):
        image, row = make_example(random.Random(index), index, distractors=2)
        mask = target_mask(image, row)
        left, top, right, bottom = pixel_box(row, image.size)
        same_color_elsewhere += mask.sum() > mask[top:bottom, left:right].sum()
        color, shape = row["question"].split()[-2:]
        assert color in COLORS and shape in SHAPES
        assert row["answer"].startswith(f"the {color} {shape} is ")
    assert same_color_elsewhere >= 10  # the colour alone often does not find the target


def test_the_job_reads_the_manifest_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = write_dataset("data", 4, seed=0)
    monkeypatch.chdir("/")
    table = manifest_table(str(manifest), StorageOptions())
    assert table.column("error").to_pylist() == [None] * 4
    written = rows(manifest)
    assert table.column("id").to_pylist() == [r["id"] for r in written]
    assert table.column("question").to_pylist() == [r["question"] for r in written]
    for images in table.column("images").to_pylist():
        [path] = images
        assert Path(path).is_absolute() and Image.open(path).size == (224, 224)
    # manifest_table keeps the job's columns only; `answer` and `boxes` are in the file.
    assert all(len(r["boxes"]) == 1 and len(r["boxes"][0]) == 4 and r["answer"] for r in written)


def test_cli_writes_the_set_and_says_so(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n", "2", "--seed", "7", "--size", "112", "--distractors", "1"])
    assert "wrote 2 examples" in capsys.readouterr().out
    written = rows(tmp_path / "manifest.jsonl")
    assert [r["id"] for r in written] == ["grounding-000000", "grounding-000001"]
    assert all(Image.open(r["image"]).size == (112, 112) for r in written)
