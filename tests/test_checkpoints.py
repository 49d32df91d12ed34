"""Checkpoint locations: local directories, Hugging Face Hub ids (from a prepared cache, without
network) and s3:// prefixes (moto), resolved and fetched through the real libraries."""

from __future__ import annotations

import http.server
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.checkpoints import CheckpointError, resolve_checkpoint
from pipeline.storage import StorageOptions
from tests.conftest import new_bucket

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOCAL = StorageOptions()


# Local directories


def test_local_directory_resolves_to_its_absolute_path(tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tiny_checkpoint)
    model = resolve_checkpoint("./base", None, LOCAL, role="model")
    glimpse = resolve_checkpoint("glimpse", None, LOCAL, role="glimpse")
    assert resolve_checkpoint(f"file://{tiny_checkpoint}/base", None, LOCAL, role="model") == model
    assert (model.kind, model.revision, model.location) == ("local", None, str(tiny_checkpoint / "base"))
    assert model.local_dir(LOCAL) == tiny_checkpoint / "base"
    assert glimpse.local_dir(LOCAL) == tiny_checkpoint / "glimpse"
    assert model.lineage() == {"location": str(tiny_checkpoint / "base"), "kind": "local", "revision": None}


@pytest.mark.parametrize(
    "location, message",
    [
        ("./no-such-dir", "--model ./no-such-dir: no such directory"),
        ("no/such/dir", "--model no/such/dir: no such directory"),
        ("not a location", "--model not a location: not a local directory, a Hugging Face Hub id"),
    ],
)
def test_missing_local_directory(location, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="^" + message):
        resolve_checkpoint(location, None, LOCAL, role="model")


def test_local_file_or_incomplete_directory_is_refused(tiny_checkpoint, tmp_path):
    config = tiny_checkpoint / "base" / "config.json"
    with pytest.raises(CheckpointError, match=f"^--model {config}: is a file, not a checkpoint directory$"):
        resolve_checkpoint(str(config), None, LOCAL, role="model")

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=f"^--model {weights_only}: config.json not found in {weights_only}$"):
        resolve_checkpoint(str(weights_only), None, LOCAL, role="model")

    config_only = tmp_path / "glimpse-config-only"
    config_only.mkdir()
    shutil.copy(tiny_checkpoint / "glimpse" / "config.json", config_only)
    resolve_checkpoint(str(config_only), None, LOCAL, role="model")  # enough for a model
    with pytest.raises(CheckpointError, match=f"^--glimpse {config_only}: new_modules_gp.pt not found"):
        resolve_checkpoint(str(config_only), None, LOCAL, role="glimpse")


def test_local_directory_takes_no_revision(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="^--glimpse .*: a revision applies to hub ids only"):
        resolve_checkpoint(str(tiny_checkpoint / "glimpse"), "main", LOCAL, role="glimpse")


def test_local_directory_gone_on_a_node(tmp_path, tiny_checkpoint):
    copy = shutil.copytree(tiny_checkpoint / "base", tmp_path / "base")
    checkpoint = resolve_checkpoint(str(copy), None, LOCAL, role="model")
    shutil.rmtree(copy)
    with pytest.raises(CheckpointError, match=f"^{copy}: no such directory on this node"):
        checkpoint.local_dir(LOCAL)


# Hugging Face Hub ids. huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when imported, so each
# check runs in a fresh interpreter with its environment set, as a job's driver would.

HUB_SCRIPT = """
import json, sys, time
from pipeline.checkpoints import CheckpointError, resolve_checkpoint
from pipeline.storage import StorageOptions

results = []
for location, revision, role in json.loads(sys.argv[1]):
    start = time.monotonic()
    try:
        checkpoint = resolve_checkpoint(location, revision, StorageOptions(), role=role)
        result = {"kind": checkpoint.kind, "revision": checkpoint.revision}
        result["local_dir"] = str(checkpoint.local_dir(StorageOptions()))
    except CheckpointError as e:
        result = {"error": str(e)}
    result["seconds"] = time.monotonic() - start
    results.append(result)
print(json.dumps(results))
"""


