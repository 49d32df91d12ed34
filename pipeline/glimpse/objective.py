"""GlimpsePrune's training objective, as the release computes it (`train_qwen_gp.py`, `model_gp.py`).

The base model is frozen; gradients reach only the glimpse embeddings and the VIP. One forward
runs the whole conversation with the glimpse token inserted where the answer turn starts:
- localisation: at the selected layers the glimpse's attention over the image feeds the VIP,
  whose logits are scored against the merged-grid cells the evidence boxes cover
  (`dice`·Dice + `bce`·BCE per VIP output, each averaged over samples);
- language: the answer tokens' cross-entropy, predicted with the glimpse in place (the glimpse's
  own state predicts the first answer token), averaged over the batch's answer tokens.

    python -m pipeline.glimpse.objective --model DIR --glimpse DIR --cases FILE --root DIR \\
        --batch-size B --out out.jsonl

writes one line per batch: ids, ref_token_masks, loc_loss, le_loss, loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.glimpse.architectures import architecture_of, architecture_of_checkpoint
from pipeline.glimpse.cache import PrunableKVCache
from pipeline.glimpse.inputs import add_deepstack, decoder_inputs
from pipeline.glimpse.masks import attention_mask
from pipeline.glimpse.modules import GlimpseModules
from pipeline.glimpse.prompts import ANSWER_STARTS, PreparedPrompt, TrainingPrompt
from pipeline.glimpse.readout import glimpse_logits

DICE_EPSILON = 1e-6


@dataclass(frozen=True)
class LossWeights:
    """The published 7B recipe's weights."""

    loc: float = 1.0
    dice: float = 1.0
    bce: float = 0.1
    le: float = 1.0


@dataclass
class Example:
    """One training example: its inputs and the boxes ([x1, y1, x2, y2] in [0, 1]) of its evidence."""

    id: str
    prompt: TrainingPrompt
    boxes: list[list[float]]


@dataclass
class ObjectiveOutput:
    """loss = loc_loss + le_loss (both already weighted); mask_logits: per example, the last VIP
    output's logits over its visual tokens; ref_masks: per example, the boxes' token mask."""

    loss: torch.Tensor
    loc_loss: torch.Tensor
    le_loss: torch.Tensor
    mask_logits: list[torch.Tensor]
    ref_masks: list[torch.Tensor]


def ref_token_mask(boxes: list[list[float]], grid_hw: tuple[int, int]) -> torch.Tensor:
    """The merged-grid cells (raster order, [h·w] bool) that a box covers: a box spans the cells
    from int(x1·w) to int(x2·w) inclusive (clamped to the grid), likewise in y, as the release's
    `get_ref_token_mask` does."""
    h, w = grid_hw
    mask = torch.zeros((h, w), dtype=torch.bool)
    for x1, y1, x2, y2 in boxes:
        rows = slice(max(int(y1 * h), 0), min(int(y2 * h), h - 1) + 1)
        mask[rows, max(int(x1 * w), 0) : min(int(x2 * w), w - 1) + 1] = True
    return mask.flatten()


