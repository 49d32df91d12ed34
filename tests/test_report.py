"""The report: its gallery and page on synthetic rows, and a real job's report in headless Chromium."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.report import main as report_main
from pipeline import keep_masks
from pipeline.gallery import NO_MASKS, NONE_ASKED, build_gallery, fits_grid, stratified
from pipeline.output import RECORD_FILE, SCORES_FILE
from pipeline.report import PAGE, control_verdict, money, quartile_rows, render, write
from pipeline.storage import StorageOptions
from pipeline.summary import SUMMARY_FILE, summarize
from schemas import RESULT_SCHEMA, align

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
DIM = 0.3  # what the page promises: pruned tokens' pixels at 30%
TOLERANCE = 2  # rounding, in 8-bit levels


def synthetic_row(tmp_path: Path, i: int, grid: tuple[int, int], kept: list[int] | None, **overrides) -> dict:
    """An answered, pruned row with one random image of `grid` visual tokens (h, w) on disk."""
    h, w = grid
    path = tmp_path / f"image{i}.png"
    pixels = np.random.default_rng(i).integers(40, 255, (h * 28, w * 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    row = dict(
        id=f"row{i}",
        images=[str(path)],
        question="what is this?",
        answer="a cat",
        error=None,
        pruned=True,
        n_visual_tokens=h * w,
        n_visual_kept=sum(kept) if kept else h * w // 2,
        n_prompt_tokens=100,
        n_prompt_tokens_kept=90,
        n_generated_tokens=4,
        engine_s=0.1,
        prefill_flops=1e9,
        prefill_flops_unpruned=1.2e9,
        decode_flops=1e8,
        decode_flops_unpruned=1.1e8,
        kv_cache_bytes=1000,
        kv_cache_bytes_unpruned=1500,
        kept_mask=keep_masks.pack(kept) if kept else None,
        image_grid_thw=[1, 2 * h, 2 * w] if kept else None,
    )
    return {**row, **overrides}


def decode_data_uri(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")


def expected_picture(image_path: str, mask: np.ndarray, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """The original resized to whole cells, and where each pixel's token was kept: what the page must show."""
    h, w = mask.shape
    original = np.asarray(Image.open(image_path).convert("RGB").resize((w * cell, h * cell), Image.Resampling.BICUBIC))
    return original.astype(float), np.repeat(np.repeat(mask, cell, axis=0), cell, axis=1)


def assert_kept_lit_and_pruned_dimmed(shown: np.ndarray, original: np.ndarray, kept: np.ndarray) -> None:
    assert shown.shape == original.shape
    assert np.abs(shown[kept] - original[kept]).max() <= TOLERANCE, "a kept token's pixels changed"
    assert np.abs(shown[~kept] - DIM * original[~kept]).max() <= TOLERANCE, "a pruned token is not dimmed"


def test_stratified_sample_keeps_the_lowest_and_highest_keep_ratio():
    ratios = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05, 0.95, 0.55]
    ids = [f"r{i}" for i in range(len(ratios))]
    chosen = stratified(ratios, ids, 5)
    assert len(chosen) == len(set(chosen)) == 5
    assert chosen[0] == ratios.index(0.05) and chosen[-1] == ratios.index(0.95)
    assert [ratios[i] for i in chosen] == sorted(ratios[i] for i in chosen)
    assert sorted(stratified(ratios, ids, 50)) == list(range(len(ratios)))  # fewer rows than asked: all of them
    assert stratified([0.5, 0.5, 0.5], ["c", "a", "b"], 2) == [1, 0]  # ties by id, so the sample is stable


