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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.glimpse.architectures import architecture_of_checkpoint
from pipeline.glimpse.config import GlimpseConfig
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


@dataclass
class RunState:
    """What a checkpoint carries besides the modules and the optimizer: where the run is, the
    metrics of every logged window, and the rows that could not be prepared (the first few named)."""

    step: int = 0
    examples_consumed: int = 0
    history: list[dict] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    failed_count: int = 0

    def add_failures(self, failures: list[tuple[str, str]]) -> None:
        self.failed_count += len(failures)
        self.failed = (self.failed + failures)[:SHOWN_FAILURES]


def train_worker(setup: dict) -> None:
    """The per-worker training function (`TorchTrainer`'s train_loop_per_worker)."""
    import ray.train
    import ray.train.torch
    from transformers import get_cosine_schedule_with_warmup

    config = TrainConfig.model_validate(setup["config"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    model, pad_token_id = _base_model(setup["model"], config, device)
    modules, saved = _starting_modules(setup, config, model)
    modules = modules.to(device=device, dtype=torch.float32).train()  # fp32 master weights
    weights = LossWeights(loc=config.loc_weight, dice=config.dice_weight, bce=config.bce_weight, le=config.le_weight)
    objective = ray.train.torch.prepare_model(
        GlimpseObjective(model, modules, pad_token_id, weights), move_to_device=False
    )
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * config.steps), config.steps)
    state = RunState(examples_consumed=setup["start"])
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = RunState(**saved["run"])
        if state.examples_consumed != setup["start"]:
            raise RuntimeError(
                f"the checkpoint read {state.examples_consumed} examples but the data starts at {setup['start']}"
            )

    window, micro, started = Window(), 0, time.perf_counter()
    for batch in ray.train.get_dataset_shard("train").iter_batches(
        batch_size=config.batch_size, batch_format="pyarrow"
    ):
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
        micro = 0
        state.step += 1
        state.examples_consumed += config.rows_per_step
        done = state.step == config.steps
        checkpoint = done or state.step % config.checkpoint_every == 0
        if not (checkpoint or state.step % config.log_every == 0):
            continue
        totals = window.totals(device)
        state.add_failures(_gather_failures(window.failed))
        metrics = {
            "step": state.step,
            "examples_consumed": state.examples_consumed,
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - started,
            "failed_rows": state.failed_count,
            **window_metrics(totals),
        }
        state.history.append(metrics)
        if rank == 0 and setup.get("progress") is not None:
            setup["progress"].put(metrics)
        window, started = Window(), time.perf_counter()
        if checkpoint:
            _report_with_checkpoint(metrics, modules, optimizer, scheduler, state, rank)
        else:
            ray.train.report(metrics)
        if done:
            break


def _base_model(checkpoint, config: TrainConfig, device):
    """The frozen base model on `device`, and its tokenizer's padding id."""
    directory = checkpoint.local_dir(config.storage)
    model = architecture_of_checkpoint(directory).load(
        directory,
        dtype=DTYPES[config.model_dtype(device.type == "cuda")],
        attn_implementation=config.attn,
        device=device,
    )
    return model, PromptBuilder.from_pretrained(directory, model.config).tokenizer.pad_token_id or 0


def _starting_modules(setup: dict, config: TrainConfig, model) -> tuple[GlimpseModules, dict]:
    """The modules to train from: the run's last checkpoint (with its saved state), else the
    modules given, else fresh ones."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            modules = GlimpseModules.load(Path(directory) / MODULES_DIR, model.config)
            return modules, torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    if setup["init_glimpse"] is not None:
        return GlimpseModules.load(setup["init_glimpse"].local_dir(config.storage), model.config), {}
    return fresh_modules(fresh_config(config, model.config), config.seed), {}


def fresh_config(config: TrainConfig, model_config) -> GlimpseConfig:
    """The shape of fresh modules for this base, with the run's overrides."""
    return glimpse_config(
        model_config,
        layer=config.layer,
        read_layers=config.read_layer_list,
        vision_blocks=config.vision_block_list,
        fuse_size=config.fuse_size,
        cond_size=config.cond_size,
        vip_heads=config.vip_heads,
    )


def _gather_failures(local: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every worker's failed rows since the last report."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(local)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(local))
    return [f for part in gathered for f in part]


def _report_with_checkpoint(metrics: dict, modules, optimizer, scheduler, state: RunState, rank: int) -> None:
    """Every worker reports; rank 0 alone writes the checkpoint (the workers' modules are equal)."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            modules.save(Path(directory) / MODULES_DIR)
            saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "run": asdict(state)}
            torch.save(saved, Path(directory) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{state.step:08d}")
