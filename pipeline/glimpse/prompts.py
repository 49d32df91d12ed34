"""Model inputs from images and a question: the model's chat template and the PIL image processor.

`AutoProcessor` is not used: its video processor needs torchvision, which these machines lack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.glimpse.errors import RequestError

# Stands in for the question while the chat template is rendered; split out again before tokenizing.
QUESTION_SLOT = "\x00glimpse-batch:question\x00"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pil_image_processor_class():
    """Qwen2-VL's PIL-backed image processor (the default class needs torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


@dataclass
class PreparedPrompt:
    """One request's model inputs. input_ids [T] with each image pad expanded to its merged tokens;
    pixel_values [P, C·t·p·p] patches of all its images; image_grid_thw [n_images, 3]."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def columns(self, pixel_dtype: str) -> dict:
        """The prompt as columns of a table, pixel values as bytes in `pixel_dtype`. Sent in the
        model's dtype they lose nothing (the vision tower casts to it first) and in bf16 take half
        the bytes of float32 between the CPU and GPU stages."""
        pixels = self.pixel_values.to(DTYPES[pixel_dtype]).contiguous()
        return {
            "input_ids": self.input_ids.tolist(),
            "pixel_values": pixels.view(torch.uint8).numpy().tobytes(),
            "pixel_dtype": pixel_dtype,
            "image_grid_thw": self.image_grid_thw.flatten().tolist(),
        }

    @classmethod
    def from_columns(cls, row: dict) -> PreparedPrompt:
        """The prompt `columns` wrote."""
        grid = torch.tensor(row["image_grid_thw"], dtype=torch.long).view(-1, 3)
        pixels = torch.frombuffer(bytearray(row["pixel_values"]), dtype=DTYPES[row["pixel_dtype"]])
        return cls(torch.tensor(row["input_ids"], dtype=torch.long), pixels.view(int(grid.prod(-1).sum()), -1), grid)


class PromptBuilder:
    """Builds the prompt of one user turn (images, then the question) plus the generation prompt."""

    def __init__(
        self, tokenizer, image_processor, image_token_id: int, merge_size: int, max_positions: int | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.merge_size = merge_size
        self.max_positions = max_positions  # prompt + answer tokens the model's positions cover

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, model_config, min_pixels=None, max_pixels=None) -> PromptBuilder:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        image_processor = pil_image_processor_class().from_pretrained(model_dir, **overrides)
        if overrides:
            # `size` is what the processor resizes by; keep it in step with min/max pixels.
            image_processor.size = {
                "shortest_edge": overrides.get("min_pixels", image_processor.size["shortest_edge"]),
                "longest_edge": overrides.get("max_pixels", image_processor.size["longest_edge"]),
            }
        text_config = getattr(model_config, "text_config", model_config)
        return cls(
            tokenizer,
            image_processor,
            model_config.image_token_id,
            model_config.vision_config.spatial_merge_size,
            getattr(text_config, "max_position_embeddings", None),
        )

    def text(self, n_images: int, question: str) -> str:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def token_ids(self, n_images: int, question: str) -> list[int]:
        """The prompt's token ids. The template's own markup keeps its control tokens; the question
        is tokenized as plain text (special tokens split), so a question that spells
        `<|im_end|>`, `<|vision_start|>` or `<|endoftext|>` cannot end its turn, forge an image
        or end the text. Control tokens bound the question, so no BPE merge crosses the seams."""
        template = self.text(n_images, QUESTION_SLOT)
        if template.count(QUESTION_SLOT) != 1:
            raise RequestError("the chat template does not place the question exactly once")
        before, after = template.split(QUESTION_SLOT)
        return self.tokens(before) + self.tokens(question, as_text=True) + self.tokens(after)

    def tokens(self, text: str, as_text: bool = False) -> list[int]:
        """Token ids of `text`; `as_text`: special-token strings are split into ordinary tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]

    def __call__(self, images: list[Image.Image], question: str) -> PreparedPrompt:
        if not images:
            raise RequestError("a request needs at least one image")
        try:
            vision = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        except ValueError as e:  # e.g. an aspect ratio over 200 that cannot be resized to patches
            sizes = [im.size for im in images]
            raise RequestError(f"image(s) of size {sizes} cannot be prepared: {e}") from e
        grid = vision["image_grid_thw"]
        ids = self.token_ids(len(images), question)
        per_image = (grid.prod(-1) // self.merge_size**2).tolist()
        if ids.count(self.image_token_id) != len(per_image):
            raise RequestError(
                f"the chat template produced {ids.count(self.image_token_id)} image pads for {len(per_image)} images"
            )
        expanded, counts = [], iter(per_image)
        for token in ids:
            expanded.extend([token] * next(counts) if token == self.image_token_id else [token])
        return PreparedPrompt(torch.tensor(expanded, dtype=torch.long), vision["pixel_values"], grid)
