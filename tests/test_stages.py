"""The two stages' workers driven directly, without Ray: prepare_batch on manifest rows, then
Answerer on what it prepared, checked against the release's outputs in the fixture."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.checkpoints import Checkpoint
from pipeline.infer import Answerer
from pipeline.prepare import prepare_batch
from pipeline.storage import StorageOptions
from schemas import MANIFEST_SCHEMA, PREPARED_SCHEMA, RESULT_SCHEMA, align
from tests.conftest import FIXTURE, fixture_cases, fixture_requests

MODEL = Checkpoint(str(FIXTURE / "base"), "local", None)
MODULES = Checkpoint(str(FIXTURE / "glimpse"), "local", None)
PREPARE = dict(
    model=MODEL,
    prompt="Describe the image.",
    max_new_tokens=4,
    storage=StorageOptions(),
    max_image_bytes=1 << 20,
    max_image_pixels=10_000_000,
    max_question_tokens=64,
)


def manifest_rows(extra: list[dict] = ()) -> pa.Table:
    rows = [
        {
            "id": e["case"]["id"],
            "images": [str(FIXTURE / p) for p in e["case"]["images"]],
            "question": e["case"]["question"],
        }
        for e in fixture_cases()
    ]
    return align(rows + list(extra), MANIFEST_SCHEMA)


@pytest.fixture(scope="module")
def prepared() -> pa.Table:
    broken = {"id": "broken", "images": [str(FIXTURE / "no-such.png")], "question": "what is it"}
    return prepare_batch(manifest_rows([broken]), **PREPARE)


def test_prepare_builds_the_release_prompts_and_marks_a_bad_row_alone(prepared):
    assert prepared.schema == PREPARED_SCHEMA
    rows = {row["id"]: row for row in prepared.to_pylist()}
    for case in fixture_cases():
        row = rows[case["case"]["id"]]
        assert row["error"] is None and row["max_new_tokens"] == 4
        assert row["input_ids"] == case["glimpse"]["prompt_ids"]
        assert row["image_grid_thw"] == [v for grid in case["glimpse"]["grid_thw"] for v in grid]
    assert rows["broken"]["error_code"] == "not_found" and rows["broken"]["input_ids"] is None


@pytest.mark.parametrize("prune", [True, False])
def test_answerer_answers_prepared_rows_as_the_engine_does(prepared, fixture_engine, prune):
    answerer = Answerer(MODEL, MODULES, StorageOptions(), prune=prune, dtype="float32")
    results = answerer(prepared)
    assert results.schema == RESULT_SCHEMA
    rows = {row["id"]: row for row in results.to_pylist()}
    alone = {r.id: r for r in fixture_engine.generate(fixture_requests(4), prune=prune)}
    for case in fixture_cases():
        row, expected = rows[case["case"]["id"]], alone[case["case"]["id"]]
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["n_generated_tokens"]) == (expected.answer, expected.n_generated_tokens)
        published = sum(map(sum, case["glimpse"]["kept_masks"])) if prune else row["n_visual_tokens"]
        assert row["n_visual_kept"] == published
        assert row["pruned"] is prune and row["glimpse_modules"] == (MODULES.location if prune else None)
    assert rows["broken"]["error_code"] == "not_found" and rows["broken"]["answer"] is None


def test_an_out_of_memory_batch_is_freed_before_its_halves_run(prepared, monkeypatch):
    """The halves must not run while the failed batch's traceback keeps its tensors alive."""
    import weakref

    import torch

    answerer = Answerer(MODEL, MODULES, StorageOptions(), prune=True, dtype="float32")
    generate, held, alive_at_retry = answerer.engine.generate_prepared, [], []

    def running_out_of_memory(requests, prompts, *args, **kwargs):
        activations = torch.zeros(1 << 16)  # what a batch holds when it runs out of memory
        alive_at_retry.append(sum(ref() is not None for ref in held))
        held.append(weakref.ref(activations))
        if len(requests) > 1:
            raise torch.OutOfMemoryError("injected")
        return generate(requests, prompts, *args, **kwargs)

    monkeypatch.setattr(answerer.engine, "generate_prepared", running_out_of_memory)
    good = prepared.filter(prepared.column("error").is_null())
    results = answerer(good)
    assert results.column("error").null_count == good.num_rows
    assert len(alive_at_retry) > good.num_rows and not any(alive_at_retry)
