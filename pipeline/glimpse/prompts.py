"""Model inputs from images and a question: the model's chat template and the PIL image processor.

`AutoProcessor` is not used: its video processor needs torchvision, which these machines lack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.glimpse.errors import RequestError

# Stand in for the question and the answer while the chat template is rendered; split out again
# before tokenizing.
QUESTION_SLOT = "\x00glimpse-batch:question\x00"
ANSWER_SLOT = "\x00glimpse-batch:answer\x00"
TURN_START = "<|im_start|>"
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


# Where a training example's answer turn starts, i.e. where the glimpse goes and the labels begin:
# "prompt_end": after the generation header, where inference puts the glimpse; "release": three
# tokens after the last `<|im_start|>`, as the release's collator counts. Both are the same with
# Qwen's tokenizer (`<|im_start|>`, `assistant`, `\n`); a tokenizer that splits `assistant` (the
# tiny test models') puts the release's inside the header, where inference never sees a glimpse.
ANSWER_STARTS = ("prompt_end", "release")


@dataclass
class TrainingPrompt:
    """A training example's model inputs: `prompt` holds the prompt, the generation header and the
    answer turn, which starts at `answer_start` (see ANSWER_STARTS)."""

    prompt: PreparedPrompt
    answer_start: int


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

    def training_token_ids(
        self, n_images: int, question: str, answer: str, answer_start: str = "prompt_end"
    ) -> tuple[list[int], int]:
        """The ids of a conversation that ends with the assistant's `answer`, and where the answer
        turn starts (`answer_start`, one of ANSWER_STARTS). Question and answer are tokenized as
        plain text, as in `token_ids`."""
        conversation = self.tokenizer.apply_chat_template(
            [
                {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": QUESTION_SLOT}]},
                {"role": "assistant", "content": ANSWER_SLOT},
            ],
            tokenize=False,
        )
        before, rest = conversation.split(QUESTION_SLOT)
        header, tail = rest.split(ANSWER_SLOT)
        ids = (
            self.tokens(before)
            + self.tokens(question, as_text=True)
            + self.tokens(header)
            + self.tokens(answer, as_text=True)
            + self.tokens(tail)
        )
        if answer_start == "prompt_end":
            prompt = self.token_ids(n_images, question)
            if ids[: len(prompt)] != prompt:
                raise RequestError("the chat template's assistant turn does not begin with inference's prompt")
            return ids, len(prompt)
        if answer_start != "release":
            raise ValueError(f"answer_start must be one of {ANSWER_STARTS}, not {answer_start!r}")
        turn_start = self.tokenizer.convert_tokens_to_ids(TURN_START)
        if turn_start not in ids:
            raise RequestError(f"the chat template renders no {TURN_START} before the answer")
        last_turn = len(ids) - 1 - ids[::-1].index(turn_start)
        return ids, min(last_turn + 3, len(ids))

    def __call__(self, images: list[Image.Image], question: str) -> PreparedPrompt:
        return self.with_question(*self.vision(images), question)

    def with_question(self, pixels: torch.Tensor, grid: torch.Tensor, question: str) -> PreparedPrompt:
        """The prompt for `question` about images already processed (`vision`): many questions
        about one image process it once."""
        return PreparedPrompt(self._expand(self.token_ids(len(grid), question), grid), pixels, grid)

    def training(
        self, images: list[Image.Image], question: str, answer: str, answer_start: str = "prompt_end"
    ) -> TrainingPrompt:
        """Inputs to train on: the conversation with `answer` as the assistant's turn."""
        pixels, grid = self.vision(images)
        ids, answer_start = self.training_token_ids(len(images), question, answer, answer_start)
        expanded = self._expand(ids, grid)
        shift = len(expanded) - len(ids)  # image pads come before the answer
        return TrainingPrompt(PreparedPrompt(expanded, pixels, grid), answer_start + shift)

    def vision(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches and grids of `images`."""
        if not images:
            raise RequestError("a request needs at least one image")
        try:
            vision = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        except ValueError as e:  # e.g. an aspect ratio over 200 that cannot be resized to patches
            sizes = [im.size for im in images]
            raise RequestError(f"image(s) of size {sizes} cannot be prepared: {e}") from e
        return vision["pixel_values"], vision["image_grid_thw"]

    def _expand(self, ids: list[int], grid: torch.Tensor) -> torch.Tensor:
        """`ids` with each image pad repeated to its image's merged-token count."""
        per_image = (grid.prod(-1) // self.merge_size**2).tolist()
        if ids.count(self.image_token_id) != len(per_image):
            raise RequestError(
                f"the chat template produced {ids.count(self.image_token_id)} image pads for {len(per_image)} images"
            )
        expanded, counts = [], iter(per_image)
        for token in ids:
            expanded.extend([token] * next(counts) if token == self.image_token_id else [token])
        return torch.tensor(expanded, dtype=torch.long)
