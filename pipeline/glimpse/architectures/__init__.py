"""What differs between the vision-language models the engine runs: one adapter per architecture.

The engine, the training objective and the accounting are written once; each asks the model's
adapter (`architecture_of(config)`) for what its family does its own way (see `Architecture`).
"""

from __future__ import annotations

from pipeline.glimpse.architectures.base import Architecture
from pipeline.glimpse.architectures.qwen2_5_vl import Qwen2_5_VL
from pipeline.glimpse.architectures.qwen3_vl import Qwen3_VL
from pipeline.glimpse.errors import UnsupportedModelError

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (Qwen2_5_VL(), Qwen3_VL())}


def architecture_of(config) -> Architecture:
    """The adapter for a model config (its `model_type`)."""
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def architecture_of_checkpoint(model) -> Architecture:
    """The adapter for a checkpoint (hub id or directory), read from its config alone."""
    from transformers import AutoConfig

    return architecture_of(AutoConfig.from_pretrained(model))


__all__ = ["ARCHITECTURES", "Architecture", "UnsupportedModelError", "architecture_of", "architecture_of_checkpoint"]
