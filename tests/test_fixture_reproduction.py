"""The engine must reproduce what the original GlimpsePrune implementation gives, alone and batched."""

from __future__ import annotations

import json

import pytest

from pipeline.glimpse.__main__ import main as cli_main
from tests.conftest import FIXTURE, fixture_cases, fixture_requests


def check_against_expected(results, expected, pruned: bool):
    for result, entry in zip(results, expected, strict=True):
        assert result.id == entry["case"]["id"]
        branch = entry["glimpse" if pruned else "baseline"]
        assert result.new_tokens == branch["new_tokens"], result.id
        assert result.n_prompt_tokens == len(branch["prompt_ids"])
        if pruned:
            assert result.kept_mask == branch["kept_masks"][0], result.id
            assert result.n_visual_kept == sum(branch["kept_masks"][0])


@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("pruned", [True, False])
def test_matches_original_implementation(fixture_engine, batch_size, pruned):
    results = fixture_engine.generate(fixture_requests(), prune=pruned, emit_masks=True, batch_size=batch_size)
    check_against_expected(results, fixture_cases(), pruned)


@pytest.mark.parametrize("pruned", [True, False])
def test_each_case_twice_in_one_batch(fixture_engine, pruned):
    requests = fixture_requests() + fixture_requests()
    results = fixture_engine.generate(requests, prune=pruned, emit_masks=True, batch_size=len(requests))
    check_against_expected(results, fixture_cases() + fixture_cases(), pruned)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_cli_writes_expected_lines(tmp_path, batch_size):
    common = [
        "--model",
        str(FIXTURE / "base"),
        "--requests",
        str(FIXTURE / "cases.json"),
        "--root",
        str(FIXTURE),
        "--max-new-tokens",
        "8",
        "--batch-size",
        str(batch_size),
    ]
    pruned, baseline = tmp_path / "pruned.jsonl", tmp_path / "baseline.jsonl"
    cli_main(common + ["--glimpse", str(FIXTURE / "glimpse"), "--out", str(pruned), "--emit-masks"])
    cli_main(common + ["--glimpse", str(FIXTURE / "glimpse"), "--out", str(baseline), "--no-prune"])
    for path, branch in ((pruned, "glimpse"), (baseline, "baseline")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        for line, entry in zip(lines, fixture_cases(), strict=True):
            assert line["id"] == entry["case"]["id"]
            assert line["new_tokens"] == entry[branch]["new_tokens"]
            assert line["n_visual_tokens"] == entry[branch]["prompt_ids"].count(5)
            if branch == "glimpse":
                assert line["kept_mask"] == entry["glimpse"]["kept_masks"][0]
                assert line["n_visual_kept"] == sum(line["kept_mask"])
            else:
                assert "kept_mask" not in line
                assert line["n_visual_kept"] == line["n_visual_tokens"]
