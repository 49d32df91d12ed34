"""A Qwen3-VL model through the whole product on local Ray and moto's S3: the model read from an
s3:// prefix, glimpse modules trained for it by the training job, the VQA job over images on S3,
Parquet rows written to S3 and read back, with the costs of Qwen3-VL's own cost model."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from transformers import AutoConfig

from pipeline.config import JobConfig
from pipeline.glimpse.accounting import CostModel
from pipeline.glimpse.config import GlimpseConfig
from pipeline.job import run as run_vqa
from pipeline.keep_masks import unpack
from pipeline.storage import pyarrow_filesystem
from pipeline.summary import SUMMARY_FILE
from pipeline.synthetic.grounding import write_dataset
from pipeline.training.run import check, run
from tests.conftest import new_bucket
from tests.test_training import small_config


@pytest.fixture(scope="module")
def on_s3(s3, tiny_qwen3_checkpoint, tmp_path_factory):
    """The tiny Qwen3-VL base under an s3:// prefix, and a grounding set whose manifest and images
    are on S3."""
    storage, fs = s3
    bucket = new_bucket(fs)
    fs.put(str(tiny_qwen3_checkpoint / "base"), f"{bucket}/models/qwen3-tiny", recursive=True)
    local = write_dataset(tmp_path_factory.mktemp("grounding"), n=8, seed=4)
    lines = []
    for line in local.read_text().splitlines():
        row = json.loads(line)
        fs.put(row["image"], f"{bucket}/images/{row['id']}.png")
        lines.append(json.dumps(row | {"image": f"s3://{bucket}/images/{row['id']}.png"}))
    fs.pipe(f"{bucket}/manifest.jsonl", ("\n".join(lines) + "\n").encode())
    return storage, fs, bucket


def test_a_qwen3_vl_model_trains_its_modules_and_answers_a_job_on_s3(on_s3, tiny_qwen3_checkpoint, ray_session):
    storage, fs, bucket = on_s3
    local_manifest = fs.cat_file(f"{bucket}/manifest.jsonl").decode()
    model = f"s3://{bucket}/models/qwen3-tiny"
    manifest = f"s3://{bucket}/manifest.jsonl"
    trained = small_config(manifest=manifest, model=model, output=f"s3://{bucket}/train", storage=storage)
    assert run(trained, check(trained))["steps"] == 2
    modules = GlimpseConfig.from_dict(json.loads(fs.cat_file(f"{bucket}/train/glimpse/config.json")))
    assert modules.raw["model_type"] == "qwen3_vl"

    config = JobConfig.validated(
        dict(
            manifest=manifest,
            model=model,
            glimpse=f"s3://{bucket}/train/glimpse",
            output=f"s3://{bucket}/answers",
            storage=storage,
            max_new_tokens=3,
            batch_size=4,
            keep_masks=True,
        )
    )
    summary = run_vqa(config)
    assert summary.rows == summary.rows_ok == 8

    pafs, path = pyarrow_filesystem(config.output, storage)
    rows = pq.read_table(path, filesystem=pafs).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(json.loads(line)["id"] for line in local_manifest.splitlines())
    costs = CostModel(AutoConfig.from_pretrained(tiny_qwen3_checkpoint / "base"), modules, dtype_bytes=4)
    for row in rows:
        assert row["error"] is None and row["pruned"], row
        grid = [tuple(row["image_grid_thw"][i : i + 3]) for i in range(0, len(row["image_grid_thw"]), 3)]
        assert grid == [(1, 14, 14)]  # 224 × 224 pixels in 16-pixel patches
        (mask,) = unpack(row["kept_mask"], row["image_grid_thw"])
        assert mask.size == row["n_visual_tokens"] == 49 and mask.sum() == row["n_visual_kept"]
        expected = costs.row(grid, row["n_prompt_tokens"], row["n_prompt_tokens_kept"], row["n_generated_tokens"], True)
        assert row["prefill_flops"] == pytest.approx(expected.prefill_flops, rel=1e-9)
        assert row["prefill_flops_unpruned"] == pytest.approx(expected.prefill_flops_unpruned, rel=1e-9)
        assert row["kv_cache_bytes"] == expected.kv_cache_bytes
    assert json.loads(fs.cat_file(f"{bucket}/answers/{SUMMARY_FILE}"))["rows"] == 8


@pytest.mark.parametrize(
    "model_config, glimpse, message",
    [
        (None, "fixture", "--glimpse .*: glimpse modules do not fit the model: trained on a qwen2_5_vl model"),
        ('{"model_type": "llava"}', None, "--model .*: model_type 'llava' is not supported; supported: qwen2_5_vl"),
        ('{"model_type": "qwen3_vl_moe"}', None, "--model .*: model_type 'qwen3_vl_moe' is not supported"),
        ("{not json", None, "--model .*: cannot read its config.json: Expecting property name"),
        ("[1, 2]", None, "--model .*: its config.json is not a JSON object"),
        ('{"model_type": ["qwen3_vl"]}', None, "--model .*: model_type \\['qwen3_vl'\\] is not supported"),
        (None, "no model_type", "--glimpse .*: vision patch_size: modules were built for 14, the model has 16"),
        (None, "[]", "--glimpse .*: its config.json is not a JSON object"),
        (None, "negative layer", "--glimpse .*: the glimpse config's selected_layers is not a list of layer indices"),
        (None, "text_config list", "--glimpse .*: the glimpse config's text_config is not an object"),
        (None, "null model_type", "--glimpse .*: vision patch_size: modules were built for 14, the model has 16"),
        (None, "list model_type", "--glimpse .*: the modules' model_type \\['qwen3_vl'\\] is not a string"),
        (None, "unknown activation", "--glimpse .*: attn_fuse_hidden_act 'os.system' is not an activation"),
        (None, "window under a token", "--glimpse .*: a windowed VIP .* window_size 16 px is under 2 × 14 px"),
        (
            '{"model_type": "qwen3_vl", "text_config": {"num_hidden_layers": "4"}}',
            "fixture",
            "--model .*: transformers cannot read its config.json: .*num_hidden_layers",
        ),
    ],
)
def test_a_model_or_modules_the_engine_cannot_run_are_refused_before_ray(
    tiny_qwen3_checkpoint, tmp_path, capsys, model_config, glimpse, message
):
    """One line and exit 2 from the driver, not a failure in every actor: the release's Qwen2.5-VL
    modules on a Qwen3-VL model of the same sizes, families with no adapter, configs that do not parse."""
    import re

    from jobs.vqa import main
    from tests.conftest import FIXTURE

    base = tiny_qwen3_checkpoint / "base"
    if model_config:
        base = tmp_path / "other"
        base.mkdir()
        (base / "config.json").write_text(model_config)
    options = ["--model", str(base), "--output", str(tmp_path / "out")]
    if glimpse:
        options += ["--glimpse", str(_modules(FIXTURE / "glimpse", glimpse, tmp_path))]
    assert main(options) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


def test_transformers_warnings_on_a_model_config_do_not_add_lines_to_a_refusal(tiny_qwen3_checkpoint, tmp_path):
    """A Qwen3-VL config relabelled as Qwen2.5-VL: transformers warns of the rope keys it does not know
    while the driver reads it (once per process, hence a process of its own); the refusal stays one line."""
    from tests.conftest import FIXTURE
    from tests.test_job_conventions import run_job

    relabelled = tmp_path / "relabelled"
    relabelled.mkdir()
    config = json.loads((tiny_qwen3_checkpoint / "base" / "config.json").read_text())
    (relabelled / "config.json").write_text(json.dumps(config | {"model_type": "qwen2_5_vl"}))
    options = ["--model", str(relabelled), "--glimpse", str(FIXTURE / "glimpse"), "--output", str(tmp_path / "out")]
    done, _ = run_job(options, tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: --glimpse {FIXTURE / 'glimpse'}: glimpse modules do not fit the model: "
        "vision patch_size: modules were built for 14, the model has 16"
    ]


def _modules(published, change: str, tmp_path):
    """The release's modules, or a copy whose config.json is changed as `change` says."""
    import shutil

    if change == "fixture":
        return published
    modules = shutil.copytree(published, tmp_path / "modules")
    config = json.loads((modules / "config.json").read_text())
    changed = {
        "no model_type": lambda c: {k: v for k, v in c.items() if k != "model_type"},
        "[]": lambda c: [],
        "negative layer": lambda c: c | {"selected_layers": [-1]},
        "text_config list": lambda c: c | {"text_config": [1, 2]},
        "null model_type": lambda c: c | {"model_type": None},
        "list model_type": lambda c: c | {"model_type": ["qwen3_vl"]},
        "unknown activation": lambda c: c | {"attn_fuse_hidden_act": "os.system"},
        "window under a token": lambda c: (
            c | {"attn_fuse_global": False, "vision_config": c["vision_config"] | {"window_size": 16}}
        ),
    }[change](config)
    (modules / "config.json").write_text(json.dumps(changed))
    return modules


def test_the_training_job_refuses_a_family_without_an_adapter_before_fetching_its_weights(tmp_path, on_s3, monkeypatch):
    """The config.json alone is read: the weights beside it are never fetched."""
    from pipeline.checkpoints import CheckpointError

    storage, fs, bucket = on_s3
    monkeypatch.setenv("GLIMPSE_BATCH_CACHE", str(tmp_path / "cache"))
    fs.pipe(f"{bucket}/moe/config.json", b'{"model_type": "qwen3_vl_moe"}')
    fs.pipe(f"{bucket}/moe/model.safetensors", b"\0" * 1024)
    config = small_config(
        manifest=f"s3://{bucket}/manifest.jsonl",
        model=f"s3://{bucket}/moe",
        output=str(tmp_path / "run"),
        storage=storage,
    )
    with pytest.raises(CheckpointError, match="model_type 'qwen3_vl_moe' is not supported"):
        check(config)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("model.safetensors"))
