"""Reading answers out of a (patched) causal LM: the logits at each row's last real position.

Works inside a plate of joint samples: the model folds the samples into its batch, and the
result gains a leading sample dimension.

Example::

    logits = last_token_logits(model, input_ids, attention_mask)   # (draws, batch, vocab)
    answers = logits[..., answer_token_ids]                        # (draws, batch, choices)
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

__all__ = ["last_positions", "last_token_logits"]


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index ``(batch,)`` of the last real token of every row of ``attention_mask`` ``(batch, length)``
    (left or right padding)."""
    length = attention_mask.shape[-1]
    return length - 1 - attention_mask.flip(-1).int().argmax(dim=-1)


def last_token_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Next-token logits ``(draws, batch, vocab)`` at every row's last real token.

    ``draws`` is the number of joint samples the model folded into its batch (1 outside a
    model-average plate). With left padding (or none) only the last position's logits are
    computed (``logits_to_keep=1``), as the vocabulary is large.
    """
    batch, length = input_ids.shape
    positions = last_positions(attention_mask)
    keep_last = bool((positions == length - 1).all())
    kwargs = {"use_cache": False}
    if keep_last and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    logits = logits.unflatten(0, (-1, batch))  # (draws, batch, length or 1, vocab)
    if keep_last:
        return logits[:, :, -1]
    return logits[:, torch.arange(batch, device=logits.device), positions]
