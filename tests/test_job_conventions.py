"""The job as a new user meets it: mistakes answered at once in one line, a --help that
explains, the Python API of the README, and the lineage every output carries."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import OPTION_GROUPS
from pipeline.config import JobConfig
from tests.conftest import FIXTURE, write_fixture_manifest

REPO = Path(__file__).parents[1]
FAST_S = 3.0


def run_job(args: list[str], cwd: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.vqa", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, time.perf_counter() - started


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mistakes")
    (root / "a-file").write_text("not a directory")
    (root / "empty-prefix").mkdir()
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "hf-cache").mkdir()
    names = {"a-file": "a-file", "empty-prefix": "empty-prefix", "bad_yaml": "bad.yaml", "hf-cache": "hf-cache"}
    return {key: str(root / name) for key, name in names.items()} | {"root": str(root)}


MISTAKES = {
    "model directory missing": (["--model", "./no-such-dir"], "no such directory"),
    "hub id, offline, not cached": (["--model", "Qwen/Qwen2.5-VL-7B-Instruct"], "not in the local cache"),
    "modules hub id, not cached": (
        ["--model", str(FIXTURE / "base"), "--glimpse", "someone/glimpse-modules"],
        "not in the local cache",
    ),
    "manifest missing": (["--manifest", "{root}/nope.parquet"], "cannot read the manifest"),
    "manifest of unknown format": (["--manifest", "{a-file}"], "unknown format"),
    "empty image prefix": (["--images", "{empty-prefix}"], "no images"),
    "output is a file": (["--output", "{a-file}"], "is a file"),
    "keep ratio over 1": (["--max-keep-ratio", "2.0"], "max_keep_ratio"),
    "threshold nan": (["--threshold", "nan"], "threshold"),
    "negative min kept": (["--min-kept", "-1"], "min_kept"),
    "abbreviated option": (["--max-new-token", "4"], "unrecognized arguments: --max-new-token"),
    "config file missing": (["--config", "{root}/nope.yaml"], "cannot read the config file"),
    "config file not YAML": (["--config", "{bad_yaml}"], "not valid YAML"),
    "actor pool min over max": (["--num-actors", "3:1"], "num_actors"),
    "empty model location": (["--model", ""], "model: is empty"),
    "empty manifest location": (["--manifest", ""], "manifest: is empty"),
    "output on an unsupported scheme": (["--output", "gs://bucket/out"], "gs://"),
    "infinite KV budget": (["--kv-cache-gib", "inf"], "kv_cache_gib"),
    "Ray address that does not answer": (
        ["--model", str(FIXTURE / "base"), "--ray-address", "127.0.0.1:9"],
        "cannot join the Ray cluster",
    ),
    "Ray address of the wrong form": (
        ["--model", str(FIXTURE / "base"), "--ray-address", "http://127.0.0.1:9"],
        "cannot join the Ray cluster",
    ),
    "revision of a local directory": (
        ["--model", str(FIXTURE / "base"), "--model-revision", "main"],
        "revision",
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_mistake_is_one_error_line_and_exit_2_within_3_seconds(mistake, places, tmp_path):
    args, expected = MISTAKES[mistake]
    args = [a.format(**places) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    done, seconds = run_job(args, tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=places["hf-cache"])
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert seconds < FAST_S, f"{mistake}: answered in {seconds:.1f}s"
    assert not (tmp_path / "out").exists()


def test_an_actor_pool_this_machine_cannot_hold_is_refused_not_waited_for(tmp_path):
    """On a local Ray nothing will join: a pool bigger than the machine would wait forever."""
    done, _ = run_job(
        ["--model", str(FIXTURE / "base"), "--num-actors", "64", "--output", str(tmp_path / "out")], tmp_path
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("error: this machine cannot run the job: 64 answering actors"), done.stderr
    assert "Traceback" not in done.stderr


def test_help_groups_the_options_and_shows_their_defaults(tmp_path):
    done, _ = run_job(["--help"], tmp_path)
    assert done.returncode == 0
    text = done.stdout
    for title in [*OPTION_GROUPS, "this run"]:
        assert re.search(rf"^{re.escape(title)}:$", text, re.MULTILINE), title
    flat = " ".join(text.split())
    assert "answer length for rows that set none (default: 64)" in flat
    assert "--num-actors NUM_ACTORS" in text and "(default: 1)" in flat


def test_every_option_is_in_a_help_group():
    grouped = [name for names in OPTION_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(set(JobConfig.model_fields) - {"storage"})


def test_num_actors_takes_a_size_or_a_range():
    assert JobConfig(num_actors=3).actor_pool == (3, 3)
    assert JobConfig(num_actors="2:6").actor_pool == (2, 6)
    for bad in ("0", "4:2", "two", "1:"):
        with pytest.raises(ValueError):
            JobConfig.validated({"num_actors": bad})


def readme_python_example() -> str:
    """The first ```python block under the README's "Python API" heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_python_api_example_runs(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the example names the bundled samples by their path in the repository
    exec(compile(readme_python_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2, printed
    for line, name in zip(sorted(printed), ("cat_on_mat", "red_car")):
        assert re.fullmatch(rf"{name}: kept \d+ of \d+ visual tokens, answered ['\"].*['\"]", line), line


def test_build_processor_answers_a_dataset_like_the_job(ray_session, tmp_path):
    import ray.data

    from pipeline.api import build_processor
    from schemas import RESULT_SCHEMA

    rows = write_fixture_manifest(tmp_path / "m.parquet", 1)
    config = JobConfig(model=str(FIXTURE / "base"), glimpse=str(FIXTURE / "glimpse"), max_new_tokens=4)
    processor = build_processor(config)
    table = pa.concat_tables(processor(ray.data.from_items(rows)).iter_batches(batch_format="pyarrow", batch_size=None))
    assert table.schema.remove_metadata() == RESULT_SCHEMA.remove_metadata()
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert table.column("error").null_count == len(rows)
    kept, total = table.column("n_visual_kept").to_pylist(), table.column("n_visual_tokens").to_pylist()
    assert all(0 < k <= t for k, t in zip(kept, total)) and sum(kept) < sum(total)


def test_outputs_carry_their_lineage(ray_session, tmp_path):
    from pipeline.job import run

    write_fixture_manifest(tmp_path / "m.parquet", 1)
    out = tmp_path / "out"
    config = JobConfig(
        manifest=str(tmp_path / "m.parquet"),
        output=str(out),
        model=str(FIXTURE / "base"),
        glimpse=str(FIXTURE / "glimpse"),
        max_new_tokens=2,
        storage={"key": "AKIDSECRETKEY", "secret": "very-secret-value"},
    )
    run(config)
    summary = json.loads((out / "_summary.json").read_text())
    lineage = summary["lineage"]
    files = sorted(out.glob("*.parquet"))
    assert files
    for path in files:
        raw = pq.read_schema(path).metadata[b"glimpse_batch.lineage"]
        assert b"very-secret-value" not in raw and b"AKIDSECRETKEY" not in raw
        in_file = json.loads(raw)
        assert in_file["started_at"] <= in_file["written_at"] <= lineage["finished_at"]
        assert {k: v for k, v in in_file.items() if k != "written_at"} == {
            k: v for k, v in lineage.items() if k != "finished_at"
        }
    assert lineage["package"] == "glimpse-batch" and lineage["version"] not in ("", None)
    assert lineage["output"] == out.resolve().as_uri()
    assert lineage["model"]["location"] == str(FIXTURE / "base") and len(lineage["model"]["version"]) == 32
    assert lineage["glimpse_modules"]["location"] == str(FIXTURE / "glimpse")
    assert lineage["config"]["max_new_tokens"] == 2 and lineage["config"]["dtype"] == "float32"
    assert "key" not in lineage["config"]["storage"] and "secret" not in lineage["config"]["storage"]
    assert "very-secret-value" not in json.dumps(summary)
    names = pq.read_schema(files[0]).names
    assert "batch_prefill_s" in names and "prefill_s" not in names


def exported(port: int, name: str) -> dict[str, float]:
    """Our metric `name` as Ray exports it, summed over workers by its own tag (status, fate)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        found = re.match(rf"ray_{name}(?:_total)?{{(.*)}} ([0-9.e+]+)$", line)
        if found:
            tag = re.search(r'(?:status|fate)="(\w+)"', found.group(1))
            key = tag.group(1) if tag else ""
            totals[key] = totals.get(key, 0.0) + float(found.group(2))
    return totals


def test_answering_actors_export_ray_metrics(ray_session, tmp_path):
    from pipeline.job import run

    write_fixture_manifest(tmp_path / "m.parquet", 2)
    config = JobConfig(
        manifest=str(tmp_path / "m.parquet"),
        output=str(tmp_path / "out"),
        model=str(FIXTURE / "base"),
        glimpse=str(FIXTURE / "glimpse"),
        max_new_tokens=2,
    )
    summary = run(config)
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while True:
        rows = exported(ray_session, "glimpse_batch_rows")
        tokens = exported(ray_session, "glimpse_batch_visual_tokens")
        seconds = exported(ray_session, "glimpse_batch_engine_seconds")
        if rows.get("ok", 0) >= summary.rows_ok or time.monotonic() > deadline:
            break
        time.sleep(2)
    # Counters are per Ray session and other tests answer rows too: this job's are a lower bound.
    assert rows.get("ok", 0) >= summary.rows_ok > 0
    assert tokens.get("saved", 0) >= summary.visual_tokens_saved > 0
    assert tokens.get("kept", 0) >= summary.visual_tokens_kept > 0
    assert seconds.get("", 0) > 0
