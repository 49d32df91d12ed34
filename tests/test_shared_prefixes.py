"""Many questions per image: rows that share an image prefix prefill it once, and answer exactly as
they would alone (fp32: greedy tokens and kept masks), pruned and not, in batches that mix shared and
unshared rows; their costs split the prefix evenly, as FlopCounterMode counts."""

from __future__ import annotations

from dataclasses import replace

import pytest
from torch.utils.flop_counter import FlopCounterMode

from pipeline.glimpse.engine import GlimpseEngine, Request
from pipeline.glimpse.prefixes import prefill_chunks, shared_prefixes
from pipeline.glimpse.sampling import SamplingParams
from tests.conftest import FIXTURE, fixture_requests
from tests.test_engine import noise_image

QUESTIONS = ["what is in the picture", "where is the red square", "describe it"]


def questions_per_image(requests: list[Request], questions=QUESTIONS, max_new_tokens: int = 8) -> list[Request]:
    return [
        Request(f"{r.id}-{i}", r.images, q, SamplingParams(max_new_tokens=max_new_tokens))
        for r in requests
        for i, q in enumerate(questions)
    ]


def answer(engine: GlimpseEngine, requests: list[Request], share: bool, prune: bool, **batching):
    engine.share_prefixes = share
    try:
        prompts = [engine.prepare(r) for r in requests]
        return engine.generate_prepared(requests, prompts, prune, emit_masks=True, **batching)
    finally:
        engine.share_prefixes = True


def images_per_vision_run(engine: GlimpseEngine, requests: list[Request], **kwargs) -> tuple[list, list[int]]:
    """The engine's results, and the images of each run of its vision tower while it answered."""
    runs: list[int] = []
    hook = engine.model.model.visual.register_forward_hook(
        lambda _module, _args, kwargs, _out: runs.append(len(kwargs["grid_thw"])), with_kwargs=True
    )
    try:
        return answer(engine, requests, **kwargs), runs
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def engine():
    return GlimpseEngine.from_pretrained(FIXTURE / "base", FIXTURE / "glimpse")


@pytest.mark.parametrize("prune", [True, False])
def test_shared_prefixes_answer_exactly_as_unshared_and_alone(engine, prune):
    """Three questions about each of four fixture images, and one image asked once: a batch mixing
    shared and unshared rows. The vision tower runs once, on each image once."""
    fixture = fixture_requests(8)
    requests = [*questions_per_image(fixture[:4]), fixture[4]]
    unshared, runs = images_per_vision_run(engine, requests, share=False, prune=prune)
    assert runs == [len(requests)]
    shared, runs = images_per_vision_run(engine, requests, share=True, prune=prune)
    assert runs == [4, 1]  # the sharing rows' chunk, then the lone row's own
    for request, a, b in zip(requests, unshared, shared):
        assert b.new_tokens == a.new_tokens, request.id
        assert b.kept_mask == a.kept_mask and b.n_visual_kept == a.n_visual_kept, request.id
        assert b.prefix_shared_by == (1 if request is fixture[4] else 3)
        assert a.prefix_shared_by == 1
    for request, b in zip(requests[::4], shared[::4]):
        (alone,) = answer(engine, [request], share=True, prune=prune)
        assert alone.new_tokens == b.new_tokens and alone.kept_mask == b.kept_mask, request.id


def test_the_fixture_questions_asked_twice_keep_the_release_masks(engine):
    """Each fixture case asked twice in one batch: both copies prune exactly as the release does."""
    from tests.conftest import fixture_cases

    fixture = fixture_requests(4)
    requests = [replace(r, id=f"{r.id}-{i}") for r in fixture for i in range(2)]
    results = answer(engine, requests, share=True, prune=True)
    expected = {e["case"]["id"]: e["glimpse"] for e in fixture_cases()}
    for request, result in zip(requests, results):
        case = expected[request.id.rsplit("-", 1)[0]]
        assert result.prefix_shared_by == 2
        assert result.kept_mask == [int(k) for mask in case["kept_masks"] for k in mask], request.id
        assert result.new_tokens == case["new_tokens"][: len(result.new_tokens)], request.id


def test_chunks_under_a_cache_budget_keep_the_sharing_rows_together(engine):
    """Prefilled four rows at a time, decoded under a small KV-cache budget: the same answers, and
    the rows of one image still share (they are ordered next to each other: images of 64, 84 and 99
    tokens asked twice, then one of 256 asked once, make chunks of 4 and 3 rows)."""
    fixture = fixture_requests(8)
    requests = [*questions_per_image(fixture[:3], QUESTIONS[:2]), fixture[3]]
    reference = answer(engine, requests, share=False, prune=True)
    budget = 3 * 120 * engine.costs.kv_bytes_per_token()
    chunked = answer(engine, requests, share=True, prune=True, prefill_rows=4, cache_budget_bytes=budget)
    assert [r.new_tokens for r in chunked] == [r.new_tokens for r in reference]
    assert [r.prefix_shared_by for r in chunked[:6]] == [2] * 6


