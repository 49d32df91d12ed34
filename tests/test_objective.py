"""The training objective against what the release computes (fixture: train_expected.json)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.glimpse import objective
from pipeline.glimpse.objective import Example, GlimpseObjective, LossWeights, load_examples, ref_token_mask
from tests.conftest import FIXTURE

EXPECTED = json.loads((FIXTURE / "train_expected.json").read_text())


def test_the_command_reproduces_every_fixture_entry_alone_and_batched(tmp_path):
    lines = []
    for batch_size in (1, 4):
        out = tmp_path / f"b{batch_size}.jsonl"
        args = ["--model", str(FIXTURE / "base"), "--glimpse", str(FIXTURE / "glimpse")]
        args += ["--cases", str(FIXTURE / "train_cases.json"), "--root", str(FIXTURE)]
        assert objective.main([*args, "--batch-size", str(batch_size), "--out", str(out)]) == 0
        lines += [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(EXPECTED) == 5
    for got, want in zip(lines, EXPECTED):
        assert got["ids"] == want["ids"]
        assert got["ref_token_masks"] == want["ref_token_masks"]
        for key in ("loc_loss", "le_loss", "loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (got["ids"], key)


@pytest.fixture(scope="module")
def tiny():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.glimpse.modules import GlimpseModules
    from pipeline.glimpse.prompts import PromptBuilder

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(FIXTURE / "base", dtype=torch.float32)
    prompts = PromptBuilder.from_pretrained(FIXTURE / "base", model.config)
    modules = GlimpseModules.load(FIXTURE / "glimpse", model.config)
    return model, prompts, modules


def test_training_inputs_are_the_release_collators(tiny):
    _, prompts, _ = tiny
    examples = load_examples(FIXTURE / "train_cases.json", FIXTURE, prompts)
    for example, want in zip(examples, EXPECTED):
        assert example.prompt.prompt.input_ids.tolist() == want["input_ids"][0]
        labelled = [i for i, label in enumerate(want["labels"][0]) if label != -100]
        assert example.prompt.answer_start == labelled[0]
        assert labelled == list(range(labelled[0], len(want["labels"][0])))


def test_gradients_reach_the_glimpse_modules_only(tiny):
    model, prompts, modules = tiny
    examples = load_examples(FIXTURE / "train_cases.json", FIXTURE, prompts)[:2]
    loss = GlimpseObjective(model, modules, 0)(examples).loss
    loss.backward()
    trainable = dict(modules.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    for name in ("learnable_embeddings", "le_proj.weight", "le_norm.weight", "attn_fuser.attn_in_proj.weight"):
        assert trainable[name].grad is not None and trainable[name].grad.abs().sum() > 0, name
    # Every glimpse embedding is used: each layer's entry gets a gradient.
    assert (trainable["learnable_embeddings"].grad.abs().sum(dim=(1, 2)) > 0).all()
    modules.zero_grad()


def test_without_the_language_loss_only_the_localisation_counts(tiny):
    model, prompts, modules = tiny
    examples = load_examples(FIXTURE / "train_cases.json", FIXTURE, prompts)[:1]
    with torch.no_grad():
        out = GlimpseObjective(model, modules, 0, LossWeights(le=0.0))(examples)
    assert out.le_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(EXPECTED[0]["loc_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "boxes, grid, cells",
    [
        ([[0.0, 0.0, 1.0, 1.0]], (2, 3), [1, 1, 1, 1, 1, 1]),
        ([[0.5, 0.5, 0.5, 0.5]], (2, 2), [0, 0, 0, 1]),  # a point still covers its cell
        ([[0.0, 0.0, 0.49, 0.49]], (2, 2), [1, 0, 0, 0]),
        ([[0.0, 0.0, 0.1, 0.1], [0.9, 0.9, 1.0, 1.0]], (2, 2), [1, 0, 0, 1]),
        ([], (2, 2), [0, 0, 0, 0]),
    ],
)
def test_box_token_masks(boxes, grid, cells):
    assert ref_token_mask(boxes, grid).int().tolist() == cells


def test_examples_with_two_images_are_refused(tiny):
    model, prompts, modules = tiny
    from PIL import Image

    with Image.open(FIXTURE / "images" / "small.png") as image:
        prompt = prompts.training([image, image], "where is the cat", "here")
    with pytest.raises(ValueError, match="exactly one image"):
        GlimpseObjective(model, modules, 0)([Example("x", prompt, [[0, 0, 1, 1]])])


def test_the_training_job_puts_the_glimpse_where_inference_does(tiny):
    """The release counts three tokens after the last <|im_start|>: the generation header in
    Qwen's tokenizer, but inside it in the fixture's, which splits `assistant`. The training job
    trains the glimpse at the end of the generation header, where inference puts it."""
    _, prompts, _ = tiny
    from PIL import Image

    with Image.open(FIXTURE / "images" / "square.png") as image:
        at_prompt_end = prompts.training([image], "where is the cat", "on the mat")
        as_released = prompts.training([image], "where is the cat", "on the mat", "release")
        inference = prompts([image], "where is the cat")
    assert at_prompt_end.answer_start == len(inference.input_ids)
    assert at_prompt_end.prompt.input_ids[: len(inference.input_ids)].equal(inference.input_ids)
    assert as_released.answer_start < at_prompt_end.answer_start
    with pytest.raises(ValueError, match="answer_start"):
        prompts.training([image], "q", "a", "elsewhere")


def test_the_command_refuses_unusable_cases_in_one_line(tmp_path, capsys):
    cases = json.loads((FIXTURE / "train_cases.json").read_text())
    broken = {
        "missing image": [{**cases[0], "image": "images/nope.png"}],
        "bad box": [{**cases[0], "boxes": [[-0.5, 0, 1, 1]]}],
        "two images": [{k: v for k, v in cases[0].items() if k != "image"} | {"images": ["a", "b"]}],
        "no cases": [],
    }
    for name, content in broken.items():
        path = tmp_path / "cases.json"
        path.write_text(json.dumps(content))
        args = ["--model", str(FIXTURE / "base"), "--glimpse", str(FIXTURE / "glimpse"), "--cases", str(path)]
        with pytest.raises(SystemExit) as exit_:
            objective.main([*args, "--root", str(FIXTURE), "--out", str(tmp_path / "o.jsonl")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), (name, err)


def test_a_negative_box_edge_clamps_to_the_grid_rather_than_wrapping():
    assert ref_token_mask([[-0.5, -0.5, 0.2, 0.2]], (4, 4)).view(4, 4)[0, 0]
    assert ref_token_mask([[-0.5, -0.5, 0.2, 0.2]], (4, 4)).sum() == 1
