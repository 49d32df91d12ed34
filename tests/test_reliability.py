"""Bad inputs, injected faults, an interrupted driver and secrets: every id exactly once, nothing leaked."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.config import JobConfig
from pipeline.faults import ENV as FAULTS_ENV
from pipeline.job import run
from pipeline.sources import ManifestError
from tests.conftest import FIXTURE, fixture_cases, new_bucket, write_fixture_manifest

REPO = Path(__file__).parents[1]
MODEL = dict(model=str(FIXTURE / "base"), glimpse=str(FIXTURE / "glimpse"), max_new_tokens=4, batch_size=4)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def bad_and_odd_images(folder: Path) -> dict[str, tuple[bytes, str | None]]:
    """name → (file bytes, expected error code or None when it must be answered)."""
    rgb = Image.fromarray(noise(56, 84))
    png, jpeg, webp = encoded(rgb, "PNG"), encoded(rgb, "JPEG"), encoded(rgb, "WEBP")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    frames = [Image.fromarray(noise(56, 84, seed)) for seed in (1, 2)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sixteen = Image.fromarray((np.arange(56 * 84, dtype=np.uint16).reshape(56, 84) * 13).astype(np.uint16))
    return {
        "zero.png": (b"", "empty_file"),
        "truncated.png": (png[: len(png) // 2], "corrupt_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt_image"),
        "truncated.webp": (webp[: len(webp) // 2], "corrupt_image"),
        "text.png": (b"this is not an image at all\n" * 10, "not_an_image"),
        "cmyk.jpg": (encoded(rgb.convert("CMYK"), "JPEG"), None),
        "sixteen_bit.png": (encoded(sixteen, "PNG"), None),
        "palette.png": (encoded(rgb.convert("P"), "PNG"), None),
        "alpha.png": (encoded(rgb.convert("RGBA"), "PNG"), None),
        "grey.png": (encoded(rgb.convert("L"), "PNG"), None),
        "animated.gif": (animated.getvalue(), None),
        "first_frame.png": (encoded(frames[0].convert("P").convert("RGB"), "PNG"), None),
        "rotated.jpg": (encoded(rgb, "JPEG", exif=exif.tobytes()), None),
        "upright.jpg": (encoded(rgb.transpose(Image.Transpose.ROTATE_270), "JPEG"), None),
        "tiny.png": (encoded(Image.fromarray(noise(3, 5)), "PNG"), None),
        "over_limit.png": (encoded(Image.new("1", (3000, 3000)), "PNG"), "too_many_pixels"),
        "bomb.png": (encoded(Image.new("1", (15000, 15000)), "PNG"), "too_many_pixels"),
    }


def test_every_bad_input_becomes_an_error_row(ray_session, tmp_path):
    images = bad_and_odd_images(tmp_path)
    for name, (data, _) in images.items():
        (tmp_path / name).write_bytes(data)
    rows = [{"id": name, "image": str(tmp_path / name), "question": "what is in the picture"} for name in images]
    rows += [
        {"id": "missing", "image": str(tmp_path / "missing.png"), "question": "what"},
        {"id": "empty_question", "image": str(tmp_path / "grey.png"), "question": "  "},
        {"id": "long_question", "image": str(tmp_path / "grey.png"), "question": "the cat " * 40},
        {"id": "no_image", "images": [], "question": "what"},
    ]
    expected = {name: code for name, (_, code) in images.items()}
    expected.update(missing="not_found", empty_question="bad_question", long_question="bad_question")
    expected["no_image"] = "invalid_row"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    config = JobConfig(
        manifest=str(tmp_path / "manifest.parquet"),
        output=str(tmp_path / "out"),
        max_image_pixels=5_000_000,
        max_question_tokens=60,
        max_failed_fraction=1.0,
        **MODEL,
    )
    summary = run(config)
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(out) == sorted(expected)
    for row_id, code in expected.items():
        assert out[row_id]["error_code"] == code, (row_id, out[row_id]["error"])
        assert (out[row_id]["answer"] is None) == (code is not None), row_id
    assert out["animated.gif"]["answer"] == out["first_frame.png"]["answer"]  # the first frame
    codes = [c for c in expected.values() if c]
    assert summary.errors == {c: codes.count(c) for c in set(codes)}
    assert summary.rows_failed == len(codes)


def test_decoding_rotates_converts_and_refuses_before_decoding(tmp_path):
    from pipeline.prepare import decode_image

    images = bad_and_odd_images(tmp_path)
    rotated = decode_image(images["rotated.jpg"][0], "rotated.jpg", 10**6)
    assert rotated.size == (56, 84) and rotated.mode == "RGB"  # stored 84 wide, shown 56 wide
    sixteen = np.asarray(decode_image(images["sixteen_bit.png"][0], "16", 10**6))
    assert sixteen.dtype == np.uint8 and sixteen.max() > 200 and sixteen.min() < 50  # rescaled, not clipped
    alpha = Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8))  # fully transparent → white
    assert np.asarray(decode_image(encoded(alpha, "PNG"), "alpha", 10**6)).min() == 255
    with pytest.raises(Exception) as raised:
        decode_image(images["over_limit.png"][0], "over", 1000)
    assert raised.value.code == "too_many_pixels" and "3000×3000" in str(raised.value)


@pytest.mark.parametrize(
    "ids, named",
    [(["a", "b", "a", "c", "c", "c"], ["'a' ×2", "'c' ×3"]), (["a", None, "b", ""], ["2 rows have no id"])],
)
def test_duplicate_or_missing_ids_stop_the_job_before_any_work(ray_session, tmp_path, ids, named):
    rows = [{"id": i, "image": str(FIXTURE / "images" / "small.png"), "question": "what"} for i in ids]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    config = JobConfig(manifest=str(tmp_path / "manifest.parquet"), output=str(tmp_path / "out"), **MODEL)
    with pytest.raises(ManifestError) as raised:
        run(config)
    for text in named:
        assert text in str(raised.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def s3_corpus(s3, tmp_path):
    """A bucket on moto's S3 holding the fixture images, 3 copies of each case in a manifest."""
    options, fs = s3
    bucket = new_bucket(fs)
    rows = []
    for e in fixture_cases():
        rel = e["case"]["images"][0]
        fs.put(str(FIXTURE / rel), f"{bucket}/{rel}")
        rows += [
            {"id": f"{e['case']['id']}-{i}", "image": f"s3://{bucket}/{rel}", "question": e["case"]["question"]}
            for i in range(3)
        ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    return options, fs, rows, bucket


def reference_answers(rows) -> dict[str, str]:
    from pipeline.glimpse.engine import GlimpseEngine
    from tests.conftest import fixture_requests

    engine = GlimpseEngine.from_pretrained(FIXTURE / "base", FIXTURE / "glimpse")
    by_case = {r.id: r.answer for r in engine.generate(fixture_requests(MODEL["max_new_tokens"]))}
    return {row["id"]: by_case[row["id"].rsplit("-", 1)[0]] for row in rows}


def test_killed_actor_failing_reads_and_oom_lose_nothing(ray_session, s3_corpus, tmp_path, monkeypatch):
    options, fs, rows, bucket = s3_corpus
    marker = tmp_path / "killed"
    plan = {"kill_actor_marker": str(marker), "fail_reads": 2, "oom_above_batch": 1}
    monkeypatch.setenv(FAULTS_ENV, json.dumps(plan))
    config = JobConfig(
        manifest=str(tmp_path / "manifest.parquet"),
        output=f"s3://{bucket}/out",
        storage=options,
        rows_per_block=5,
        **MODEL,
    )
    summary = run(config)
    assert marker.exists(), "the fault hook never killed the actor"
    out = pq.read_table(f"{bucket}/out", filesystem=PyFileSystem(FSSpecHandler(fs))).to_pylist()
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    expected = reference_answers(rows)
    for row in out:
        assert row["error"] is None, row
        assert row["answer"] == expected[row["id"]], row["id"]
    assert summary.rows_ok == len(rows)


def finished_rows(directory: Path) -> int:
    """Rows in the Parquet files under `directory` whose footer is written: Ray writes a file in
    place, so one can be seen, and the driver killed, before it is complete."""
    rows = 0
    for path in directory.rglob("*.parquet"):
        try:
            rows += pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowInvalid):
            pass  # still being written, or cut short by the kill
    return rows