def test_only_equal_images_and_text_share_a_prefix(tiny_checkpoint):
    engine = GlimpseEngine.from_pretrained(tiny_checkpoint / "base", tiny_checkpoint / "glimpse")
    a, b, c = noise_image(60, 60, 1), noise_image(200, 90, 2), noise_image(60, 60, 3)
    requests = [
        Request("ab-1", [a, b], "describe"),
        Request("ab-2", [a, b], "what differs"),
        Request("ac", [a, c], "describe"),  # not ab's prefix: another second image
        Request("cb", [c, b], "describe"),  # c has a's size: equal tokens, other pixels
        Request("a", [a], "describe"),
    ]
    prompts = [engine.prepare(r) for r in requests]
    shared = shared_prefixes(prompts, engine.image_token_id)
    assert shared.of_row == [0, 0, 1, 2, 3]
    assert shared_prefixes(prompts[2:], engine.image_token_id) is None
    for prune in (True, False):
        unshared = answer(engine, requests, share=False, prune=prune)
        both = answer(engine, requests, share=True, prune=prune)
        assert [r.new_tokens for r in both] == [r.new_tokens for r in unshared]
        assert [r.kept_mask for r in both] == [r.kept_mask for r in unshared]


def test_prefill_chunks_keep_groups_whole_and_lone_rows_apart(engine):
    fixture = fixture_requests(4)
    requests = [
        Request("long-q", fixture[0].images, "what is in the picture and where is everything in it"),
        Request("other", fixture[4].images, "hi"),
        Request("short-q", fixture[0].images, "what"),
        Request("third-q", fixture[0].images, "why"),
        Request("second", fixture[1].images, "hi"),
    ]
    prompts = [engine.prepare(r) for r in requests]
    chunks = prefill_chunks(prompts, engine.image_token_id, rows_per_chunk=2)
    rows = [chunk for chunk, _ in chunks]
    assert sorted(rows[0]) == [0, 2, 3]  # a chunk of 2 grows to the group's end
    assert [shared.of_row for _, shared in chunks[:1]] == [[0, 0, 0]]
    assert sorted(r for chunk in rows[1:] for r in chunk) == [1, 4] and all(s is None for _, s in chunks[1:])
    alone = prefill_chunks(prompts, None, rows_per_chunk=2)
    order = sorted(range(5), key=lambda i: len(prompts[i].input_ids))
    assert [chunk for chunk, _ in alone] == [order[:2], order[2:4], order[4:]]


@pytest.mark.parametrize("prune", [True, False])
def test_shared_costs_split_the_prefix_as_flop_counter_counts(prune):
    """Eager attention (FlopCounterMode does not see inside CPU SDPA kernels); questions of one
    length and a fixed keep ratio, so that no row pads: the batch's counted FLOPs equal the sum of
    its rows' prefill costs, each carrying a third of the prefix."""
    engine = GlimpseEngine.from_pretrained(FIXTURE / "base", FIXTURE / "glimpse", attn_implementation="eager")
    engine.selection = engine.selection.overridden(keep_ratio=0.25)
    image = fixture_requests(1)[3].images
    questions = ["where is the red one", "where is the blue one", "where is the green one"]
    requests = [Request(f"q{i}", image, q, SamplingParams(max_new_tokens=1)) for i, q in enumerate(questions)]
    prompts = [engine.prepare(r) for r in requests]
    assert len({len(p.input_ids) for p in prompts}) == 1, "the questions must tokenize to one length"
    with FlopCounterMode(display=False) as counter:
        results = engine.generate_prepared(requests, prompts, prune)
    assert [r.prefix_shared_by for r in results] == [3, 3, 3]
    counted = counter.get_total_flops()
    assert sum(r.cost.prefill_flops for r in results) == pytest.approx(counted, rel=0.01)
    alone = sum(r.cost.prefill_flops_unshared for r in results)
    assert alone > 2 * counted  # the vision tower and the image's keys, once instead of three times
    assert len({round(r.cost.prefill_flops) for r in results}) == 1


def test_engine_counts_the_images_it_encodes(engine):
    before = engine.images_encoded
    fixture = fixture_requests(2)
    engine.generate(questions_per_image(fixture[:2]), batch_size=6)
    assert engine.images_encoded - before == 2
    engine.generate(questions_per_image(fixture[:2]), batch_size=6, prune=False)
    assert engine.images_encoded - before == 4


