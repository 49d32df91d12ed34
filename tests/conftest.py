"""Shared test fixtures: the golden glimpse-tiny checkpoint and locally built tiny checkpoints."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from PIL import Image

FIXTURE = Path(__file__).parent / "fixtures" / "glimpse-tiny"


def fixture_cases() -> list[dict]:
    """expected.json entries: {"case": {...}, "glimpse": {...}, "baseline": {...}}."""
    return json.loads((FIXTURE / "expected.json").read_text())


def fixture_requests(max_new_tokens: int = 8):
    from pipeline.glimpse.engine import Request
    from pipeline.glimpse.sampling import SamplingParams

    return [
        Request(
            id=e["case"]["id"],
            images=[Image.open(FIXTURE / p).copy() for p in e["case"]["images"]],
            question=e["case"]["question"],
            sampling=SamplingParams(max_new_tokens=max_new_tokens),
        )
        for e in fixture_cases()
    ]


def write_fixture_manifest(path: Path, copies: int, prefix: str = "") -> list[dict]:
    """A Parquet manifest of each fixture case `copies` times (ids `{prefix}{case}-{i}`); returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": f"{prefix}{e['case']['id']}-{i}",
            "image": str(FIXTURE / e["case"]["images"][0]),
            "question": e["case"]["question"],
        }
        for i in range(copies)
        for e in fixture_cases()
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


@pytest.fixture(scope="session")
def fixture_engine():
    from pipeline.glimpse.engine import GlimpseEngine

    return GlimpseEngine.from_pretrained(FIXTURE / "base", FIXTURE / "glimpse")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint built by our helper, unlike the fixture: 3 layers, 1 KV head, another seed."""
    from pipeline.synthetic.tiny import TinySpec, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec(layers=3, kv_heads=1, seed=7))


@pytest.fixture(scope="session")
def tiny_qwen3_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen3-VL checkpoint (DeepStack after decoder layers 0-2) with random glimpse modules
    that prune after layer 2."""
    from pipeline.synthetic.tiny import TinySpec, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), TinySpec(architecture="qwen3_vl", seed=3))


@pytest.fixture(scope="module")
def s3():
    """Moto's S3 server on 127.0.0.1 for a test module; yields (storage options, s3fs filesystem).
    Moto keeps buckets for the whole server: tests make their own with `new_bucket`."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from pipeline.storage import StorageOptions

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = StorageOptions(endpoint_url=f"http://{host}:{port}", key="testing", secret="testing")
    yield options, s3fs.S3FileSystem(**options.s3fs_kwargs())
    server.stop()


def new_bucket(fs) -> str:
    bucket = f"bucket-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    return bucket


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (starting Ray takes seconds); yields the port
    its metrics are exported on, in Prometheus' text format."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    # A Ray of the tests' own (address="local"), never a cluster someone started on this machine.
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port
    )
    yield metrics_port
    ray.shutdown()