def test_an_interrupted_job_resumes_and_holds_each_id_once(ray_session, tmp_path):
    rows = write_fixture_manifest(tmp_path / "manifest.parquet", copies=4)
    out = tmp_path / "out"
    # Blocks of 4 rows, not merged into bigger preparation batches: 5 output files, one at a time.
    options = dict(
        manifest=str(tmp_path / "manifest.parquet"), output=str(out), rows_per_block=4, prepare_batch_size=4, **MODEL
    )
    command = [sys.executable, "-m", "jobs.vqa", "--progress-interval-s", "1"]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    # Slowed batches (0.5 s each, 5 of them) leave seconds between the first file and the last.
    env = {**os.environ, FAULTS_ENV: json.dumps({"batch_delay_s": 0.5})}
    driver = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not finished_rows(out / "_pending"):
        assert driver.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    assert not list(out.glob("*.parquet")), "a reader of the output saw files of an unfinished job"
    answered = finished_rows(out / "_pending")
    assert 0 < answered < len(rows)
    (run_dir,) = (out / "_pending").iterdir()  # the killed run's own folder
    (run_dir / "cut-short.parquet").write_bytes(b"PAR1 a file the writer never finished")

    summary = run(JobConfig(**options))
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert summary.rows == len(rows) and summary.rows_failed == 0
    assert not (out / "_pending").exists()
    expected = reference_answers(rows)
    assert all(r["answer"] == expected[r["id"]] for r in table.to_pylist())


