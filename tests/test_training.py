"""jobs.train end to end: real Ray Train on a local Ray, real files and a real S3 API (moto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jobs import train as train_job
from pipeline.synthetic.grounding import write_dataset
from pipeline.training.data import parse_boxes, run_order
from pipeline.training.recipe import default_layer, default_vision_blocks, fresh_modules, glimpse_config
from tests.conftest import new_bucket

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--fresh", "--fuse-size", "32", "--cond-size", "32", "--batch-size", "2", "--grad-accum", "1"]


@pytest.fixture(scope="module")
def grounding(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("grounding"), n=12, seed=3)


def small_config(**options):
    """A TrainConfig for a few quick steps of fresh, small modules."""
    from pipeline.training.config import TrainConfig

    small = dict(fresh=True, fuse_size=32, cond_size=32, batch_size=2, grad_accum=1, steps=2)
    return TrainConfig.validated({**small, **options})


def train_command(manifest, model, output, *extra) -> list[str]:
    return [sys.executable, "-m", "jobs.train", "--manifest", str(manifest), "--model", str(model)] + [
        "--output",
        str(output),
        *SMALL,
        *extra,
    ]


def recorded_step(snapshot: Path) -> int:
    """The step of the latest checkpoint Ray Train has recorded (its snapshot is JSON in a JSON string)."""
    try:
        state = json.loads(snapshot.read_text())
        state = json.loads(state) if isinstance(state, str) else state
        return state["latest_checkpoint_result"]["metrics"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def test_a_killed_run_resumes_from_its_last_checkpoint_and_publishes_loadable_modules(
    grounding, tiny_checkpoint, tmp_path
):
    out = tmp_path / "run"
    command = train_command(grounding, tiny_checkpoint / "base", out, "--steps", "14", "--checkpoint-every", "2")
    command += ["--log-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if recorded_step(snapshot) >= 4:
            break
        time.sleep(0.5)
    assert first.poll() is None, f"the first run ended before its step-4 checkpoint:\n{first.stdout.read()}"
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = [line for line in second.stderr.splitlines() if line.startswith("resuming at step")]
    assert resumed, second.stderr[-2000:]
    resumed_step = int(resumed[0].split()[3])
    assert 4 <= resumed_step < 14

    summary = json.loads((out / "_train_summary.json").read_text())
    history = summary["history"]
    assert [h["step"] for h in history] == list(range(1, 15))  # nothing repeated, nothing lost
    assert summary["examples_consumed"] == 28 and summary["steps"] == 14
    # The data position went on where the checkpoint left it: every example read exactly once, in order.
    spans = [h["positions"] for h in history]
    assert spans == [[2 * i, 2 * i + 1] for i in range(14)]
    assert np.isfinite([h["loss"] for h in history]).all()
    assert summary["init"] == "fresh" and summary["failed_rows"] == 0

    # The published modules load in the engine and prune.
    from PIL import Image

    from pipeline.glimpse.engine import GlimpseEngine, Request

    engine = GlimpseEngine.from_pretrained(tiny_checkpoint / "base", out / "glimpse")
    row = json.loads(grounding.read_text().splitlines()[0])
    with Image.open(row["image"]) as image:
        (result,) = engine.generate([Request("r", [image.copy()], row["question"])], emit_masks=True)
    assert result.pruned and len(result.kept_mask) == result.n_visual_tokens == 64


def test_training_writes_checkpoints_and_modules_to_s3_and_the_vqa_job_loads_them(
    grounding, tiny_checkpoint, tmp_path, s3, ray_session
):
    from pipeline.config import JobConfig
    from pipeline.job import run as run_vqa
    from pipeline.training.run import check, run

    storage, fs = s3
    bucket = new_bucket(fs)
    config = small_config(
        manifest=str(grounding), model=str(tiny_checkpoint / "base"), output=f"s3://{bucket}/run", storage=storage
    )
    summary = run(config, check(config))
    assert summary["steps"] == 2
    assert fs.exists(f"{bucket}/run/glimpse/new_modules_gp.pt") and fs.exists(f"{bucket}/run/glimpse/config.json")
    assert fs.exists(f"{bucket}/run/checkpoints/step_00000002/state.pt")
    assert json.loads(fs.cat_file(f"{bucket}/run/_train_summary.json"))["examples_consumed"] == 4

    answered = run_vqa(
        JobConfig.validated(
            dict(
                manifest=str(grounding),
                model=str(tiny_checkpoint / "base"),
                glimpse=f"s3://{bucket}/run/glimpse",
                output=str(tmp_path / "answers"),
                max_new_tokens=2,
                storage=storage,
            )
        )
    )
    assert answered.rows == 12 and answered.rows_failed == 0 and answered.visual_tokens_kept < answered.visual_tokens


def test_a_datasets_folder_trains_like_a_manifest(grounding, tiny_checkpoint, tmp_path, ray_session):
    import datasets

    from pipeline.training.run import check, run

    rows = [json.loads(line) for line in grounding.read_text().splitlines()][:4]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
        }
    )
    data = {key: [r[key] for r in rows] for key in ("image", "question", "answer", "boxes")}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "ds"))
    config = small_config(
        dataset=str(tmp_path / "ds"), model=str(tiny_checkpoint / "base"), output=str(tmp_path / "out")
    )
    summary = run(config, check(config))
    assert summary["rows"] == 4 and summary["examples_consumed"] == 4 and summary["failed_rows"] == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (["--init-glimpse", "X"], "init_glimpse (modules to start from) or fresh"),
        (["--steps", "0"], "steps"),
        (["--layer", "1", "--no-fresh", "--init-glimpse", "{fixture}"], "shape fresh modules only"),
        (["--loc-weight", "0", "--le-weight", "0"], "nothing to train"),
        (["--vision-blocks", "3;1"], "vision_blocks"),
        (["--steps", "4", "--stepz", "3"], "unrecognized arguments: --stepz"),
        (["--layer", "10"], "reduce_layer 10 is past the model's 3 decoder layers"),
        (["--vision-blocks", "9"], "reach past the vision tower's 4 blocks"),
        (["--config", "{yaml}"], "lerning_rate: unknown option"),
        (["--output", "/proc/nope/out"], "cannot be created"),
    ],
)
def test_option_mistakes_are_one_line_and_exit_2(grounding, tiny_checkpoint, tmp_path, capsys, change, message):
    from tests.conftest import FIXTURE

    (tmp_path / "typo.yaml").write_text("lerning_rate: 5\n")
    change = [
        c.replace("{fixture}", str(FIXTURE / "glimpse")).replace("{yaml}", str(tmp_path / "typo.yaml")) for c in change
    ]
    args = ["--manifest", str(grounding), "--model", str(tiny_checkpoint / "base"), "--output", str(tmp_path)]
    args += ["--fresh", "--steps", "2", *change]
    try:
        code = train_job.main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_datasets_folder_without_images_in_its_image_column_is_refused(tiny_checkpoint, tmp_path, capsys):
    import datasets

    datasets.Dataset.from_dict(
        {"image": ["/a.png"], "question": ["q"], "answer": ["a"], "boxes": [[[0, 0, 1, 1]]]}
    ).save_to_disk(str(tmp_path / "ds"))
    args = [
        "--dataset",
        str(tmp_path / "ds"),
        "--model",
        str(tiny_checkpoint / "base"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert train_job.main([*args, "--fresh", "--steps", "1"]) == 2
    assert "holds Value('string'), not images" in capsys.readouterr().err
    assert train_job.main([*args, "--fresh", "--steps", "1", "--image-column", "picture"]) == 2
    assert "no column 'picture'" in capsys.readouterr().err


def test_rows_that_cannot_be_trained_on_refuse_the_run_naming_them(tiny_checkpoint, tmp_path, capsys):
    rows = [
        {"id": "ok", "image": "/x.png", "question": "where", "answer": "here", "boxes": [[0, 0, 1, 1]]},
        {"id": "no-answer", "image": "/x.png", "question": "where", "boxes": [[0, 0, 1, 1]]},
        {"id": "outside", "image": "/x.png", "question": "q", "answer": "a", "boxes": [[0, 0, 1.5, 1]]},
        {"id": "flipped", "image": "/x.png", "question": "q", "answer": "a", "boxes": [[0.5, 0, 0.2, 1]]},
        {"id": "two", "images": ["/x.png", "/y.png"], "question": "q", "answer": "a", "boxes": [[0, 0, 1, 1]]},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["--manifest", str(manifest), "--model", str(tiny_checkpoint / "base"), "--output", str(tmp_path / "o")]
    assert train_job.main([*args, "--fresh", "--steps", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "4 of 5 rows" in line
    for name in ("no-answer", "outside", "flipped", "two"):
        assert name in line


def test_a_rerun_resumes_only_the_same_run_and_republishes_in_place(
    grounding, tiny_checkpoint, tmp_path, capsys, ray_session
):
    from pipeline.training.run import check, run

    out = tmp_path / "o"
    options = dict(manifest=str(grounding), model=str(tiny_checkpoint / "base"), output=str(out), checkpoint_every=1)
    config = small_config(**options)
    run(config, check(config))
    run(config, check(config))  # finished: publishes again, in place
    assert sorted(p.name for p in (out / "glimpse").iterdir()) == ["config.json", "new_modules_gp.pt"]

    args = ["--manifest", str(grounding), "--model", str(tiny_checkpoint / "base"), "--output", str(out)]
    small = ["--fresh", "--fuse-size", "32", "--cond-size", "32", "--batch-size", "2", "--grad-accum", "1"]
    assert train_job.main([*args, *small, "--steps", "5", "--le-weight", "0.5"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "other settings" in line and "steps: 2 → 5" in line and "le_weight: 1.0 → 0.5" in line

    # The rows are part of the run: the same manifest path with other rows is another run.
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(grounding.read_text().splitlines()[:-1]))
    assert train_job.main(["--manifest", str(changed), *args[2:], *small, "--steps", "2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "rows_digest" in line

    # A missing checkpoint is named, with what to remove.
    for step in (out / "checkpoints").glob("step_*"):
        (step / "state.pt").unlink()
    assert train_job.main([*args, *small, "--steps", "2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "lacks state.pt" in line and "checkpoints to start over" in line


def test_the_job_trains_qwen3_vl_modules_that_the_engine_loads_and_prunes_with(
    grounding, tiny_qwen3_checkpoint, tmp_path, capsys, ray_session
):
    """`python -m jobs.train` on a Qwen3-VL base: fresh modules shaped for it (DeepStack, q/k
    norms, 32-pixel visual tokens), a few steps, published where the engine loads them."""
    from PIL import Image

    from pipeline.glimpse.config import GlimpseConfig
    from pipeline.glimpse.engine import GlimpseEngine, Request
    from pipeline.glimpse.sampling import SamplingParams

    base, out = tiny_qwen3_checkpoint / "base", tmp_path / "run"
    args = ["--manifest", str(grounding), "--model", str(base), "--output", str(out), *SMALL, "--steps", "3"]
    assert train_job.main([*args, "--log-every", "1"]) == 0, capsys.readouterr().err[-3000:]
    assert "trained 3 steps on 6 examples" in capsys.readouterr().out

    summary = json.loads((out / "_train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["failed_rows"] == 0 and summary["init"] == "fresh"
    assert [h["examples"] for h in summary["history"]] == [2, 2, 2]
    assert np.isfinite([[h["loss"], h["loc_loss"], h["le_loss"]] for h in summary["history"]]).all()
    published = GlimpseConfig.load(out / "glimpse")
    assert published.raw["model_type"] == "qwen3_vl" and published.vision_patch_size == 16
    assert published.reduce_layer == 2  # 9/14 of the way through 4 layers, at least one layer after it

    engine = GlimpseEngine.from_pretrained(base, out / "glimpse")
    row = json.loads(grounding.read_text().splitlines()[0])
    with Image.open(row["image"]) as image:
        request = Request("r", [image.copy()], row["question"], SamplingParams(max_new_tokens=2))
    (result,) = engine.generate([request], emit_masks=True)
    # A 224-pixel image is 7 × 7 visual tokens of 32 pixels (16-pixel patches merged 2 × 2).
    assert result.pruned and len(result.kept_mask) == result.n_visual_tokens == 49
    assert 1 <= sum(result.kept_mask) == result.n_visual_kept and result.image_grid_thw == [[1, 14, 14]]
    assert result.n_generated_tokens == 2


def test_an_output_with_no_checkpoint_is_not_locked_by_an_earlier_failed_start(grounding, tiny_checkpoint, tmp_path):
    from pipeline.training.run import check

    out = tmp_path / "o"
    out.mkdir()
    (out / "_train_config.json").write_text(json.dumps({"steps": 3, "layer": 10}))
    check(small_config(manifest=str(grounding), model=str(tiny_checkpoint / "base"), output=str(out)))


def test_a_run_where_every_row_fails_exits_1_and_says_the_modules_are_untrained(tiny_checkpoint, tmp_path, ray_session):
    from pipeline.training.run import NothingTrained, check, run

    rows = [
        {
            "id": f"r{i}",
            "image": str(tmp_path / f"missing{i}.png"),
            "question": "q",
            "answer": "a",
            "boxes": [[0, 0, 1, 1]],
        }
        for i in range(4)
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    config = small_config(manifest=str(manifest), model=str(tiny_checkpoint / "base"), output=str(tmp_path / "o"))
    with pytest.raises(NothingTrained, match="no example could be prepared .4 rows failed, e.g. r.: not_found"):
        run(config, check(config))
    summary = json.loads((tmp_path / "o" / "_train_summary.json").read_text())
    assert summary["failed_rows"] == 4 and summary["failed_examples"][0]["error"].startswith("not_found")


def test_modules_that_do_not_fit_the_model_are_refused_before_ray(grounding, tiny_checkpoint, tmp_path, capsys):
    from tests.conftest import FIXTURE

    args = ["--manifest", str(grounding), "--model", str(tiny_checkpoint / "base"), "--output", str(tmp_path)]
    assert train_job.main([*args, "--init-glimpse", str(FIXTURE / "glimpse"), "--steps", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "do not fit the model" in line


def test_the_run_order_is_seeded_epochs_and_a_resume_continues_it():
    whole = run_order(5, 0, 12, seed=1)
    assert len(whole) == 12
    for epoch in (whole[:5], whole[5:10]):
        assert sorted(epoch) == list(range(5))
    assert not np.array_equal(whole[:5], whole[5:10])
    assert np.array_equal(run_order(5, 7, 12, seed=1), whole[7:])
    assert np.array_equal(run_order(5, 0, 12, seed=1), whole)


def test_boxes_are_parsed_from_lists_json_and_json_numbers():
    from pipeline.sources import InvalidRow, JsonNumber

    assert parse_boxes([[0, 0.5, 1, 1]]) == [[0.0, 0.5, 1.0, 1.0]]
    assert parse_boxes("[[0.1, 0.2, 0.3, 0.4]]") == [[0.1, 0.2, 0.3, 0.4]]
    assert parse_boxes([[JsonNumber("0"), JsonNumber("0"), JsonNumber("1e0"), JsonNumber("1")]]) == [[0, 0, 1, 1]]
    for bad in (None, [], "not json", [[0, 0, 1]], [["a", 0, 1, 1]], [[0, 0, 2, 1]], [[0.6, 0, 0.5, 1]]):
        with pytest.raises(InvalidRow):
            parse_boxes(bad)


def test_fresh_modules_follow_the_published_shapes_and_the_release_init():
    from transformers import Qwen2_5_VLConfig

    assert default_layer(28, 3584) == 18 and default_layer(36, 2048) == 23 and default_layer(4, 64) == 2
    assert default_vision_blocks(32) == [31, 23, 15, 7]
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, out_hidden_size=64),
    )
    glimpse = glimpse_config(config, fuse_size=32, cond_size=32)
    assert glimpse.selected_layers == [2] and glimpse.reduce_layer == 2 and glimpse.le_layers == [0, 1, 2, 3]
    assert glimpse.selected_visual_layers == [3, 2, 1, 0]
    modules = fresh_modules(glimpse, seed=0)
    params = dict(modules.named_parameters())
    assert abs(params["learnable_embeddings"].std().item() - 0.02) < 0.005
    assert (params["le_norm.weight"] == 1).all() and (params["attn_fuser.layers.0.norm1.weight"] == 1).all()
    assert (params["le_proj.bias"] == 0).all() and (params["attn_fuser.attn_in_proj.bias"] == 0).all()
    bound = (6 / (64 + 64)) ** 0.5  # Xavier-uniform for a 64 → 64 projection
    assert params["le_proj.weight"].abs().max() <= bound and params["le_proj.weight"].std() > bound / 3
    assert fresh_modules(glimpse, seed=0).learnable_embeddings.equal(modules.learnable_embeddings)


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "tiny_qwen3_checkpoint"])
def test_a_few_steps_on_cpu_teach_the_vip_to_keep_the_named_shape(checkpoint, request, tmp_path):
    """A weaker, faster version of the README's proof: fresh modules, plain PyTorch steps of the
    job's objective, then the engine's kept masks on held-out images overlap the target's box far
    better than before, for each model family."""
    import torch
    from PIL import Image

    from pipeline.glimpse.architectures import architecture_of_checkpoint
    from pipeline.glimpse.engine import GlimpseEngine, Request
    from pipeline.glimpse.objective import Example, GlimpseObjective
    from pipeline.glimpse.prompts import PromptBuilder
    from pipeline.glimpse.sampling import SamplingParams
    from pipeline.training.evaluate import score

    torch.manual_seed(0)
    base = request.getfixturevalue(checkpoint) / "base"
    model = architecture_of_checkpoint(base).load(base, dtype=torch.float32, attn_implementation="sdpa", device="cpu")
    prompts = PromptBuilder.from_pretrained(base, model.config)
    glimpse = glimpse_config(model.config, read_layers=[0, 1], fuse_size=32, cond_size=32)
    modules = fresh_modules(glimpse, seed=0)

    def load(manifest):
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        images = {}
        for row in rows:
            with Image.open(row["image"]) as image:
                images[row["id"]] = image.copy()
        return rows, images

    def held_out_iou(rows, images):
        modules.save(tmp_path / "modules")
        engine = GlimpseEngine.from_pretrained(base, tmp_path / "modules")
        requests = [Request(r["id"], [images[r["id"]]], r["question"], SamplingParams(max_new_tokens=1)) for r in rows]
        results = [r.columns() for r in engine.generate(requests, emit_masks=True)]
        return score(results, {r["id"]: r["boxes"] for r in rows}).iou

    train_rows, train_images = load(write_dataset(tmp_path / "train", n=64, seed=21, distractors=0))
    held_rows, held_images = load(write_dataset(tmp_path / "held", n=24, seed=22, distractors=0))
    examples = [
        Example(r["id"], prompts.training([train_images[r["id"]]], r["question"], r["answer"]), r["boxes"])
        for r in train_rows
    ]
    before = held_out_iou(held_rows, held_images)
    objective = GlimpseObjective(model, modules, prompts.tokenizer.pad_token_id or 0)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-2)
    for step in range(40):
        batch = [examples[(step * 8 + i) % len(examples)] for i in range(8)]
        objective(batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    after = held_out_iou(held_rows, held_images)
    assert before < 0.25 and after > before + 0.2, (before, after)


DATA_PARALLEL = """
import json, sys
import ray
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
from pipeline.training.config import TrainConfig
from pipeline.training.run import check, run
options = json.loads(sys.argv[1])
config = TrainConfig.validated(options)
summary = run(config, check(config))
print(json.dumps(summary["history"]))
"""


def test_two_workers_train_data_parallel(grounding, tiny_checkpoint, tmp_path):
    """DDP over the modules on two Ray Train workers (a Ray of its own with 4 logical CPUs: two
    workers and the preparation tasks): each step reads both workers' examples."""
    options = dict(
        manifest=str(grounding),
        model=str(tiny_checkpoint / "base"),
        output=str(tmp_path / "out"),
        fresh=True,
        fuse_size=32,
        cond_size=32,
        batch_size=2,
        grad_accum=2,
        steps=3,
        num_workers=2,
        log_every=1,
    )
    done = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL, json.dumps(options)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads(done.stdout.strip().splitlines()[-1])
    assert [h["examples"] for h in history] == [8, 8, 8]  # 2 workers × batch 2 × 2 accumulated
    assert [h["examples_consumed"] for h in history] == [8, 16, 24]
    assert np.isfinite([h["loss"] for h in history]).all()
    modules = tmp_path / "out" / "glimpse" / "new_modules_gp.pt"
    assert modules.exists()


def test_a_worker_pool_the_local_ray_cannot_hold_is_refused(tmp_path):
    from pipeline.training.run import unschedulable

    config = small_config(manifest="m.jsonl", model="m", output=str(tmp_path), num_workers=2)
    assert "2.5 CPUs; Ray has 2" in unschedulable(config, {"CPU": 2})
    assert unschedulable(config, {"CPU": 3}) is None
    gpu = small_config(manifest="m.jsonl", model="m", output=str(tmp_path), use_gpu=True)
    assert "need 1 GPUs" in unschedulable(gpu, {"CPU": 8})