@pytest.fixture
def hf_cache(tmp_path) -> Path:
    """An HF cache holding org/model at COMMIT (refs/main points there), as snapshot_download leaves it."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--model"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_in_subprocess(cases: list[tuple], cache: Path, cwd: Path, **env: str) -> list[dict]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HTTP", "http", "NO_PROXY"))}
    # Nothing listens on the endpoint: no network, whatever the machine running the tests can reach.
    environment.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", PYTHONPATH=str(REPO))
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, json.dumps(cases)],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_cached_and_uncached(results: list[dict], cache: Path) -> None:
    """Results of [org/model, org/model@main, org/model@COMMIT, org/uncached]."""
    snapshot = str(cache / "models--org--model" / "snapshots" / COMMIT)
    for result in results[:3]:
        assert (result.get("error"), result["kind"], result["revision"]) == (None, "hub", COMMIT)
        assert result["local_dir"] == snapshot
    uncached = results[3]
    assert uncached["error"] == (
        f"--model org/uncached: cannot reach the Hugging Face Hub and it is not in the local cache ({cache}); "
        "download it on a connected machine or set HF_HUB_CACHE"
    )
    assert uncached["seconds"] < 3


HUB_CASES = [
    ("org/model", None, "model"),
    ("org/model", "main", "model"),
    ("org/model", COMMIT, "model"),
    ("org/uncached", None, "model"),
]


def test_hub_id_offline_from_the_cache(hf_cache, tmp_path):
    cases = [*HUB_CASES, ("org/model", "v2", "model"), ("org/model", None, "glimpse"), ("org/a..b", None, "model")]
    results = resolve_in_subprocess(cases, hf_cache, tmp_path, HF_HUB_OFFLINE="1")
    assert_cached_and_uncached(results[:4], hf_cache)
    assert results[4]["error"].startswith("--model org/model: cannot reach the Hugging Face Hub")
    assert results[5]["error"] == (
        f"--glimpse org/model: new_modules_gp.pt not found in the Hub snapshot "
        f"{hf_cache / 'models--org--model' / 'snapshots' / COMMIT}"
    )
    assert results[6]["error"] == "--model org/a..b: not a valid Hugging Face Hub id"


def test_hub_id_without_network_falls_back_on_the_cache(hf_cache, tmp_path):
    assert_cached_and_uncached(resolve_in_subprocess(HUB_CASES, hf_cache, tmp_path), hf_cache)


def test_hub_id_behind_a_broken_proxy_falls_back_on_the_cache(hf_cache, tmp_path):
    """A proxy that hangs up: huggingface_hub raises the protocol error as is instead of using its cache."""
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen()

    def hang_up():
        while True:
            try:
                connection, _ = proxy.accept()
            except OSError:  # closed: the test is over
                return
            connection.recv(4096)
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    endpoint = "https://hub.invalid"  # through the proxy, which never connects anywhere
    url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    try:
        results = resolve_in_subprocess(HUB_CASES, hf_cache, tmp_path, HF_ENDPOINT=endpoint, HTTPS_PROXY=url)
    finally:
        proxy.close()
    assert_cached_and_uncached(results, hf_cache)


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """A Hub that knows no repository: org/gated is gated, revision `nope` does not exist."""

    def do_GET(self):
        code, error = (403, "GatedRepo") if "/org/gated" in self.path else (404, "RepoNotFound")
        if self.path.endswith("/revision/nope"):
            error = "RevisionNotFound"
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_hub_refusals_in_one_line_and_commits_from_the_cache(hf_cache, tmp_path):
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    cases = [
        ("org/model", COMMIT, "model"),  # cached: a commit never changes, so the Hub is not asked
        ("org/model", None, "model"),
        ("org/gated", None, "model"),
        ("org/model", "nope", "model"),
    ]
    try:
        results = resolve_in_subprocess(cases, hf_cache, tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{hub.server_port}")
    finally:
        hub.shutdown()
    assert (results[0].get("error"), results[0]["revision"]) == (None, COMMIT)
    assert results[1]["error"].startswith("--model org/model: no such repository on the Hugging Face Hub")
    assert results[2]["error"].startswith("--model org/gated: the repository is gated")
    assert results[3]["error"] == "--model org/model: the Hugging Face Hub has no revision 'nope' of this repository"
    assert all("\n" not in r["error"] and "http" not in r["error"] for r in results[1:])


# s3:// prefixes


@pytest.fixture
def uploaded(s3, tiny_checkpoint, tmp_path, monkeypatch) -> str:
    """s3://<new bucket>/ckpt holding the tiny checkpoint (base/, glimpse/); the fetch cache in tmp_path."""
    monkeypatch.setenv("GLIMPSE_BATCH_CACHE", str(tmp_path / "cache"))
    _, fs = s3
    bucket = new_bucket(fs)
    fs.put(str(tiny_checkpoint), f"{bucket}/ckpt", recursive=True)
    return f"s3://{bucket}/ckpt"