def test_gallery_draws_kept_tokens_lit_and_notes_what_it_cannot_show(tmp_path):
    mask = [1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1]  # a 3 × 4 grid
    rows = [
        synthetic_row(tmp_path, 0, (3, 4), mask),
        synthetic_row(tmp_path, 1, (3, 4), [1] * 12),
        synthetic_row(tmp_path, 2, (3, 4), mask, images=[str(tmp_path / "deleted.png")]),
        synthetic_row(tmp_path, 3, (3, 4), mask, images=[f"{tmp_path}/dataset#3"]),
        synthetic_row(tmp_path, 4, (3, 4), mask, image_grid_thw=[1, 2, 2]),  # a mask that fits no grid
        synthetic_row(tmp_path, 5, (3, 4), mask, pruned=False),  # unpruned rows have nothing to show
        synthetic_row(tmp_path, 6, (3, 4), mask, error="not_found", answer=None),
    ]
    gallery = build_gallery(align(rows, RESULT_SCHEMA), StorageOptions(), 8)
    assert gallery.note is None
    entries = {entry.id: entry for entry in gallery.entries}
    assert sorted(entries) == ["row0", "row1", "row2", "row3", "row4"]
    assert entries["row1"].keep_ratio == 1.0 and entries["row0"].keep_ratio == 0.5

    picture = entries["row0"].pictures[0]
    assert picture.cell == 320 // 4 and picture.bits == "".join(map(str, mask))
    original, kept = expected_picture(rows[0]["images"][0], np.array(mask, bool).reshape(3, 4), picture.cell)
    assert_kept_lit_and_pruned_dimmed(np.asarray(decode_data_uri(picture.src), dtype=float), original, kept)
    for row_id, words in [("row2", "not found"), ("row3", "not found"), ("row4", "does not fit")]:
        (picture,) = entries[row_id].pictures
        assert picture.src is None and words in picture.note


def test_page_says_what_is_missing_and_escapes_the_rows(tmp_path):
    rows = [synthetic_row(tmp_path, i, (2, 3), None, question="<script>alert(1)</script>") for i in range(3)]
    table = align(rows, RESULT_SCHEMA)
    page = render(table, summarize(table, str(tmp_path), 5.0, None, None, "CPU", 1.0), None, StorageOptions())
    assert NO_MASKS in page
    assert "No price was given" in page and "--hourly-usd" in page
    assert "No control rows" in page and "--control-rows 30" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def synthetic_summary(rows: list[dict], hourly_usd: float | None = None, devices: float = 1.0):
    table = align(rows, RESULT_SCHEMA)
    return summarize(table, "out", 5.0, hourly_usd, None, "CPU", devices)


def test_gallery_of_none_is_a_note(tmp_path):
    rows = [synthetic_row(tmp_path, i, (2, 3), [1, 0, 1, 1, 0, 0]) for i in range(3)]
    table = align(rows, RESULT_SCHEMA)
    gallery = build_gallery(table, StorageOptions(), 0)
    assert gallery.entries == [] and gallery.note == NONE_ASKED
    summary = summarize(table, str(tmp_path), 5.0)
    assert NONE_ASKED in render(table, summary, None, StorageOptions(), 0)


def test_gallery_refuses_an_image_replaced_by_one_of_another_shape(tmp_path):
    mask = [1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1]  # a 3 × 4 grid: 112 × 84 pixels
    rows = [synthetic_row(tmp_path, i, (3, 4), mask) for i in range(2)]
    Image.new("RGB", (84, 112)).save(rows[1]["images"][0])  # replaced, turned on its side
    entries = {e.id: e for e in build_gallery(align(rows, RESULT_SCHEMA), StorageOptions(), 8).entries}
    assert entries["row0"].pictures[0].src is not None
    (replaced,) = entries["row1"].pictures
    assert replaced.src is None
    assert replaced.note == (
        f"the image at {rows[1]['images'][0]} no longer matches the row's grid (84×112 for a 4×3 token grid); not shown"
    )


@pytest.mark.parametrize(
    "size, grid, fits",
    [
        ((112, 84), (3, 4), True),  # exactly the grid's pixels
        ((1000, 760), (3, 4), True),  # larger, resized down: each side rounds to whole tokens
        ((2800, 294), (10, 100), True),  # a wide image whose short side rounded by half a token
        ((1000, 10), (1, 36), True),  # a short side under one token, made one token
        ((84, 112), (3, 4), False),  # turned on its side
        ((400, 100), (4, 4), False),
        ((100, 400), (4, 4), False),
    ],
)
def test_an_image_fits_its_grid_as_the_processor_rounds_it(size, grid, fits):
    assert fits_grid(*size, grid) is fits


