"""Shared test fixtures: the answer-letter ids of the tiny models, synthetic MCQA batches, and the
patch and fit setups of every registered guide family."""

from __future__ import annotations

import torch

from pyro_moe.guides.family import GuideScope

__all__ = ["ANSWERS", "FAMILY_SETUPS", "SITES_FOR_SCOPE", "mcqa_batches", "padded_text_batch", "text_documents"]

ANSWERS = torch.tensor([4, 5, 6, 7])
SITES_FOR_SCOPE = {
    GuideScope.GLOBAL: {"weight": 0.2, "temperature": 0.3},
    GuideScope.LOGITS: {"logits": 1.0},
    GuideScope.TOKEN_TEMPERATURE: {"temperature": {"per": "token", "scale": 0.3}},
}
FAMILY_SETUPS = {
    "temp-sampling": {"sites": ["temperature"], "selection": "sample-k"},
    "mc-dropout": {"sites": {"weight": 0.2, "dropout": 0.2}},
    "swag": {"guide_options": {"swag": {"rank": 3, "burn_in": 8, "every": 4}}},
    "ensemble": {"guide_options": {"ensemble": {"members": 3}}, "num_particles": 3},
    "kron-laplace": {"sites": {"weight": 0.2}},
    "expert-laplace": {"sites": "experts"},
}
"""Patch (``sites``, ``selection``) and fit options of the families that need more than their scope's sites."""


def mcqa_batches(count: int = 4, size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A synthetic MCQA set: random prompts; the answer is a function of the last token, so it can be learnt."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(8, 60, (size, 6), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0
        input_ids[0, :2] = 0
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids[:, -1] % 4})
    return batches


def text_documents() -> list[torch.Tensor]:
    """Four documents of token ids (lengths 9, 5, 7 and 2) in the tiny models' vocabulary."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(4, 60, (length,), generator=generator) for length in (9, 5, 7, 2)]


def padded_text_batch(documents: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """A text batch of ``documents``, padded with 0 on the ``"left"`` or ``"right"``."""
    length = max(len(ids) for ids in documents)
    input_ids = torch.zeros(len(documents), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(documents):
        columns = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[row, columns], attention_mask[row, columns] = ids, 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