FIVE_QUESTIONS = [*QUESTIONS, "how many shapes are there", "what colour is the background"]


def five_questions_manifest(path, interleaved: bool) -> list[dict]:
    """Five questions about each fixture image: grouped by image, or question by question."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import fixture_cases

    images = [str(FIXTURE / e["case"]["images"][0]) for e in fixture_cases()]
    pairs = [(i, q) for q in range(5) for i in range(len(images))] if interleaved else None
    pairs = pairs or [(i, q) for i in range(len(images)) for q in range(5)]
    rows = [{"id": f"img{i}-q{q}", "image": images[i], "question": FIVE_QUESTIONS[q]} for i, q in pairs]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def job_rows(tmp_path, name: str, **options):
    import pyarrow.parquet as pq

    from pipeline.config import JobConfig
    from pipeline.job import run

    config = JobConfig(
        model=str(FIXTURE / "base"),
        glimpse=str(FIXTURE / "glimpse"),
        max_new_tokens=6,
        output=str(tmp_path / name),
        **options,
    )
    summary = run(config)
    return summary, {r["id"]: r for r in pq.read_table(tmp_path / name).to_pylist()}


@pytest.mark.parametrize("repartition", [False, True])
def test_a_job_encodes_each_image_once_for_its_five_questions(ray_session, tmp_path, repartition):
    """25 rows, five questions about each of five images. Grouped by image (the rows already lie
    together, or lie question by question and are repartitioned by image), each answer batch holds
    one image's five questions: the vision tower runs five times in all (counted by the engines),
    and every answer, kept count and cost equals the unshared run's (batches of one row)."""
    manifest = tmp_path / "manifest.parquet"
    five_questions_manifest(manifest, interleaved=repartition)
    blocks = dict(rows_per_block=5, prepare_batch_size=5, batch_size=5)
    shared, rows = job_rows(
        tmp_path, "shared", manifest=str(manifest), group_by_image=True, repartition_by_image=repartition, **blocks
    )
    alone, reference = job_rows(tmp_path, "alone", manifest=str(manifest), batch_size=1)
    assert shared.images_encoded == 5 and alone.images_encoded == 25
    assert shared.rows_sharing_prefix == 25 and alone.rows_sharing_prefix == 0
    for row_id, row in rows.items():
        expected = reference[row_id]
        assert (row["answer"], row["n_visual_kept"]) == (expected["answer"], expected["n_visual_kept"]), row_id
        assert row["prefix_shared_by"] == 5 and expected["prefix_shared_by"] == 1
        assert row["prefill_flops_unshared"] == pytest.approx(expected["prefill_flops"])
        assert row["prefill_flops"] < expected["prefill_flops"]
    assert shared.flops_unshared == pytest.approx(alone.flops)
    assert shared.flops < alone.flops
    # The headline's estimate is pruning's alone, not sharing's too: about the unshared run's.
    pruning = 1 - shared.engine_s_unshared_estimate / shared.engine_s_unpruned_estimate
    assert pruning == pytest.approx(1 - alone.flops / alone.flops_unpruned, abs=0.05)
    (flops,) = [line for line in shared.lines() if line.startswith("FLOPs")]
    assert "shared image prefixes" in flops and "shared image prefixes" not in next(
        line for line in alone.lines() if line.startswith("FLOPs")
    )


def test_without_grouping_rows_of_an_image_in_other_batches_do_not_share(ray_session, tmp_path):
    manifest = tmp_path / "manifest.parquet"
    five_questions_manifest(manifest, interleaved=True)
    summary, _ = job_rows(tmp_path, "out", manifest=str(manifest), rows_per_block=5, prepare_batch_size=5, batch_size=5)
    assert summary.images_encoded == 25 and summary.rows_sharing_prefix == 0


def test_a_datasets_input_groups_by_image_bytes(ray_session, tmp_path):
    """A `datasets` row names its image after its own id; grouping goes by the image's bytes."""
    import datasets

    from tests.conftest import fixture_cases

    images = [str(FIXTURE / e["case"]["images"][0]) for e in fixture_cases()[:2]]
    pairs = [(i, q) for q in range(3) for i in range(2)]  # question by question: images interleaved
    columns = {"id": [f"img{i}-q{q}" for i, q in pairs], "image": [images[i] for i, _ in pairs]}
    columns["question"] = [FIVE_QUESTIONS[q] for _, q in pairs]
    datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    options = dict(rows_per_block=6, prepare_batch_size=6, batch_size=6, group_by_image=True)
    summary, _ = job_rows(tmp_path, "out", dataset=str(tmp_path / "ds"), **options)
    assert summary.images_encoded == 2 and summary.rows_sharing_prefix == 6