def test_money_is_robust_to_no_rows_and_counts_devices():
    empty = money(synthetic_summary([], hourly_usd=2.5))
    assert [cost for _, cost, _ in empty] == ["$0.0035", "$0.0000", "–"]
    assert "1 CPU at" in empty[0][2]
    assert "2 CPUs at" in money(synthetic_summary([], hourly_usd=2.5, devices=2))[0][2]


def test_page_of_a_job_with_no_rows_renders_with_a_price(tmp_path):
    table = align([], RESULT_SCHEMA)
    page = render(table, summarize(table, "out", 5.0, 2.5), None, StorageOptions())
    assert "No row was answered" in page and "no answered rows" in page


def test_control_note_says_why_there_is_nothing_to_compare(tmp_path):
    pruned = [synthetic_row(tmp_path, i, (2, 3), None) for i in range(3)]
    unpruned = [{**row, "pruned": False, "n_visual_kept": row["n_visual_tokens"]} for row in pruned]
    failed = [{**row, "error": "not_found", "answer": None} for row in pruned]
    assert "--control-rows 30" in control_verdict(synthetic_summary(pruned))
    for rows, words in [(unpruned, "Nothing was pruned"), (failed, "No row was answered"), ([], "No row was answered")]:
        note = control_verdict(synthetic_summary(rows))
        assert words in note and "--control-rows" not in note, note


def test_quartile_table_leaves_out_quartiles_without_rows(tmp_path):
    summary = synthetic_summary([synthetic_row(tmp_path, i, (2, 3), None) for i in range(8)])
    full = next(q for q in summary.keep_quartiles if q.rows)
    summary = dataclasses.replace(summary, keep_quartiles=[full, dataclasses.replace(full, rows=0)])
    assert [cells[1] for cells in quartile_rows(summary)] == [str(full.rows)]


def test_page_shows_control_characters_as_replacement_characters(tmp_path):
    rows = [
        synthetic_row(
            tmp_path, 0, (2, 3), [1, 0, 1, 1, 0, 0], id="row\x1b0", question="what\x00?", answer="a\x02b\tc\nd"
        ),
        synthetic_row(tmp_path, 1, (2, 3), [1, 0, 1, 1, 0, 0], references=["ref\x7f"], answer="x\x85y"),
    ]
    table = align(rows, RESULT_SCHEMA)
    page = render(table, summarize(table, str(tmp_path), 5.0), None, StorageOptions())
    assert not {chr(c) for c in [*range(0, 9), *range(11, 32), *range(0x7F, 0xA0)]} & set(page)
    for shown in ["row\ufffd0", "what\ufffd?", "a\ufffdb\tc\nd", "ref\ufffd", "x\ufffdy"]:
        assert shown in page


def test_write_replaces_a_link_at_the_page_instead_of_following_it(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / PAGE).symlink_to(target)
    path = write("<p>page</p>", tmp_path / "out")
    assert not path.is_symlink() and path.read_text() == "<p>page</p>"
    assert target.read_text() == "keep me"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [PAGE]  # no temporary left behind


@pytest.mark.parametrize("gallery", ["-1", "201"])
def test_report_refuses_a_gallery_out_of_bounds(tmp_path, capsys, gallery):
    with pytest.raises(SystemExit) as exit:
        report_main([str(tmp_path), "--gallery", gallery])
    assert exit.value.code == 2 and "--gallery must be 0 to 200" in capsys.readouterr().err


