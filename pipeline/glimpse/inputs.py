"""A left-padded batch of prepared prompts as the decoder's inputs, vision tower run once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.glimpse.architectures import architecture_of
from pipeline.glimpse.prompts import PreparedPrompt
from pipeline.glimpse.vision import VisionFeatures


@dataclass
class DecoderInputs:
    """embeds [B, T, H] (image features at the image pads); positions [3, B, T] (M-RoPE);
    valid [B, T] (False at padding); image [B, T] (True at image tokens); ids [B, T];
    vision: the tower's features; grid [n_images, 3]."""

    embeds: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    image: torch.Tensor
    ids: torch.Tensor
    vision: VisionFeatures
    grid: torch.Tensor


def decoder_inputs(model, prompts: list[PreparedPrompt], pad_token_id: int, blocks: list[int]) -> DecoderInputs:
    """Left-pads `prompts`, runs the vision tower (keeping `blocks` for the VIP) and scatters its
    features into the text embeddings of `model` (a supported ForConditionalGeneration)."""
    tokens = token_inputs(model, prompts, pad_token_id)
    vision = architecture_of(model.config).encode_images(
        model.model.visual, torch.cat([p.pixel_values for p in prompts]).to(model.device), tokens.grid, blocks
    )
    if int(tokens.image.sum()) != vision.merged.shape[0]:
        raise ValueError(f"{int(tokens.image.sum())} image tokens but {vision.merged.shape[0]} image features")
    embeds = model.model.language_model.embed_tokens(tokens.ids)
    embeds[tokens.image] = vision.merged.to(embeds.dtype)
    return DecoderInputs(embeds, tokens.positions, tokens.valid, tokens.image, tokens.ids, vision, tokens.grid)


@dataclass
class TokenInputs:
    """A left-padded batch before the vision tower: ids, valid, image [B, T]; positions [3, B, T]; grid."""

    ids: torch.Tensor
    valid: torch.Tensor
    image: torch.Tensor
    positions: torch.Tensor
    grid: torch.Tensor


def token_inputs(model, prompts: list[PreparedPrompt], pad_token_id: int) -> TokenInputs:
    """The prompts' ids left-padded, and their rope positions (which need the image grids, not the
    images): what the decoder sees besides the image features."""
    device = model.device
    length = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, length - len(p.input_ids) :] = p.input_ids
        valid[row, length - len(p.input_ids) :] = True
    ids, valid = ids.to(device), valid.to(device)
    image = (ids == model.config.image_token_id) & valid
    grid = torch.cat([p.image_grid_thw for p in prompts]).to(device)
    positions = architecture_of(model.config).positions(model, ids, image, grid, valid)
    return TokenInputs(ids, valid, image, positions, grid)


def add_deepstack(hidden: torch.Tensor, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """`hidden` [B, T, H] with `features` [N, H] added at the N image positions of `image` [B, T]
    (row-major), as Qwen3-VL's DeepStack does after its first decoder layers. Out of place, so
    training's autograd sees it."""
    return hidden.index_put(tuple(image.nonzero().T), features.to(hidden.dtype), accumulate=True)
