"""References in, scores out: the manifest's reference columns, scores and kept masks in the job's
rows, a fixed number of control rows, and `jobs.score` over a finished output (local and S3)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.control import control_sample
from pipeline.job import run
from pipeline.keep_masks import pack, unpack
from pipeline.quality import default_metric, score
from pipeline.sources import InvalidRow, normalize_row, reference_list
from tests.conftest import FIXTURE, fixture_cases, new_bucket

MODEL = dict(model=str(FIXTURE / "base"), glimpse=str(FIXTURE / "glimpse"), max_new_tokens=6, batch_size=4)
TEN = ["2", "2", "two", "2", "2", "2", "3", "2", "2", "2"]


def manifest_rows() -> list[dict]:
    """Each fixture case twice: with ten VQA-style answers, with one `answer_ref`, or with none."""
    rows = []
    for i in range(2):
        for n, e in enumerate(fixture_cases()):
            row = {"id": f"{e['case']['id']}-{i}", "image": str(FIXTURE / e["case"]["images"][0])}
            row["question"] = e["case"]["question"]
            if n % 3 == 0:
                row["answers"] = TEN
            elif n % 3 == 1:
                row["answer_ref"] = "a red square"
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def scored_job(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scored")
    rows = manifest_rows()
    with open(tmp / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    config = JobConfig(
        manifest=str(tmp / "manifest.jsonl"),
        output=str(tmp / "out"),
        control_rows=3,
        keep_masks=True,
        hourly_usd=1.0,
        **MODEL,
    )
    summary = run(config)
    return SimpleNamespace(
        manifest=rows,
        output=tmp / "out",
        rows={r["id"]: r for r in pq.read_table(tmp / "out").to_pylist()},
        summary=summary,
        written=json.loads((tmp / "out" / "_summary.json").read_text()),
    )


def test_references_are_read_from_answers_or_answer_ref():
    assert reference_list(["2", "two"], None) == ["2", "two"]
    assert reference_list(None, "dog") == ["dog"]
    assert reference_list('["a", "b"]', None) == ["a", "b"]  # a CSV cell holding a JSON list
    assert reference_list("dog", None) == ["dog"]  # a CSV cell holding one answer
    assert reference_list("[citation needed]", None) == ["[citation needed]"]  # not JSON: one answer
    assert reference_list([1, 2.5], None) == ["1", "2.5"]  # Parquet numbers
    assert reference_list('["1", 2]', None) == ["1", "2"]  # CSV and JSON lines, numbers as written
    assert reference_list([], None) is None and reference_list(None, None) is None
    with pytest.raises(InvalidRow, match="both"):
        reference_list(["a"], "a")
    for bad in ([None, "red"], [True], '["a", null]', '[{"a": 1}]', {"a": 1}):
        with pytest.raises(InvalidRow, match="answers"):
            reference_list(bad, None)
    bad = normalize_row({"id": "x", "image": "a.png", "answers": {"a": 1}})
    assert bad["error_code"] == "invalid_row" and "answers" in bad["error"]


def test_every_answer_is_scored_against_its_references(scored_job):
    for given in scored_job.manifest:
        row = scored_job.rows[given["id"]]
        assert row["error"] is None
        references = given.get("answers") or ([given["answer_ref"]] if "answer_ref" in given else None)
        assert row["references"] == references
        if references is None:
            assert row["metric"] is None and row["score"] is None
            continue
        metric = default_metric(references)
        assert row["metric"] == ("vqa" if len(references) >= 3 else "exact") == metric
        assert row["score"] == score(metric, row["answer"], references)


def test_control_rows_are_the_fixed_sample_and_scored_unpruned(scored_job):
    controls = {i for i, r in scored_job.rows.items() if r["control_unpruned_engine_s"] is not None}
    assert controls == control_sample(list(scored_job.rows), 3)
    for row_id in controls:
        row = scored_job.rows[row_id]
        if row["references"]:
            assert row["control_unpruned_score"] == score(
                row["metric"], row["control_unpruned_answer"], row["references"]
            )
    assert all(r["control_unpruned_score"] is None for i, r in scored_job.rows.items() if i not in controls)
    assert scored_job.summary.control.rows == 3


def test_kept_masks_are_the_release_masks(scored_job):
    """The packed masks in the Parquet, unpacked, are the original implementation's (fp32)."""
    for e in fixture_cases():
        for i in range(2):
            row = scored_job.rows[f"{e['case']['id']}-{i}"]
            grids = [n for grid in e["glimpse"]["grid_thw"] for n in grid]
            assert row["image_grid_thw"] == grids
            masks = unpack(row["kept_mask"], row["image_grid_thw"])
            assert [m.ravel().astype(int).tolist() for m in masks] == [
                [int(k) for k in mask] for mask in e["glimpse"]["kept_masks"]
            ]
            assert sum(int(m.sum()) for m in masks) == row["n_visual_kept"]