def test_s3_prefix_resolves_to_a_stable_revision(s3, uploaded):
    options, _ = s3
    model = resolve_checkpoint(f"{uploaded}/base", None, options, role="model")
    again = resolve_checkpoint(f"{uploaded}/base/", None, options, role="model")
    glimpse = resolve_checkpoint(f"{uploaded}/glimpse", None, options, role="glimpse")
    assert (model.kind, len(model.revision)) == ("s3", 16)
    assert again.revision == model.revision != glimpse.revision
    assert model.lineage() == {"location": f"{uploaded}/base", "kind": "s3", "revision": model.revision}


def test_s3_prefix_is_fetched_once_per_node(s3, uploaded, tiny_checkpoint, tmp_path):
    options, fs = s3
    checkpoint = resolve_checkpoint(f"{uploaded}/base", None, options, role="model")
    local = checkpoint.local_dir(options)
    assert local == tmp_path / "cache" / "checkpoints" / checkpoint.revision
    source = tiny_checkpoint / "base"
    expected = {str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    assert {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()} == expected

    fs.rm(uploaded.removeprefix("s3://"), recursive=True)
    assert checkpoint.local_dir(options) == local  # from the cache: the objects are gone
    with pytest.raises(CheckpointError, match="no objects under this prefix"):
        resolve_checkpoint(f"{uploaded}/base", None, options, role="model")


def fetch_in_process(checkpoint, options, barrier, results):
    barrier.wait()
    results.put(str(checkpoint.local_dir(options)))


def test_concurrent_fetches_on_a_node_make_one_copy(s3, uploaded, tmp_path):
    options, _ = s3
    checkpoint = resolve_checkpoint(f"{uploaded}/base", None, options, role="model")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=fetch_in_process, args=(checkpoint, options, barrier, results)) for _ in "ab"]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    fetched = [results.get(timeout=5) for _ in processes]
    assert fetched == [str(tmp_path / "cache" / "checkpoints" / checkpoint.revision)] * 2
    names = sorted(p.name for p in (tmp_path / "cache" / "checkpoints").iterdir())
    assert names == [checkpoint.revision, f"{checkpoint.revision}.lock"]  # no scratch copies left


def test_s3_prefix_changed_after_resolving_is_not_fetched(s3, uploaded, tmp_path):
    options, fs = s3
    checkpoint = resolve_checkpoint(f"{uploaded}/glimpse", None, options, role="glimpse")
    fs.pipe(f"{uploaded.removeprefix('s3://')}/glimpse/config.json", b'{"changed": true}')
    with pytest.raises(CheckpointError, match=f"^{uploaded}/glimpse: the objects under this prefix changed"):
        checkpoint.local_dir(options)
    assert sorted(p.name for p in (tmp_path / "cache" / "checkpoints").iterdir()) == [f"{checkpoint.revision}.lock"]
    assert resolve_checkpoint(f"{uploaded}/glimpse", None, options, role="glimpse").revision != checkpoint.revision


def test_s3_prefix_empty_incomplete_or_unreadable(s3, uploaded):
    options, fs = s3
    with pytest.raises(CheckpointError, match=f"^--model {uploaded}/nothing: no objects under this prefix$"):
        resolve_checkpoint(f"{uploaded}/nothing", None, options, role="model")
    fs.rm(f"{uploaded.removeprefix('s3://')}/glimpse/new_modules_gp.pt")
    with pytest.raises(CheckpointError, match=f"^--glimpse {uploaded}/glimpse: new_modules_gp.pt not found in"):
        resolve_checkpoint(f"{uploaded}/glimpse", None, options, role="glimpse")
    with pytest.raises(CheckpointError, match="^--model s3://no-such-bucket-here/x: cannot list it"):
        resolve_checkpoint("s3://no-such-bucket-here/x", None, options, role="model")
    with pytest.raises(CheckpointError, match="a revision applies to hub ids only"):
        resolve_checkpoint(f"{uploaded}/base", "main", options, role="model")
