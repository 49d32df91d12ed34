"""What each Ray Train worker runs: load the frozen base, build or restore the modules, step.

A checkpoint holds the modules in the published format (`glimpse/`) and `state.pt`: optimizer,
scheduler, step, examples consumed and the metrics so far. Rank 0 sends progress to the driver
through a Ray queue; every worker reports to Ray Train, so DDP and checkpoints stay in step.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.glimpse.modules import GlimpseModules
from pipeline.glimpse.objective import GlimpseObjective, LossWeights, ObjectiveOutput
from pipeline.glimpse.prompts import DTYPES, PromptBuilder
from pipeline.training.config import TrainConfig
from pipeline.training.data import examples
from pipeline.training.recipe import fresh_modules, glimpse_config

STATE_FILE = "state.pt"
MODULES_DIR = "glimpse"
SHOWN_FAILURES = 20


@dataclass
class Window:
    """Sums over the steps since the last report: loss parts, and the kept tokens (the VIP's last
    output above 0.5, as the release logs it) against the box tokens."""

    examples: int = 0
    loss: float = 0.0
    loc_loss: float = 0.0
    le_loss: float = 0.0
    kept: int = 0
    tokens: int = 0
    true_positive: int = 0
    box_tokens: int = 0
    first_position: int = 2**62  # the run's examples (rows in the run's order) this window read
    last_position: int = -1
    failed: list[tuple[str, str]] = field(default_factory=list)

    def read(self, positions: list[int]) -> None:
        self.first_position = min(self.first_position, *positions)
        self.last_position = max(self.last_position, *positions)

    def add(self, out: ObjectiveOutput, n: int) -> None:
        self.examples += n
        self.loss += out.loss.item() * n
        self.loc_loss += out.loc_loss.item() * n
        self.le_loss += out.le_loss.item() * n
        for logits, ref in zip(out.mask_logits, out.ref_masks):
            kept = logits.sigmoid().cpu() > 0.5
            self.kept += int(kept.sum())
            self.tokens += kept.numel()
            self.true_positive += int((kept & ref).sum())
            self.box_tokens += int(ref.sum())

    def totals(self, device) -> list[float]:
        """The sums, added up over all workers when there are several."""
        sums = torch.tensor(
            [self.examples, self.loss, self.loc_loss, self.le_loss, self.kept, self.tokens]
            + [self.true_positive, self.box_tokens],
            dtype=torch.float64,
            device=device,
        )
        span = torch.tensor([self.first_position, -self.last_position], dtype=torch.int64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(span, op=torch.distributed.ReduceOp.MIN)
        first, last = span.tolist()
        return sums.tolist() + [first, -last]


def window_metrics(totals: list[float]) -> dict:
    """Means per example, keep ratio, the kept tokens' recall, precision and IoU against the boxes,
    and the first and last positions (in the run's order) of the examples read."""
    n, loss, loc, le, kept, tokens, hit, box, first, last = totals
    union = kept + box - hit
    return {
        "examples": int(n),
        "positions": [int(first), int(last)],
        "loss": loss / n if n else math.nan,
        "loc_loss": loc / n if n else math.nan,
        "le_loss": le / n if n else math.nan,
        "keep_ratio": kept / tokens if tokens else math.nan,
        "recall": hit / box if box else math.nan,
        "precision": hit / kept if kept else math.nan,
        "iou": hit / union if union else math.nan,
    }


def train_worker(setup: dict) -> None:
    """The per-worker training function (`TorchTrainer`'s train_loop_per_worker)."""
    import ray.train
    import ray.train.torch
    from transformers import Qwen2_5_VLForConditionalGeneration, get_cosine_schedule_with_warmup

    config = TrainConfig.model_validate(setup["config"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    model_dir = setup["model"].local_dir(config.storage)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir,
        dtype=DTYPES[config.model_dtype(device.type == "cuda")],
        attn_implementation=config.attn,
        use_safetensors=True,
    ).to(device)
    tokenizer = PromptBuilder.from_pretrained(model_dir, model.config).tokenizer

    restored = ray.train.get_checkpoint()
    state = {}
    if restored is not None:
        with restored.as_directory() as directory:
            modules = GlimpseModules.load(Path(directory) / MODULES_DIR, model.config)
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
    elif setup["init_glimpse"] is not None:
        modules = GlimpseModules.load(setup["init_glimpse"].local_dir(config.storage), model.config)
    else:
        modules = fresh_modules(
            glimpse_config(
                model.config,
                layer=config.layer,
                read_layers=config.read_layer_list,
                vision_blocks=config.vision_block_list,
                fuse_size=config.fuse_size,
                cond_size=config.cond_size,
                vip_heads=config.vip_heads,
            ),
            config.seed,
        )
    modules = modules.to(device=device, dtype=torch.float32).train()  # fp32 master weights
    weights = LossWeights(loc=config.loc_weight, dice=config.dice_weight, bce=config.bce_weight, le=config.le_weight)
    objective = ray.train.torch.prepare_model(
        GlimpseObjective(model, modules, tokenizer.pad_token_id or 0, weights), move_to_device=False
    )
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * config.steps), config.steps)
    step, consumed, history = 0, setup["start"], []
    failed, failed_count = [], 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        failed, failed_count = state["failed"], state["failed_count"]

    window, micro, started = Window(), 0, time.perf_counter()
    shard = ray.train.get_dataset_shard("train")
    for batch in shard.iter_batches(batch_size=config.batch_size, batch_format="pyarrow"):
        good, bad = examples(batch.to_pylist())
        window.failed += bad
        window.read(batch.column("position").to_pylist())
        last_micro = micro + 1 == config.grad_accum
        with nullcontext() if last_micro or not hasattr(objective, "no_sync") else objective.no_sync():
            out = objective(good)
            (out.loss / config.grad_accum).backward()
        if good:
            window.add(out, len(good))
        micro += 1
        if not last_micro:
            continue
        torch.nn.utils.clip_grad_norm_(modules.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, micro = step + 1, 0
        consumed += config.rows_per_step
        done = step == config.steps
        if not (done or step % config.log_every == 0 or step % config.checkpoint_every == 0):
            continue
        totals = window.totals(device)
        failures = _gather_failures(window.failed)
        failed_count += len(failures)
        failed = (failed + failures)[:SHOWN_FAILURES]
        metrics = {
            "step": step,
            "examples_consumed": consumed,
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - started,
            "failed_rows": failed_count,
            **window_metrics(totals),
        }
        history.append(metrics)
        if rank == 0 and setup.get("progress") is not None:
            setup["progress"].put(metrics)
        window, started = Window(), time.perf_counter()
        if done or step % config.checkpoint_every == 0:
            _report_with_checkpoint(
                metrics, modules, optimizer, scheduler, step, consumed, history, failed, failed_count, rank
            )
        else:
            ray.train.report(metrics)
        if done:
            break


def _gather_failures(local: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every worker's failed rows since the last report."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(local)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(local))
    return [f for part in gathered for f in part]


def _report_with_checkpoint(
    metrics, modules, optimizer, scheduler, step, consumed, history, failed, failed_count, rank
):
    """Every worker reports; rank 0 alone writes the checkpoint (the workers' modules are equal)."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            modules.save(Path(directory) / MODULES_DIR)
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "examples_consumed": consumed,
                    "history": history,
                    "failed": failed,
                    "failed_count": failed_count,
                },
                Path(directory) / STATE_FILE,
            )
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:08d}")
