"""The job submitted to a running cluster: `ray start --head`, then `ray job submit --working-dir .`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_cluster(tmp_path):
    """A one-node cluster on loopback (token auth off: nothing outside this machine can reach it)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    dashboard = free_port()
    subprocess.run(
        [
            "ray",
            "start",
            "--head",
            "--num-cpus=2",
            f"--port={free_port()}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_runs_the_demo_job(local_cluster, tmp_path):
    address, env = local_cluster
    out = tmp_path / "out"
    done = subprocess.run(
        [
            "ray",
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "jobs.vqa",
            "--output",
            str(out),
            "--max-new-tokens",
            "3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^rows +7 \(7 answered, 0 failed\)$", done.stdout, re.MULTILINE), done.stdout[-3000:]
    table = pq.read_table(out)
    assert table.num_rows == 7 and table.column("error").null_count == 7
    assert json.loads((out / "_summary.json").read_text())["rows_ok"] == 7