def mask_loss(logits: list[torch.Tensor], targets: list[torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """dice·Dice(sigmoid) + bce·BCE-with-logits, each per example then averaged over examples."""
    dice, bce = [], []
    for row_logits, target in zip(logits, targets):
        target = target.to(device=row_logits.device, dtype=torch.float32)
        row_logits = row_logits.float()
        prob = row_logits.sigmoid()
        overlap = (prob * target).sum()
        dice.append(1 - (2 * overlap + DICE_EPSILON) / (prob.sum() + target.sum() + DICE_EPSILON))
        bce.append(F.binary_cross_entropy_with_logits(row_logits, target))
    return weights.dice * torch.stack(dice).mean() + weights.bce * torch.stack(bce).mean()


class FrozenModel:
    """Holds the base model outside the module tree, so that wrapping the objective (DDP,
    `.to()`, `state_dict()`) sees only the trainable glimpse modules."""

    def __init__(self, model) -> None:
        self.model = model.eval().requires_grad_(False)


class GlimpseObjective(nn.Module):
    """The release's loss for a batch of examples; its only parameters are the glimpse modules'."""

    def __init__(self, model, modules: GlimpseModules, pad_token_id: int, weights: LossWeights | None = None):
        super().__init__()
        self.base = FrozenModel(model)
        self.glimpse = modules
        self.pad_token_id = pad_token_id
        self.weights = weights or LossWeights()

    def forward(self, examples: list[Example]) -> ObjectiveOutput:
        if not examples:
            # A data-parallel worker whose rows all failed still joins the step's gradient sync.
            zero = sum(p.sum() for p in self.glimpse.parameters()) * 0.0
            return ObjectiveOutput(zero, zero, zero, [], [])
        model, config = self.base.model, self.glimpse.config
        architecture = architecture_of(model.config)
        _require_one_image(examples)
        language_model = model.model.language_model
        # The glimpse token goes where the answer turn starts; the answer moves one column right.
        prompts = [_with_glimpse_slot(e.prompt.prompt, e.prompt.answer_start, self.pad_token_id) for e in examples]
        with torch.no_grad():
            inputs = decoder_inputs(model, prompts, self.pad_token_id, config.selected_visual_layers)
        batch, width = inputs.ids.shape
        rows = torch.arange(batch, device=inputs.ids.device)
        column = torch.tensor(
            [width - len(p.input_ids) + e.prompt.answer_start for p, e in zip(prompts, examples)],
            device=inputs.ids.device,
        )
        embeddings = {layer: g.to(inputs.embeds.dtype) for layer, g in self.glimpse.glimpse_embeddings().items()}
        hidden = inputs.embeds.index_put((rows, column), embeddings[0].expand(batch, -1))
        last_layer = len(language_model.layers) - 1 if self.weights.le else max(config.selected_layers)
        rotary = language_model.rotary_emb(hidden, inputs.positions)
        mask = attention_mask(inputs.valid, width, language_model.config._attn_implementation or "sdpa", hidden.dtype)
        visible = inputs.valid & (torch.arange(width, device=rows.device)[None] <= column[:, None])
        cache = PrunableKVCache(len(language_model.layers))
        reads, deepstack = [], inputs.vision.deepstack
        for i in range(last_layer + 1):
            layer = language_model.layers[i]
            if i > 0 and i in embeddings:
                hidden = hidden.index_put((rows, column), embeddings[i].expand(batch, -1), accumulate=True)
            read = i in config.selected_layers
            query = architecture.glimpse_query(layer, hidden, rotary, column) if read else None
            output = layer(hidden, attention_mask=mask, position_embeddings=rotary, past_key_values=cache)
            hidden = output[0] if isinstance(output, tuple) else output
            if i < len(deepstack):
                hidden = add_deepstack(hidden, inputs.image, deepstack[i])
            if query is not None:
                reads.append(glimpse_logits(layer, query, cache.layer(i)[0], visible, config.use_attention_logits))

        vip = self.glimpse.attn_fuser
        feats = torch.stack(reads, dim=2).flatten(2)[inputs.image]  # (N, layers·heads), layer-major
        grid_hw = architecture.vip_grid(inputs.grid.tolist(), config.spatial_merge_size)
        outputs = vip.supervised_outputs(
            feats.to(vip.attn_in_proj.weight.dtype),
            [v.to(vip.attn_in_proj.weight.dtype) for v in inputs.vision.selected],
            grid_hw,
        )
        per_row = inputs.image.sum(dim=1).tolist()
        refs = [ref_token_mask(e.boxes, hw) for e, hw in zip(examples, grid_hw)]
        loc = sum(mask_loss(list(out.split(per_row)), refs, self.weights) for out in outputs) * self.weights.loc

        le = hidden.new_zeros((), dtype=torch.float32)
        if self.weights.le:
            # Column t predicts token t+1; the answer's tokens are those after the glimpse.
            predicts = torch.arange(width - 1, device=rows.device)[None] >= column[:, None]
            states = language_model.norm(hidden[:, :-1][predicts])
            le = F.cross_entropy(model.lm_head(states).float(), inputs.ids[:, 1:][predicts]) * self.weights.le
        return ObjectiveOutput(
            loss=loc + le,
            loc_loss=loc,
            le_loss=le,
            mask_logits=[r.detach() for r in outputs[-1].split(per_row)],
            ref_masks=refs,
        )


def _with_glimpse_slot(prompt: PreparedPrompt, answer_start: int, slot_id: int) -> PreparedPrompt:
    """`prompt` with one more token, `slot_id`, at `answer_start`: the glimpse's column."""
    ids = prompt.input_ids
    slot = torch.tensor([slot_id], dtype=ids.dtype)
    return PreparedPrompt(
        torch.cat([ids[:answer_start], slot, ids[answer_start:]]), prompt.pixel_values, prompt.image_grid_thw
    )


def _require_one_image(examples: list[Example]) -> None:
    """Boxes locate evidence in one image, as in the release."""
    counts = [len(e.prompt.prompt.image_grid_thw) for e in examples]
    if any(n != 1 for n in counts):
        raise ValueError(f"training examples need exactly one image each; got {counts}")


# ---- command ---------------------------------------------------------------------------------


def load_examples(cases_path: Path, root: Path, prompts, answer_start: str = "release") -> list[Example]:
    """Cases ({id, image, question, answer, boxes}; a JSON list or JSON lines), images under `root`;
    the glimpse where the release's collator puts it, unless `answer_start` says otherwise.
    A case that cannot be used is a ValueError naming it."""
    from PIL import Image

    from pipeline.training.data import parse_boxes

    text = cases_path.read_text()
    try:
        cases = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except ValueError as e:
        raise ValueError(f"{cases_path} is not a JSON list or JSON lines: {e}") from None
    if not cases:
        raise ValueError(f"{cases_path} holds no cases")
    examples = []
    for n, case in enumerate(cases):
        name = case.get("id", f"#{n}") if isinstance(case, dict) else f"#{n}"
        try:
            missing = {"id", "image", "question", "answer", "boxes"} - set(case)
            if missing:
                raise ValueError(f"lacks {sorted(missing)} (one `image` per case)")
            boxes = parse_boxes(case["boxes"])
            with Image.open(root / case["image"]) as image:
                prompt = prompts.training([image], case["question"], case["answer"], answer_start)
        except (ValueError, TypeError, OSError) as e:
            raise ValueError(f"case {name}: {e}") from None
        examples.append(Example(str(case["id"]), prompt, boxes))
    return examples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.glimpse.objective",
        description="Computes GlimpsePrune's training loss (fp32, no update) for batches of cases.",
    )
    parser.add_argument("--model", required=True, help="base checkpoint: a directory or a hub id")
    parser.add_argument("--glimpse", required=True, help="glimpse modules directory (published format)")
    parser.add_argument("--cases", required=True, type=Path, help="JSON list or JSON lines of cases")
    parser.add_argument(
        "--root", type=Path, default=None, help="directory the cases' images are under (default: the cases' own)"
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--answer-start",
        choices=ANSWER_STARTS,
        default="release",
        help="where the glimpse goes and the labels begin: as the release's collator counts (default), "
        "or after the generation header, where inference puts the glimpse (the training job's choice; "
        "the same place with Qwen's tokenizer)",
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON lines: one per batch")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    from transformers import AutoConfig

    from pipeline.glimpse.prompts import PromptBuilder

    try:  # the cases first: a bad one is reported before the model loads
        prompts = PromptBuilder.from_pretrained(args.model, AutoConfig.from_pretrained(args.model))
        examples = load_examples(args.cases, args.root or args.cases.parent, prompts, args.answer_start)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    model = architecture_of_checkpoint(args.model).load(
        args.model, dtype=torch.float32, attn_implementation="sdpa", device="cpu"
    )
    modules = GlimpseModules.load(args.glimpse, model.config)
    objective = GlimpseObjective(model, modules, prompts.tokenizer.pad_token_id or 0).eval()
    with args.out.open("w") as out, torch.no_grad():
        for start in range(0, len(examples), args.batch_size):
            batch = examples[start : start + args.batch_size]
            result = objective(batch)
            line = {
                "ids": [e.id for e in batch],
                "ref_token_masks": [m.int().tolist() for m in result.ref_masks],
                "loc_loss": result.loc_loss.item(),
                "le_loss": result.le_loss.item(),
                "loss": result.loss.item(),
            }
            out.write(json.dumps(line) + "\n")
    print(f"wrote {args.out} ({-(-len(examples) // args.batch_size)} batches)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
