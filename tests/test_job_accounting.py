"""The job's cost accounting end to end: per-row figures, the summary, the control rows, progress."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import JobConfig
from pipeline.infer import in_control_sample
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
        gpu_hourly_usd=2.5,
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
        "usd_per_1000_images": engine_s / 3600 * 2.5 / len(rows) * 1000,
        "usd_per_1000_images_unpruned_estimate": unpruned_s / 3600 * 2.5 / len(rows) * 1000,
        "control_rows": len(ok),
        "control_saving_measured": 1
        - sum(r["control_pruned_engine_s"] for r in ok) / sum(r["control_unpruned_engine_s"] for r in ok),
        "control_answer_agreement": sum(r["answer"] == r["control_unpruned_answer"] for r in ok) / len(ok),
    }
    for key, value in expected.items():
        assert written[key] == pytest.approx(value), key
        assert getattr(summary, key) == pytest.approx(value), key
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


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a sandboxed machine with no network: without them Chromium keeps dialling out.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PLOT_BLUE = (59, 125, 216)  # the colour of data in every plot


def test_report_renders_in_headless_chromium(controlled_job, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    from jobs.report import main as report_main

    assert Path(CHROMIUM).exists(), "the report test needs Chromium: apt-get install chromium"
    assert report_main([str(controlled_job.output), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for line in controlled_job.summary.lines():
        if not line.startswith("wall time"):
            assert line in printed

    errors = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1250, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((tmp_path / "report.html").as_uri(), wait_until="load")
        assert page.title().startswith("glimpse-batch report")
        images = page.locator("img")
        assert images.count() == 4
        for i in range(images.count()):
            image = images.nth(i)
            assert image.evaluate("e => e.complete && e.naturalWidth > 0 && e.naturalHeight > 0")
            shot = Image.open(io.BytesIO(image.screenshot())).convert("RGB")
            data_pixels = sum(1 for pixel in shot.getdata() if all(abs(a - b) < 12 for a, b in zip(pixel, PLOT_BLUE)))
            assert data_pixels > 20, f"plot {i} shows no data"
        page_shot = Image.open(io.BytesIO(page.screenshot(full_page=True)))
        browser.close()
    assert not errors, errors
    assert page_shot.height > 900


def test_report_refuses_a_folder_that_holds_no_job_output(tmp_path, capsys):
    from jobs.report import main as report_main

    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "someone-elses.parquet")
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert "holds no job output" in capsys.readouterr().err
