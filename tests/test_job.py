"""End-to-end: the Ray Data job on local Ray, with S3 served by moto on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.glimpse.__main__ import main as glimpse_cli
from pipeline.glimpse.sampling import SamplingParams
from pipeline.job import run
from pipeline.output import OutputError
from pipeline.storage import pyarrow_filesystem
from pipeline.summary import SUMMARY_FILE
from schemas import SCHEMA_METADATA_KEY, SCHEMA_VERSION
from tests.conftest import FIXTURE, fixture_cases, fixture_requests, write_fixture_manifest

MODEL = dict(model=str(FIXTURE / "base"), glimpse=str(FIXTURE / "glimpse"), max_new_tokens=8, batch_size=3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """What `python -m pipeline.glimpse` gives for the fixture cases: {id: line}."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    glimpse_cli(
        [
            "--model",
            MODEL["model"],
            "--glimpse",
            MODEL["glimpse"],
            "--requests",
            str(FIXTURE / "cases.json"),
            "--root",
            str(FIXTURE),
            "--max-new-tokens",
            "8",
            "--out",
            str(out),
        ]
    )
    return {line["id"]: line for line in map(json.loads, out.read_text().splitlines())}


def read_output(config: JobConfig) -> pa.Table:
    fs, path = pyarrow_filesystem(config.output, config.storage)
    return pq.read_table(path, filesystem=fs)


def assert_matches_reference(table: pa.Table, reference: dict, ids_to_case=lambda i: i):
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted({r["id"] for r in rows}), "an id appears twice"
    for row in rows:
        ref = reference[ids_to_case(row["id"])]
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["n_visual_kept"], row["n_visual_tokens"]) == (
            ref["answer"],
            ref["n_visual_kept"],
            ref["n_visual_tokens"],
        ), row["id"]
        assert row["pruned"] and row["finish_reason"] == ref["finish_reason"]
    return rows


def test_s3_manifest_images_and_output(ray_session, s3, reference):
    options, fs = s3
    fs.mkdir("corpus")
    for e in fixture_cases():
        for rel in e["case"]["images"]:
            fs.put(str(FIXTURE / rel), f"corpus/{rel}")
    manifest = pa.Table.from_pylist(
        [
            {"id": e["case"]["id"], "image": f"s3://corpus/{e['case']['images'][0]}", "question": e["case"]["question"]}
            for e in fixture_cases()
        ]
    )
    with fs.open("corpus/manifest.parquet", "wb") as f:
        pq.write_table(manifest, f)
    config = JobConfig(manifest="s3://corpus/manifest.parquet", output="s3://corpus/out", storage=options, **MODEL)
    summary = run(config)
    table = read_output(config)
    rows = assert_matches_reference(table, reference)
    assert len(rows) == summary.rows == summary.rows_ok == 5
    assert table.schema.metadata[SCHEMA_METADATA_KEY] == SCHEMA_VERSION.encode()
    assert json.loads(fs.cat(f"corpus/out/{SUMMARY_FILE}"))["visual_tokens_kept"] == sum(
        r["n_visual_kept"] for r in reference.values()
    )
    with pytest.raises(OutputError, match="--overwrite"):
        run(config)