def test_packed_masks_round_trip_and_refuse_a_wrong_grid():
    mask = [1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1]  # patch grids 1×4×4 and 1×4×8: token grids 1×2×2 and 1×2×4
    packed = pack(mask)
    assert len(packed) == 2
    first, second = unpack(packed, [1, 4, 4, 1, 4, 8])
    assert first.shape == (1, 2, 2) and second.shape == (1, 2, 4)
    assert np.concatenate([first.ravel(), second.ravel()]).astype(int).tolist() == mask
    with pytest.raises(ValueError, match="does not fit"):
        unpack(packed, [1, 8, 12])  # 24 tokens need 3 bytes


def test_summary_scores_by_keep_quartile(scored_job):
    summary, written = scored_job.summary, scored_job.written
    scored = [r for r in scored_job.rows.values() if r["score"] is not None]
    assert summary.scored_rows == len(scored) == written["scored_rows"]
    assert summary.score_mean == pytest.approx(sum(r["score"] for r in scored) / len(scored))
    assert summary.metrics == {"exact": 4, "vqa": 4}
    quartiles = summary.keep_quartiles
    assert len(quartiles) == 4 and sum(q.rows for q in quartiles) == len(scored_job.rows)
    assert sum(q.scored_rows for q in quartiles) == len(scored)
    assert sum(q.control_rows for q in quartiles) == 3
    ratios = sorted(r["n_visual_kept"] / r["n_visual_tokens"] for r in scored_job.rows.values())
    assert quartiles[0].keep_low == ratios[0] and quartiles[-1].keep_high == ratios[-1]
    control = summary.control
    agree = sum(
        r["answer"] == r["control_unpruned_answer"]
        for r in scored_job.rows.values()
        if r["control_unpruned_engine_s"] is not None
    )
    assert control.agreement.value == agree / 3 and control.agreement.n == 3
    assert not control.enough
    assert "too few control rows to conclude" in summary.headline()[0]


def test_control_rows_and_fraction_are_not_both_given():
    with pytest.raises(ValueError, match="not both"):
        JobConfig.validated({"control_rows": 3, "control_fraction": 0.5})


