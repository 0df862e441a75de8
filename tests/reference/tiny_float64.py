"""What the reference tests share: float64 tiny models with eager experts and unpadded MCQA batches."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from tests.tiny_models import tiny_model

__all__ = ["REFERENCE_FAMILIES", "float64_model", "relative_error", "unpadded_batches"]

REFERENCE_FAMILIES = ["mixtral", "qwen2_moe", "granitemoe", "olmoe", "qwen3_moe"]
"""The families the issue's review checked by hand; every reference test runs on each."""


def float64_model(family: str) -> PreTrainedModel:
    """The tiny ``family`` model (:func:`tests.tiny_models.tiny_model`, seed 0) in float64, eager experts
    (``grouped_mm`` has no float64); every call gives the same weights, so one copy can stay unpatched."""
    model = tiny_model(family, dtype=torch.float64)
    model.config._experts_implementation = "eager"
    return model


def unpadded_batches(count: int, size: int, seed: int = 0, length: int = 6) -> list[dict[str, torch.Tensor]]:
    """``count`` MCQA batches of ``size`` random prompts ``(size, length)`` without padding (the last
    position is every example's readout); the label is a function of the last token."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(8, 60, (size, length), generator=generator)
        batches.append(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids[:, -1] % 4}
        )
    return batches


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``."""
    return float((actual - expected).abs().max() / expected.abs().max())