def test_report_on_s3_without_credentials_is_one_error_line(tmp_path, capsys, monkeypatch):
    for name in ["ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "SESSION_TOKEN", "PROFILE", "WEB_IDENTITY_TOKEN_FILE"]:
        monkeypatch.delenv(f"AWS_{name}", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # A region of its own: a new client, not one cached with another test's credentials.
    argv = ["s3://no-such-bucket/out", "--s3-region", "eu-nowhere-1", "--out", str(tmp_path / "report")]
    assert report_main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, "Unable to locate credentials")
    assert not (tmp_path / "report").exists()


def assert_one_error_line(err: str, words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


def test_report_refuses_a_folder_that_holds_no_job_output(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "someone-elses.parquet")
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert "holds no job output" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_report(ray_session, tmp_path_factory):
    """The bundled samples run for real on this CPU (4 control rows, masks kept, a price), then reported."""
    from pipeline.config import JobConfig
    from pipeline.job import run

    tmp = tmp_path_factory.mktemp("report")
    config = JobConfig(
        output=str(tmp / "out"),
        control_rows=4,
        keep_masks=True,
        hourly_usd=2.5,
        max_new_tokens=8,
        tiny_model_dir=str(Path(__file__).parents[1] / ".cache" / "tiny"),
    )
    run(config)
    capture = io.StringIO()
    with redirect_stdout(capture):
        assert report_main([str(tmp / "out"), "--out", str(tmp / "report")]) == 0
    return SimpleNamespace(
        output=tmp / "out",
        page=tmp / "report" / "report.html",
        printed=capture.getvalue(),
        rows={row["id"]: row for row in pq.read_table(tmp / "out").to_pylist()},
        written=json.loads((tmp / "out" / SUMMARY_FILE).read_text()),
    )


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "the report test needs Chromium: apt-get install chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def opened(demo_report, browser):
    """The demo report in a page, with what the browser complained about while loading it."""
    page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    errors, outside = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda r: None if r.url.startswith(("data:", "file:")) else outside.append(r.url))
    page.goto(demo_report.page.as_uri(), wait_until="load")
    yield SimpleNamespace(page=page, errors=errors, outside=outside)
    page.close()


def expected_headline(written: dict) -> list[str]:
    """The headline's figures, formatted from `_summary.json` itself."""
    control = written["control"]
    kept = written["visual_tokens_kept"] / written["visual_tokens"]
    saving = control["saving"]["value"]
    effect = f"saved {saving:.1%} of engine time" if saving >= 0 else f"cost {-saving:.1%} more engine time"
    savings = [
        f"{written['rows']} rows: pruning kept {kept:.1%} of visual tokens",
        f"{effect} (measured on {control['rows']} control rows",
    ]
    answers = [f"answers changed on {1 - control['agreement']['value']:.1%} of {control['rows']} control rows"]
    if control["scored_rows"]:
        answers.append(f"score pruned {control['score_pruned']:.3f} vs unpruned {control['score_unpruned']:.3f}")
    elif written["scored_rows"]:
        answers.append(f"score {written['score_mean']:.3f} over {written['scored_rows']} rows")
    return [savings, answers]


def test_report_headline_is_the_summary_and_its_figures(demo_report, opened):
    from pipeline.output import OutputDir
    from schemas import REPORT_COLUMNS

    written = demo_report.written
    table = OutputDir(str(demo_report.output), StorageOptions()).read_results(REPORT_COLUMNS)
    args = (written["wall_s"], written["hourly_usd"], written["engine_busy_fraction"])
    summary = summarize(
        table, str(demo_report.output), *args, written["device"], written["devices"], written["images_encoded"]
    )
    shown = opened.page.locator("header .headline p").all_inner_texts()
    assert shown == summary.headline()
    for line, figures in zip(shown, expected_headline(written)):
        for figure in figures:
            assert figure in line
    assert demo_report.printed.startswith("\n".join(summary.headline()))
    assert "\n".join(summary.lines()) in demo_report.printed


def test_report_gallery_lights_what_the_parquet_says_was_kept(demo_report, opened):
    pictures = opened.page.locator("#gallery img")
    assert pictures.count() >= 2
    for i in range(pictures.count()):
        picture = pictures.nth(i)
        assert picture.evaluate("e => e.complete && e.naturalWidth > 0 && e.naturalHeight > 0")
        data = picture.evaluate("e => ({...e.dataset})")
        row = demo_report.rows[data["rowId"]]
        mask = keep_masks.unpack(row["kept_mask"], row["image_grid_thw"])[int(data["image"])][0]
        assert mask.shape == (int(data["gridH"]), int(data["gridW"]))
        assert data["mask"] == "".join("1" if kept else "0" for kept in mask.ravel())
        shown = picture.evaluate(
            """e => { const c = document.createElement("canvas");
                      c.width = e.naturalWidth; c.height = e.naturalHeight;
                      c.getContext("2d").drawImage(e, 0, 0); return c.toDataURL("image/png"); }"""
        )
        original, kept = expected_picture(row["images"][int(data["image"])], mask, int(data["cell"]))
        assert_kept_lit_and_pruned_dimmed(np.asarray(decode_data_uri(shown), dtype=float), original, kept)


def test_report_gallery_spans_the_keep_ratios(demo_report, opened):
    masked = [r for r in demo_report.rows.values() if r["kept_mask"] is not None and r["error"] is None]
    ratio = {r["id"]: r["n_visual_kept"] / r["n_visual_tokens"] for r in masked}
    shown = opened.page.locator("#gallery figure.entry").evaluate_all("es => es.map(e => e.dataset.rowId)")
    assert len(shown) == min(8, len(masked))
    assert min(ratio.values()) in {ratio[i] for i in shown}
    assert max(ratio.values()) in {ratio[i] for i in shown}


def test_report_page_is_clean_self_contained_and_priced_per_cpu_hour(demo_report, opened):
    page = opened.page
    assert not opened.errors, opened.errors
    assert not opened.outside, opened.outside
    assert page.title().startswith("glimpse-batch report")
    plots = page.locator("#plots img")
    assert plots.count() == 4
    for i in range(plots.count()):
        shot = np.asarray(Image.open(io.BytesIO(plots.nth(i).screenshot())).convert("RGB"), dtype=int)
        data_pixels = (np.abs(shot - PLOT_BLUE) < 12).all(axis=-1).sum()
        assert data_pixels > 20, f"plot {i} shows no data"
    height = page.evaluate("document.documentElement.scrollHeight")
    last = page.evaluate("document.querySelector('#plots').getBoundingClientRect().bottom + window.scrollY")
    assert height - last < 100, f"{height - last:.0f} blank pixels below the last plot"
    text = demo_report.page.read_text()
    assert "CPU-hour" in text and "GPU-hour" not in text
    devices = demo_report.written["devices"]
    assert f"× {devices:g} CPU{'' if devices == 1 else 's'} at" in text and "× 1 CPUs" not in text
    assert "the bundled samples" in page.locator("#run").inner_text()


def test_report_page_fits_a_narrow_screen_without_breaking_numbers(demo_report, browser):
    page = browser.new_page(viewport={"width": 400, "height": 800}, device_scale_factor=1)
    page.goto(demo_report.page.as_uri(), wait_until="load")
    assert page.evaluate("document.documentElement.scrollWidth") <= 400 + 1
    lines = page.locator("td.number").evaluate_all(
        """es => es.map(e => { const r = document.createRange(); r.selectNodeContents(e);
                               return [e.innerText, new Set([...r.getClientRects()].map(c => c.top)).size]; })"""
    )
    assert lines and all(count == 1 for _, count in lines), lines
    page.close()


@pytest.fixture
def finished(demo_report, tmp_path):
    """A copy of the demo job's output, to break."""
    shutil.copytree(demo_report.output, tmp_path / "out")
    return tmp_path / "out"


@pytest.mark.parametrize("state", ["running", "publishing"])
def test_report_refuses_a_job_that_has_not_finished(finished, tmp_path, capsys, state):
    record = json.loads((finished / RECORD_FILE).read_text())
    (finished / RECORD_FILE).write_text(json.dumps({**record, "state": state}))
    assert report_main([str(finished), "--out", str(tmp_path / "report"), "--hourly-usd", "2"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"has not finished (it is {state})")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(
    "name, content, words",
    [
        (SUMMARY_FILE, "{", "is not JSON"),
        (SUMMARY_FILE, "[1, 2]", "is not a job summary"),
        (SCORES_FILE, "not parquet", "cannot be read"),
        ("results", "not parquet", "holds a result file that cannot be read"),
    ],
)
def test_report_on_a_corrupt_output_is_one_error_line(finished, tmp_path, capsys, name, content, words):
    if name == "results":
        name = json.loads((finished / RECORD_FILE).read_text())["files"][0]
    (finished / name).write_text(content)
    assert report_main([str(finished), "--out", str(tmp_path / "report")]) == 2
    assert_one_error_line(capsys.readouterr().err, words)
    assert not (tmp_path / "report").exists()


def test_report_that_cannot_be_written_is_one_error_line(demo_report, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for out in [tmp_path / "file", tmp_path / "file" / "report"]:
        assert report_main([str(demo_report.output), "--out", str(out), "--gallery", "0"]) == 2
        assert_one_error_line(capsys.readouterr().err, f"cannot write the report to {out}")
