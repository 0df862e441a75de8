"""Shared fixtures: offline mode, seeds and a left-padded batch for the tiny models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pyro
import pytest
import torch

from tests.tiny_models import TINY_VOCAB_SIZE

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has two cores


@pytest.fixture(autouse=True)
def _seed_and_clear_param_store():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``(3, 7)``; rows 0 and 2 are left-padded."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, TINY_VOCAB_SIZE, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    attention_mask[2, :1] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask
