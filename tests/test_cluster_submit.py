"""The job submitted to a running cluster: `ray start --head`, then `ray job submit --working-dir .`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def own_cluster():
    """A one-node cluster of this test's own: its own ports and temp directory, on loopback (token
    auth off: nothing outside this machine can reach it). `ray start --block` runs it in the
    foreground; terminating that one process stops this cluster's processes and no one else's
    (`ray stop` would stop every Ray on the machine, a user's own included)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ray-test-", dir="/tmp")  # short: Ray's socket paths must fit
    dashboard = free_port()
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            f"--port={free_port()}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its process group is this cluster's processes, and only them
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for(f"{address}/api/version", head)
        yield address, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=5)  # a graceful stop can take half a minute; these tests do not test it
        except subprocess.TimeoutExpired:
            pass
        with suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # agents whose names no longer show the temp directory
        head.wait()
        left = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        for process in left:  # the cluster's own stragglers only: they name its temp directory
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster():
    with own_cluster() as cluster:
        yield cluster


def wait_for(url: str, head: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the test cluster's dashboard did not answer at {url}")


def drivers(address: str) -> list[str]:
    """The ids of the jobs (drivers) that have connected to the cluster."""
    from ray.util.state import list_jobs

    return [job.job_id for job in list_jobs(address=address, raise_on_missing_output=False)]


def test_a_job_without_an_address_starts_its_own_ray_and_stopping_a_cluster_spares_the_others(local_cluster, tmp_path):
    address, env = local_cluster
    before = drivers(address)
    done = subprocess.run(
        [sys.executable, "-m", "jobs.vqa", "--output", str(tmp_path / "out"), "--max-new-tokens", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert drivers(address) == before, "the job joined a cluster it was not given"
    # Quiet by default: our progress line and hardly anything of Ray's, no deprecation warnings.
    assert len(done.stderr.splitlines()) < 10 and "deprecated" not in done.stderr, done.stderr
    with own_cluster() as (other, _):
        assert other != address
    urllib.request.urlopen(f"{address}/api/version", timeout=5)  # still up after the other one stopped


def test_ray_job_submit_runs_the_demo_job(local_cluster, tmp_path):
    address, env = local_cluster
    out = tmp_path / "out"
    submit = ["ray", "job", "submit", "--address", address, "--working-dir", "."]
    job = ["--", "python", "-m", "jobs.vqa", "--output", str(out), "--max-new-tokens", "3"]
    deadline = time.monotonic() + 300
    while True:  # the head's job agent comes up seconds (minutes on a busy machine) after its dashboard answers
        done = subprocess.run([*submit, *job], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    n = len(json.loads((REPO / "pipeline" / "samples" / "cases.json").read_text()))
    assert re.search(rf"^rows +{n} \({n} answered, 0 failed\)$", done.stdout, re.MULTILINE), done.stdout[-3000:]
    table = pq.read_table(out)
    assert table.num_rows == n and table.column("error").null_count == n
    assert json.loads((out / "_summary.json").read_text())["rows_ok"] == n
