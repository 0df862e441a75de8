"""``question_seed``: one question's seed from the run's seed and its prompt tokens alone (a list or a tensor of
them, on any device), a 32-bit number; CRC-32 checked against :mod:`binascii`, not our code."""

from __future__ import annotations

import binascii
import struct

import torch

from pyro_moe.random_streams import question_seed, seeded


def test_question_seed_depends_on_the_seed_and_the_tokens_alone():
    tokens = [12, 7, 42, 3]
    crc = binascii.crc32(struct.pack("<4q", *tokens))  # the tokens as little-endian int64
    assert question_seed(5, tokens) == (5 * 1_000_003 + crc) % 2**32
    assert question_seed(5, tokens) == question_seed(5, torch.tensor(tokens))
    assert question_seed(5, tokens) == question_seed(5, torch.tensor([tokens]))  # a (1, length) prompt
    assert question_seed(5, tokens) != question_seed(6, tokens) != question_seed(6, tokens[::-1])
    assert 0 <= question_seed(2**40, tokens) < 2**32  # a usable torch and NumPy seed
    with seeded(question_seed(5, tokens)):
        first = torch.randn(3)
    with seeded(question_seed(5, torch.tensor(tokens))):
        assert torch.equal(torch.randn(3), first)
