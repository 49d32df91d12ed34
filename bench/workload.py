"""The benchmark workload: identical requests, so that runs compare like with like.

Each request: one noise image of a fixed size, a question of a fixed token count, a fixed answer
length (end-of-sequence ignored); with pruning, a fixed keep ratio (the published mean, 7.4%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from pipeline.glimpse.engine import Request
from pipeline.glimpse.sampling import SamplingParams

WORDS = "what is in the picture describe the image in detail how many people are there".split()


@dataclass(frozen=True)
class Workload:
    requests: int = 32
    width: int = 224
    height: int = 168
    question_tokens: int = 20
    new_tokens: int = 16
    keep_ratio: float = 0.074

    def build(self, tokenizer) -> list[Request]:
        rng = np.random.default_rng(0)
        question = fixed_length_question(tokenizer, self.question_tokens)
        sampling = SamplingParams(max_new_tokens=self.new_tokens, ignore_eos=True)
        return [
            Request(
                f"w{i}",
                [Image.fromarray(rng.integers(0, 255, (self.height, self.width, 3), dtype=np.uint8))],
                question,
                sampling,
            )
            for i in range(self.requests)
        ]

    def describe(self) -> dict:
        return asdict(self)


def fixed_length_question(tokenizer, tokens: int, vocabulary: list[str] = WORDS) -> str:
    """Words of `vocabulary` appended in turn until the question is `tokens` tokens long (or first passes it)."""
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
        words.append(vocabulary[len(words) % len(vocabulary)])
    return " ".join(words)