def test_ids_cannot_place_files_outside_the_output(ray_session, tmp_path):
    rows = write_fixture_manifest(tmp_path / "manifest.parquet", copies=1, prefix="../../escape/")
    rows[0]["id"] = "/tmp/absolute"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    run(JobConfig(manifest=str(tmp_path / "manifest.parquet"), output=str(tmp_path / "out" / "job"), **MODEL))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.parquet", "out"]
    written = [p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert all(p.parts[0] == "job" and len(p.parts) == 2 for p in written), written
    assert sorted(pq.read_table(tmp_path / "out" / "job").column("id").to_pylist()) == sorted(r["id"] for r in rows)


def test_secrets_appear_in_no_log_row_metadata_or_summary(s3_corpus, tmp_path):
    options, fs, rows, bucket = s3_corpus
    yaml_key, yaml_secret, env_secret = "AKIAYAMLKEY4c1d9", "yaml-secret-5b2e9c71", "env-secret-81aa0f3e"
    manifest = [*rows[:4], {"id": "missing", "image": f"s3://{bucket}/nope.png", "question": "what"}]
    fs.pipe(f"{bucket}/secret-manifest.jsonl", "\n".join(json.dumps(r) for r in manifest).encode())
    (tmp_path / "job.yaml").write_text(
        json.dumps(
            {
                "manifest": f"s3://{bucket}/secret-manifest.jsonl",
                "output": f"s3://{bucket}/secret-out",
                "storage": {"endpoint_url": options.endpoint_url, "key": yaml_key, "secret": yaml_secret},
                "max_failed_fraction": 1.0,
                **MODEL,
            }
        )
    )
    sessions_before = set(Path("/tmp/ray").glob("session_2*"))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAENVKEY0000", "AWS_SECRET_ACCESS_KEY": env_secret}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.vqa", "--config", str(tmp_path / "job.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    places = {"stdout": done.stdout, "stderr": done.stderr}
    for session in set(Path("/tmp/ray").glob("session_2*")) - sessions_before:
        for log_file in session.rglob("*"):
            if log_file.is_file() and log_file.stat().st_size < 50 << 20:
                places[str(log_file)] = log_file.read_bytes().decode("utf-8", "replace")
    for path in fs.find(f"{bucket}/secret-out"):
        places[path] = fs.cat(path).decode("utf-8", "replace")
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                places[f"{path} metadata"] = str(pq.read_metadata(f).metadata)
    assert any(p.endswith("_summary.json") for p in places) and any(p.endswith(".parquet") for p in places)
    assert len(places) > 5, sorted(places)
    for secret in (yaml_key, yaml_secret, env_secret):
        leaks = [name for name, text in places.items() if secret in text]
        assert not leaks, f"{secret} found in {leaks}"


@pytest.fixture
def fault_plan(monkeypatch):
    """Sets this process's fault plan (`plan()` and the filesystems are cached per process)."""
    from pipeline import faults, storage

    def set_plan(plan: dict) -> None:
        monkeypatch.setenv(FAULTS_ENV, json.dumps(plan))
        faults.plan.cache_clear()
        storage.filesystem.cache_clear()

    yield set_plan
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    faults.plan.cache_clear()
    storage.filesystem.cache_clear()


def test_reads_are_retried_by_botocore_and_failures_keep_storage_codes(s3, fault_plan, tmp_path):
    from pipeline.failures import describe
    from pipeline.storage import read_bytes

    options, fs = s3
    bucket = new_bucket(fs)
    fs.pipe(f"{bucket}/image.png", b"bytes")
    fault_plan({"fail_reads": 2})  # below botocore: its standard retry mode must recover
    assert read_bytes(f"s3://{bucket}/image.png", options, 100) == b"bytes"
    fault_plan({})

    os.mkfifo(tmp_path / "fifo")
    unreachable = options.model_copy(update={"endpoint_url": "http://127.0.0.1:9", "max_attempts": 1})
    cases = [
        (f"s3://{bucket}/missing.png", options, "not_found"),
        (f"s3://{bucket}", options, "unsupported_uri"),  # a bucket, not an object
        (str(tmp_path), options, "unsupported_uri"),  # a directory
        (str(tmp_path / "fifo"), options, "unsupported_uri"),  # would block a reader forever
        ("foo://bucket/image.png", options, "unsupported_uri"),
        ("gs://bucket/image.png", options, "unsupported_uri"),  # gcsfs is not installed
        (f"s3://{bucket}/image.png", unreachable, "storage_error"),
    ]
    for uri, storage, code in cases:
        with pytest.raises(Exception) as raised:
            read_bytes(uri, storage, 100)
        assert describe(raised.value)[0] == code, (uri, raised.value)