def _score_offline(scored_job, references_path, *args, capsys) -> tuple[int, str, str]:
    from jobs.score import main

    code = main([str(scored_job.output), "--references", str(references_path), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_score_scores_a_finished_output_offline(scored_job, tmp_path, capsys):
    """References matching half the answers exactly: those score 1, the others 0; the report's
    reader and the summary then give these scores, not the job's own."""
    from pipeline.output import OutputDir
    from pipeline.storage import StorageOptions
    from schemas import REPORT_COLUMNS

    ids = sorted(scored_job.rows)
    right = set(ids[::2])
    references = [
        {"id": i, "answer_ref": scored_job.rows[i]["answer"] if i in right else "nothing like it"} for i in ids[:-1]
    ]
    pq.write_table(pa.Table.from_pylist(references), tmp_path / "refs.parquet")
    code, out, err = _score_offline(scored_job, tmp_path / "refs.parquet", "--metric", "exact", capsys=capsys)
    assert code == 0, err
    assert f"scored {len(ids) - 1} of {len(ids)} rows" in out and "1 row has no reference there" in out
    assert "(1 of them lose the score the job gave them)" in out
    table = OutputDir(str(scored_job.output), StorageOptions()).read_results(REPORT_COLUMNS).to_pylist()
    by_id = {r["id"]: r for r in table}
    for i in ids[:-1]:
        assert by_id[i]["metric"] == "exact"
        assert by_id[i]["score"] == (1.0 if i in right else 0.0)
    assert by_id[ids[-1]]["score"] is None
    written = json.loads((scored_job.output / "_summary.json").read_text())
    assert written["scored_rows"] == len(ids) - 1
    assert written["score_mean"] == pytest.approx(len(right & set(ids[:-1])) / (len(ids) - 1))
    assert written["lineage"]["run_id"] == scored_job.written["lineage"]["run_id"]  # the job's record kept


def test_score_refuses_what_it_cannot_join(scored_job, tmp_path, capsys):
    (tmp_path / "other.jsonl").write_text('{"id": "elsewhere", "answer_ref": "x"}\n')
    code, _, err = _score_offline(scored_job, tmp_path / "other.jsonl", capsys=capsys)
    assert code == 2 and "has a reference" in err
    # A typo'd column (`answer`) gives no row a reference: refused, the job's scores kept.
    pq.write_table(pa.table({"id": ["c1-0"], "answer": ["x"]}), tmp_path / "typo.parquet")
    code, _, err = _score_offline(scored_job, tmp_path / "typo.parquet", capsys=capsys)
    assert code == 2 and "has a reference" in err
    (tmp_path / "nulls.jsonl").write_text('{"id": "c1-0", "answers": ["x", null]}\n')
    code, _, err = _score_offline(scored_job, tmp_path / "nulls.jsonl", capsys=capsys)
    assert code == 2 and "row c1-0" in err and "item 2" in err
    (tmp_path / "twice.jsonl").write_text('{"id": "c1-0", "answer_ref": "x"}\n{"id": "c1-0", "answer_ref": "y"}\n')
    code, _, err = _score_offline(scored_job, tmp_path / "twice.jsonl", capsys=capsys)
    assert code == 2 and "repeats" in err
    code, _, err = _score_offline(scored_job, tmp_path / "missing.jsonl", capsys=capsys)
    assert code == 2 and "missing.jsonl" in err
    from jobs.score import main

    assert main([str(tmp_path), "--references", str(tmp_path / "other.jsonl")]) == 2
    assert "holds no job output" in capsys.readouterr().err


def test_score_reads_only_the_references_of_a_manifest(scored_job, tmp_path, capsys):
    """The job's own kind of manifest, with a row whose image cell is wrong: its references still count."""
    rows = [{"id": "c1-0", "image": 5, "answer_ref": "x"}, {"id": "c2-0", "image": "a.png", "answers": ["y"]}]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = _score_offline(scored_job, tmp_path / "refs.jsonl", capsys=capsys)
    assert code == 0, err
    assert f"scored 2 of {len(scored_job.rows)} rows" in out


def test_score_refuses_an_unfinished_job(scored_job, tmp_path, capsys):
    import shutil

    running = shutil.copytree(scored_job.output, tmp_path / "running")
    record = json.loads((running / "_job.json").read_text())
    (running / "_job.json").write_text(json.dumps({**record, "state": "running"}))
    (tmp_path / "refs.jsonl").write_text('{"id": "c1-0", "answer_ref": "x"}\n')
    from jobs.score import main

    assert main([str(running), "--references", str(tmp_path / "refs.jsonl")]) == 2
    assert "has not finished" in capsys.readouterr().err


def test_score_on_s3(ray_session, s3, tmp_path, capsys, monkeypatch):
    """A job writing to S3 (moto), scored offline with references on S3."""
    from jobs.score import main
    from pipeline.output import OutputDir
    from schemas import REPORT_COLUMNS

    options, fs = s3
    bucket = new_bucket(fs)
    e = fixture_cases()[0]
    fs.put(str(FIXTURE / e["case"]["images"][0]), f"{bucket}/img.png")
    rows = [{"id": f"r{i}", "image": f"s3://{bucket}/img.png", "question": e["case"]["question"]} for i in range(3)]
    fs.pipe(f"{bucket}/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    output = f"s3://{bucket}/out"
    run(JobConfig(manifest=f"s3://{bucket}/manifest.jsonl", output=output, storage=options, **MODEL))
    answers = {r["id"]: r["answer"] for r in OutputDir(output, options).read_results(["id", "answer"]).to_pylist()}
    refs = [{"id": i, "answers": [a, a, a, "no"]} for i, a in answers.items()]
    fs.pipe(f"{bucket}/refs.jsonl", "".join(json.dumps(r) + "\n" for r in refs).encode())
    endpoint = ["--s3-endpoint-url", options.endpoint_url]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options.key.get_secret_value())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options.secret.get_secret_value())
    assert main([output, "--references", f"s3://{bucket}/refs.jsonl", *endpoint]) == 0, capsys.readouterr().err
    assert fs.exists(f"{bucket}/out/_scores.pq")
    scored = OutputDir(output, options).read_results(REPORT_COLUMNS).to_pylist()
    # vqa (4 references): 3 equal the answer, so each leave-one-out subset holds 2 or 3 matches.
    expected = (3 * min(1, 2 / 3) + 1 * min(1, 3 / 3)) / 4
    assert [(r["metric"], r["score"]) for r in scored] == [("vqa", pytest.approx(expected))] * 3
    assert json.loads(fs.cat(f"{bucket}/out/_summary.json"))["score_mean"] == pytest.approx(expected)


def test_an_output_of_the_previous_schema_reads_with_null_scores_and_masks(scored_job, tmp_path):
    """Outputs written before scores and masks existed still report: those columns read as null."""
    import shutil

    from pipeline.output import OutputDir
    from pipeline.storage import StorageOptions
    from schemas import REPORT_COLUMNS

    old = shutil.copytree(scored_job.output, tmp_path / "old")
    (old / "_scores.pq").unlink(missing_ok=True)
    added = ["references", "metric", "score", "control_unpruned_score", "kept_mask", "image_grid_thw"]
    for path in old.glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(added), path)
    table = OutputDir(str(old), StorageOptions()).read_results(REPORT_COLUMNS)
    assert table.num_rows == len(scored_job.rows)
    assert all(table.column(name).null_count == table.num_rows for name in added)


