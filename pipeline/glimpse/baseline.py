"""Plain transformers `generate` on the engine's prepared prompts: what a user would run instead of
the engine. The tests check the unpruned engine against it token for token; the benchmarks time
it on the same requests and batches."""

from __future__ import annotations

import torch

from pipeline.glimpse.prompts import PreparedPrompt


@torch.inference_mode()
def transformers_generate(engine, prompts: list[PreparedPrompt], max_new_tokens: int, ignore_eos: bool = False):
    """One left-padded batch through `model.generate`, greedy; returns each row's new token ids
    (padding after an early stop removed). ignore_eos generates exactly max_new_tokens."""
    length = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), length), engine.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, length - len(p.input_ids) :] = p.input_ids
        mask[row, length - len(p.input_ids) :] = 1
    ids, mask = ids.to(engine.device), mask.to(engine.device)
    out = engine.model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=torch.cat([p.pixel_values for p in prompts]).to(engine.device, engine.model.dtype),
        image_grid_thw=torch.cat([p.image_grid_thw for p in prompts]).to(engine.device),
        mm_token_type_ids=(ids == engine.image_token_id).int(),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else None,
        do_sample=False,
        pad_token_id=engine.pad_token_id,
    )
    new = out[:, length:].tolist()
    return [_until_stop(row, engine.eos_token_ids) for row in new]


def _until_stop(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens
