"""What differs between the vision-language models the engine runs: one adapter per architecture.

The engine, the training objective and the accounting are written once; each asks the model's
adapter (`architecture_of(config)`) for what its family does its own way (see `Architecture`).
Adapters are imported when first asked for, so that checking a model's family (on the driver,
before Ray starts) does not import torch.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

from pipeline.glimpse.errors import UnsupportedModelError

if TYPE_CHECKING:
    from pipeline.glimpse.architectures.base import Architecture

# model_type → (module, class) of its adapter
ADAPTERS = {
    "qwen2_5_vl": ("pipeline.glimpse.architectures.qwen2_5_vl", "Qwen2_5_VL"),
    "qwen3_vl": ("pipeline.glimpse.architectures.qwen3_vl", "Qwen3_VL"),
}


def check_supported(model_type: str | None) -> None:
    """Raises UnsupportedModelError unless an adapter covers `model_type`."""
    if not isinstance(model_type, str) or model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )


@cache
def architecture(model_type: str) -> Architecture:
    """The adapter for `model_type`, one instance per process."""
    check_supported(model_type)
    module, name = ADAPTERS[model_type]
    return getattr(importlib.import_module(module), name)()


def architecture_of(config) -> Architecture:
    """The adapter for a model config (its `model_type`)."""
    return architecture(getattr(config, "model_type", None))


def architecture_of_checkpoint(model) -> Architecture:
    """The adapter for a checkpoint (hub id or directory), read from its config alone."""
    from transformers import AutoConfig

    return architecture_of(AutoConfig.from_pretrained(model))


__all__ = ["ADAPTERS", "architecture", "architecture_of", "architecture_of_checkpoint", "check_supported"]
