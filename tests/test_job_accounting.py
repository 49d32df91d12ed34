"""The job's cost accounting end to end: per-row figures, the summary, the control rows, progress."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.control import in_control_sample
from pipeline.job import run
from pipeline.summary import SUMMARY_FILE
from tests.conftest import FIXTURE, fixture_requests, write_fixture_manifest

MODEL = dict(model=str(FIXTURE / "base"), glimpse=str(FIXTURE / "glimpse"), max_new_tokens=6, batch_size=3)


def write_manifest(path, copies: int = 2) -> list[str]:
    """Each fixture case `copies` times, plus one row whose image is missing; returns the ids."""
    rows = write_fixture_manifest(path, copies)
    rows.append({"id": "missing", "image": str(FIXTURE / "images" / "nope.png"), "question": "what"})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return [r["id"] for r in rows]


@pytest.fixture(scope="module")
def controlled_job(ray_session, tmp_path_factory):
    """A job with every row also run unpruned, a GPU price, and fast progress lines."""
    tmp = tmp_path_factory.mktemp("accounting")
    ids = write_manifest(tmp / "manifest.parquet")
    config = JobConfig(
        manifest=str(tmp / "manifest.parquet"),
        output=str(tmp / "out"),
        control_fraction=1.0,
        hourly_usd=2.5,
        progress_interval_s=0.05,
        **MODEL,
    )
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("pipeline.progress").addHandler(handler)
    logging.getLogger("pipeline.progress").setLevel(logging.INFO)
    try:
        summary = run(config)
    finally:
        logging.getLogger("pipeline.progress").removeHandler(handler)
    return SimpleNamespace(
        ids=ids,
        output=tmp / "out",
        rows=pq.read_table(tmp / "out").to_pylist(),
        summary=summary,
        written=json.loads((tmp / "out" / SUMMARY_FILE).read_text()),
        messages=[r.getMessage() for r in records],
    )


def test_every_row_carries_its_costs(controlled_job):
    ids, rows = controlled_job.ids, controlled_job.rows
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for row in rows:
        if row["error"] is not None:
            assert row["prefill_flops"] is None and row["engine_s"] is None
            continue
        # The glimpse and the VIP can cost more than pruning saves in prefill on a 4-layer model.
        assert row["prefill_flops"] > 0 and row["prefill_flops_unpruned"] > 0
        assert row["decode_flops"] <= row["decode_flops_unpruned"]
        assert row["kv_cache_bytes"] < row["kv_cache_bytes_unpruned"] or row["n_visual_kept"] == row["n_visual_tokens"]
        assert row["engine_s"] > 0


def test_summary_equals_figures_recomputed_from_the_rows(controlled_job):
    rows, summary, written = controlled_job.rows, controlled_job.summary, controlled_job.written
    ok = [r for r in rows if r["error"] is None]
    ratios = [r["n_visual_kept"] / r["n_visual_tokens"] for r in ok]
    flops = sum(r["prefill_flops"] + r["decode_flops"] for r in ok)
    flops_unpruned = sum(r["prefill_flops_unpruned"] + r["decode_flops_unpruned"] for r in ok)
    engine_s = sum(r["engine_s"] for r in ok)
    unpruned_s = sum(
        r["engine_s"]
        * (r["prefill_flops_unpruned"] + r["decode_flops_unpruned"])
        / (r["prefill_flops"] + r["decode_flops"])
        for r in ok
    )
    expected = {
        "rows": len(rows),
        "rows_ok": len(ok),
        "rows_failed": 1,
        "visual_tokens": sum(r["n_visual_tokens"] for r in ok),
        "visual_tokens_kept": sum(r["n_visual_kept"] for r in ok),
        "visual_tokens_saved": sum(r["n_visual_tokens"] - r["n_visual_kept"] for r in ok),
        "prompt_tokens_kept": sum(r["n_prompt_tokens_kept"] for r in ok),
        "generated_tokens": sum(r["n_generated_tokens"] for r in ok),
        "keep_ratio_mean": sum(ratios) / len(ratios),
        "keep_ratio_p50": float(np.median(ratios)),
        "keep_ratio_p99": float(np.percentile(ratios, 99)),
        "flops_saved": flops_unpruned - flops,
        "kv_cache_bytes_saved": sum(r["kv_cache_bytes_unpruned"] - r["kv_cache_bytes"] for r in ok),
        "engine_s": engine_s,
        "usd_per_1000_rows": engine_s / 3600 * 2.5 / len(ok) * 1000,
        "usd_per_1000_rows_unpruned_estimate": unpruned_s / 3600 * 2.5 / len(ok) * 1000,
        "billed_usd": written["wall_s"] / 3600 * 1 * 2.5,  # one CPU actor
        "engine_usd": engine_s / 3600 * 2.5,
    }
    control = {
        "rows": len(ok),
        "engine_s_unpruned": sum(r["control_unpruned_engine_s"] for r in ok),
        "saving": 1 - sum(r["control_pruned_engine_s"] for r in ok) / sum(r["control_unpruned_engine_s"] for r in ok),
        "agreement": sum(r["answer"] == r["control_unpruned_answer"] for r in ok) / len(ok),
    }
    for key, value in expected.items():
        assert written[key] == pytest.approx(value), key
        assert getattr(summary, key) == pytest.approx(value), key
    for key, value in control.items():
        recorded = written["control"][key]
        assert (recorded["value"] if isinstance(recorded, dict) else recorded) == pytest.approx(value), key
    assert (
        written["control"]["saving"]["low"]
        <= written["control"]["saving"]["value"]
        <= written["control"]["saving"]["high"]
    )
    assert written["device"] == "CPU" and written["devices"] == 1
    assert written["kv_cache_bytes_saved"] > 0
    assert written["rows_per_s"] == pytest.approx(len(rows) / written["wall_s"])


def test_control_rows_carry_the_unpruned_answer(controlled_job, fixture_engine):
    rows = controlled_job.rows
    baseline = {r.id: r for r in fixture_engine.generate(fixture_requests(6), prune=False)}
    for row in rows:
        if row["error"] is None:
            expected = baseline[row["id"].rsplit("-", 1)[0]]
            assert row["control_unpruned_answer"] == expected.answer, row["id"]
            assert row["control_unpruned_generated_tokens"] == expected.n_generated_tokens
            assert row["control_pruned_engine_s"] > 0 and row["control_unpruned_engine_s"] > 0


def test_progress_lines_while_the_job_runs(controlled_job):
    lines = [m for m in controlled_job.messages if m.startswith("progress: ")]
    assert lines, controlled_job.messages
    assert lines[-1].startswith(f"progress: {len(controlled_job.ids)} rows done (1 failed)")
    assert "rows/s, visual tokens saved" in lines[-1]
    busy = float(lines[-1].rsplit("engine busy ", 1)[1].rstrip("%")) / 100
    assert 0 < busy <= 1
    assert controlled_job.summary.engine_busy_fraction == pytest.approx(busy, abs=0.01)
    assert controlled_job.written["engine_busy_fraction"] == controlled_job.summary.engine_busy_fraction


def test_control_sample_is_deterministic_and_about_the_fraction():
    ids = [f"row-{i}" for i in range(4000)]
    chosen = [i for i in ids if in_control_sample(i, 0.1)]
    assert chosen == [i for i in ids if in_control_sample(i, 0.1)]
    assert 300 < len(chosen) < 500
    assert set(chosen) <= {i for i in ids if in_control_sample(i, 0.2)}
    assert not any(in_control_sample(i, 0.0) for i in ids)