def test_control_rows_need_pruning():
    with pytest.raises(ValueError, match="need pruning"):
        JobConfig.validated({"control_rows": 3, "prune": False})
    with pytest.raises(ValueError, match="need pruning"):
        JobConfig.validated({"control_fraction": 0.5, "prune": False})


def test_a_row_without_a_mask_is_a_clear_error():
    with pytest.raises(ValueError, match="no kept mask"):
        unpack(None, [1, 4, 4])
    with pytest.raises(ValueError, match="not a grid of merged patches"):
        unpack(pack([1] * 4), [1, 3, 3])


def summary_of(rows: list[dict]):
    """The summary of hand-made result rows: defaults for what a test does not set."""
    from pipeline.summary import summarize
    from schemas import RESULT_SCHEMA, align

    base = dict(error=None, pruned=True, n_visual_tokens=100, n_visual_kept=20, n_prompt_tokens=120)
    base |= dict(n_prompt_tokens_kept=40, n_generated_tokens=5, engine_s=1.0, answer="a")
    base |= dict(prefill_flops=1.0, prefill_flops_unpruned=2.0, decode_flops=1.0, decode_flops_unpruned=1.0)
    base |= dict(kv_cache_bytes=10, kv_cache_bytes_unpruned=20)
    table = align([{**base, "id": f"r{i}", **row} for i, row in enumerate(rows)], RESULT_SCHEMA)
    return summarize(table, "out", 10.0, 1.0)


def test_a_measured_cost_reads_as_a_cost_with_its_own_interval():
    """Pruned runs slower on every control row: the saving is negative, so the headline says what
    it cost, and the interval it gives is of that cost (both bounds positive), covering the value."""
    control = dict(control_unpruned_answer="a", control_unpruned_generated_tokens=5)
    rows = [{**control, "control_pruned_engine_s": 1.0 + i / 10, "control_unpruned_engine_s": 1.0} for i in range(1, 6)]
    line = summary_of(rows).headline()[0]
    cost = re.search(
        r"cost (\S+)% more engine time \(measured on 5 control rows, ±(\S+)%, 95% CI (\S+)% to (\S+)%\)", line
    )
    assert cost, line
    value, plus_minus, low, high = map(float, cost.groups())
    assert value == pytest.approx(30.0) and 0 < low <= value <= high
    assert value - plus_minus <= low and high <= value + plus_minus


def test_an_estimated_cost_is_not_called_a_saving():
    line = summary_of([{"prefill_flops": 3.0}]).headline()[0]  # pruned costs more than unpruned
    assert "cost an estimated" in line and "saved an estimated -" not in line


def test_one_scored_control_row_keeps_its_difference():
    row = dict(control_unpruned_answer="b", control_pruned_engine_s=1.0, control_unpruned_engine_s=2.0)
    row |= dict(references=["a"], metric="exact", score=1.0, control_unpruned_score=0.0)
    line = summary_of([row]).headline()[1]
    assert "difference +1.000, no interval from one row" in line and "1 scored control row " in line


def test_when_every_row_failed_the_headline_says_so():
    summary = summary_of([{"error": "gone", "error_code": "not_found"}] * 3)
    assert summary.headline()[0] == "3 rows, none answered: nothing was pruned or compared"


def test_tied_keep_ratios_split_by_rank_into_quartiles():
    summary = summary_of([{"n_visual_kept": 10}] * 6 + [{"n_visual_kept": 90}] * 2)
    assert [q.rows for q in summary.keep_quartiles] == [2, 2, 2, 2]
    assert [q.keep_low for q in summary.keep_quartiles] == [0.1, 0.1, 0.1, 0.9]


def test_an_output_under_a_key_value_folder_reads_as_a_location(scored_job, tmp_path):
    """`…/model=qwen/out` is a path, not a hive partition adding a `model` column to the rows."""
    import os
    import shutil

    from pipeline.output import OutputDir, OutputError
    from pipeline.storage import StorageOptions
    from schemas import REPORT_COLUMNS

    copy = shutil.copytree(scored_job.output, tmp_path / "model=qwen" / "out")
    output = OutputDir(str(copy), StorageOptions())
    table = output.read_results(REPORT_COLUMNS)
    assert table.num_rows == len(scored_job.rows)
    assert "model" not in table.column_names and table.column("id").null_count == 0
    (copy / "_summary.json").unlink()
    os.mkfifo(copy / "_summary.json")  # would block a reader forever
    with pytest.raises(OutputError, match="not a regular file"):
        output.read_summary()
