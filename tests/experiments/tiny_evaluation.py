"""Tiny inputs of the evaluation experiments: MCQA splits in the tiny tokenizer's words, a tiny
Granite-MoE, and posteriors fitted in a few steps."""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from pyro_moe.data import DEFAULT_TEMPLATE, MCQAExample, answer_token_ids
from pyro_moe.experiments.evaluation import FitSettings, fit_named_families
from pyro_moe.inference.fitting import FittedPosterior
from tests.tiny_models import tiny_model, tiny_tokenizer

__all__ = ["FAMILIES", "SPLIT_SIZES", "direct_answer_probs", "tiny_inputs", "tiny_posteriors", "tiny_splits"]

SPLIT_SIZES = {"train": 16, "calibration": 24, "test": 24, "near_ood": 16, "far_ood": 16}
FAMILIES = ("mean-field", "mfvr")
"""Router weights (mean-field) and per-token logits (MFVR)."""
_DIGITS = [str(d) for d in range(10)]
_WORDS = ("yes", "no", "true", "false", "blue", "sky")


def _question(rng: random.Random, split: str) -> MCQAExample:
    if split == "far_ood":  # words, not digits
        choices = rng.sample(_WORDS, 4)
        return MCQAExample(f"which colour is the {rng.choice(_WORDS)} ?", tuple(choices), rng.randrange(4))
    a, b = rng.randrange(5), rng.randrange(5)
    choices = rng.sample(_DIGITS, 4)
    word = "of" if split == "near_ood" else "and"
    padding = " the sky" * rng.randrange(3)  # prompts of different lengths, so batches are left-padded
    return MCQAExample(f"what is {a} {word} {b}{padding} ?", tuple(choices), rng.randrange(4))


def tiny_splits(seed: int = 0) -> dict[str, list[MCQAExample]]:
    """Five splits of :data:`SPLIT_SIZES` questions whose prompts use only the tiny tokenizer's words."""
    rng = random.Random(seed)
    return {split: [_question(rng, split) for _ in range(size)] for split, size in SPLIT_SIZES.items()}


def tiny_inputs() -> tuple[nn.Module, object, dict[str, list[MCQAExample]], Tensor]:
    """A tiny Granite-MoE (2 MoE layers, 4 experts, top-2), the tiny tokenizer, splits and the ids of A-D."""
    tokenizer = tiny_tokenizer()
    return tiny_model("granitemoe"), tokenizer, tiny_splits(), answer_token_ids(tokenizer)


def tiny_posteriors(
    model: nn.Module, tokenizer: object, splits: dict, letters: Tensor, families: tuple[str, ...] = FAMILIES
) -> dict[str, FittedPosterior]:
    """``families`` fitted for 3 steps on the train split, each on a copy of ``model``."""
    fitting = FitSettings(steps=3, batch_size=8, progress=False)
    return fit_named_families(model, tokenizer, splits, families, fitting, answer_token_ids=letters)


@torch.no_grad()
def direct_answer_probs(model: nn.Module, tokenizer: object, examples: list[MCQAExample], letters: Tensor) -> Tensor:
    """Answer probabilities ``(examples, choices)`` straight from the HF model's forward (no pyro-moe code):
    the logits at the last position of the left-padded prompts, restricted to the letters."""
    encoded = tokenizer([DEFAULT_TEMPLATE.render(e) for e in examples], padding=True, return_tensors="pt")
    logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    return logits[:, -1, letters].float().softmax(-1)