def write_cases(directory: Path, kind: str) -> str:
    rows = [
        {
            "id": e["case"]["id"],
            "images": [str(FIXTURE / p) for p in e["case"]["images"]],
            "question": e["case"]["question"],
        }
        for e in fixture_cases()
    ]
    path = directory / f"manifest.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # csv: one image per row, in an `image` column
        lines = ["id,image,question"] + [f"{r['id']},{r['images'][0]},{r['question']}" for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_local_manifests(ray_session, reference, tmp_path, kind):
    config = JobConfig(manifest=write_cases(tmp_path, kind), output=str(tmp_path / "out"), **MODEL)
    run(config)
    assert len(assert_matches_reference(read_output(config), reference)) == 5


def test_images_under_a_prefix_are_captioned(ray_session, tmp_path):
    config = JobConfig(
        images=str(FIXTURE / "images"), output=str(tmp_path / "out"), prompt="what is in the picture", **MODEL
    )
    run(config)
    rows = read_output(config).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(p.name for p in (FIXTURE / "images").iterdir())
    square = next(r for r in rows if r["id"] == "square.png")
    c1 = fixture_cases()[0]  # square.png with this very question
    assert square["question"] == c1["case"]["question"]
    assert square["n_visual_kept"] == sum(c1["glimpse"]["kept_masks"][0])


@pytest.mark.parametrize("with_ids", [True, False])
def test_a_saved_datasets_dataset(ray_session, reference, tmp_path, with_ids):
    import datasets

    cases = [e["case"] for e in fixture_cases()]
    columns = {
        "question": [c["question"] for c in cases],
        "image": [str(FIXTURE / c["images"][0]) for c in cases],
    }
    if with_ids:
        columns["id"] = [c["id"] for c in cases]
        # References as Hugging Face's VQAv2 holds them: records with the answer and its confidence.
        columns["answers"] = [[{"answer": f"{c['id']} ref", "answer_confidence": "yes"}] for c in cases]
    datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    config = JobConfig(dataset=str(tmp_path / "ds"), output=str(tmp_path / "out"), **MODEL)
    run(config)
    # Without an id column, the row index is the id.
    case_of = (lambda i: i) if with_ids else (lambda i: cases[int(i)]["id"])
    rows = assert_matches_reference(read_output(config), reference, case_of)
    assert len(rows) == 5
    if not with_ids:
        assert sorted(r["id"] for r in rows) == ["0", "1", "2", "3", "4"]
    else:
        assert all(r["references"] == [f"{r['id']} ref"] and r["metric"] == "exact" for r in rows)


def test_built_in_demo_runs_on_bundled_samples(ray_session, tmp_path):
    config = JobConfig(output=str(tmp_path / "out"), tiny_model_dir=str(tmp_path / "tiny"), max_new_tokens=4)
    summary = run(config)
    samples = json.loads((Path(__file__).parents[1] / "pipeline" / "samples" / "cases.json").read_text())
    assert summary.rows == summary.rows_ok == len(samples)
    rows = read_output(config).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(c["id"] for c in samples)
    assert all(r["n_generated_tokens"] == 4 or r["finish_reason"] == "stop" for r in rows)
    assert (tmp_path / "out" / SUMMARY_FILE).exists()


def test_workload_mode_fixes_keep_ratio_and_answer_length_under_a_cache_budget(ray_session, tmp_path, fixture_engine):
    """keep_ratio and ignore_eos through the job, rows prefilled two at a time and decoded in
    batches a tiny KV-cache budget splits: every row keeps exactly its share and answers exactly
    max_new_tokens tokens, the same tokens the engine gives it alone."""
    write_fixture_manifest(tmp_path / "m.parquet", copies=2)
    config = JobConfig(
        manifest=str(tmp_path / "m.parquet"),
        output=str(tmp_path / "out"),
        keep_ratio=0.25,
        ignore_eos=True,
        prefill_rows=2,
        kv_cache_gib=2 * 300 * fixture_engine.costs.kv_bytes_per_token() / 2**30,
        **{**MODEL, "batch_size": 10},
    )
    run(config)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert len(rows) == 10 and all(r["error"] is None for r in rows)
    saved = fixture_engine.selection
    fixture_engine.selection = saved.overridden(keep_ratio=0.25)
    try:
        alone = {}
        for request in fixture_requests():
            request.sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
            alone[request.id] = fixture_engine.generate([request])[0]
    finally:
        fixture_engine.selection = saved
    for row in rows:
        expected = alone[row["id"].rsplit("-", 1)[0]]
        assert row["n_generated_tokens"] == 8 and row["finish_reason"] == "length"
        assert row["n_visual_kept"] == max(1, round(0.25 * row["n_visual_tokens"]))
        assert row["answer"] == expected.answer, row["id"]


def test_preparation_runs_in_its_own_tasks_not_inside_the_answering_actors(ray_session, tmp_path, capsys):
    """Ray Data fuses stages that reserve the same resources; fused, the actor would prepare every
    image itself between engine calls. The optimized physical plan must keep the two apart."""
    from pipeline.job import build_dataset
    from pipeline.plan import cluster_gpus, locate, make_plan
    from pipeline.sources import read_source

    write_fixture_manifest(tmp_path / "m.parquet", 1)
    config = JobConfig(manifest=str(tmp_path / "m.parquet"), output=str(tmp_path / "out"), **MODEL)
    build_dataset(make_plan(config, *locate(config), cluster_gpus()), read_source(config)).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    answer_stage = next(line for line in optimized.splitlines() if "Answerer" in line)
    assert "ActorPoolMapOperator[MapBatches(Answerer)]" in answer_stage
    assert "TaskPoolMapOperator[MapBatches(prepare_batch)]" in optimized


def test_answer_stage_reservations_keep_preparation_apart(caplog):
    from pipeline.plan import locate, make_plan
    from pipeline.stages import AnswerStage

    def answer_stage(cluster_gpus: float, prepare_cpus: float) -> AnswerStage:
        config = JobConfig(prepare_cpus=prepare_cpus, **MODEL)
        return AnswerStage.from_plan(make_plan(config, *locate(config), cluster_gpus))

    assert (answer_stage(1, 1.0).num_gpus, answer_stage(1, 1.0).num_cpus) == (1.0, 0)
    assert (answer_stage(0, 0.5).num_gpus, answer_stage(0, 0.5).num_cpus) == (0, 1)
    assert not caplog.records
    answer_stage(0, 1.0)
    assert "prepare_cpus=1" in caplog.text
    env = answer_stage(1, 0.5).map_batches_kwargs()["runtime_env"]["env_vars"]
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
