"""Reading logits out of a (patched) causal LM: at each row's last real position (MCQA answers),
or at every position for the next token (text).

Both give every row the positions it has alone (:func:`token_positions`), so a row's logits do not
depend on the batch it is in (its padding, on either side); and both return logits in the model's
dtype widened to float32 at least (:func:`at_least_float32`): a float64 model gives float64 logits.

Works inside a plate of joint samples: the model folds the samples into its batch, and the
result gains a leading sample dimension.

Example::

    logits = last_token_logits(model, input_ids, attention_mask)   # (draws, batch, vocab)
    answers = logits[..., answer_token_ids]                        # (draws, batch, choices)
    logits = next_token_logits(model, input_ids, attention_mask)   # (draws, batch, length - 1, vocab)
    scored = next_token_mask(attention_mask)                       # (batch, length - 1): real next tokens
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

__all__ = [
    "at_least_float32",
    "last_positions",
    "last_token_logits",
    "next_token_logits",
    "next_token_mask",
    "token_positions",
]


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 or wider: half precision (bfloat16, float16) widened to float32, float32
    and float64 kept (answer logits, probabilities and log-likelihoods follow a float64 model)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index ``(batch,)`` of the last real token of every row of ``attention_mask`` ``(batch, length)``
    (left or right padding)."""
    length = attention_mask.shape[-1]
    return length - 1 - attention_mask.flip(-1).int().argmax(dim=-1)


def last_token_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Next-token logits ``(draws, batch, vocab)`` at every row's last real token, in the model's dtype
    (float32 at least), from one forward pass with :func:`token_positions`: a question gives the same
    logits alone as inside a padded batch with longer and shorter ones.

    ``draws`` is the number of joint samples the model folded into its batch (1 outside a
    model-average plate). With left padding (or none) only the last position's logits are
    computed (``logits_to_keep=1``), as the vocabulary is large.
    """
    batch, length = input_ids.shape
    positions = last_positions(attention_mask)
    keep_last = bool((positions == length - 1).all())
    kwargs = {"use_cache": False, "position_ids": token_positions(attention_mask)}
    if keep_last and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    logits = logits.unflatten(0, (-1, batch))  # (draws, batch, length or 1, vocab)
    if keep_last:
        return at_least_float32(logits[:, :, -1])
    return at_least_float32(logits[:, torch.arange(batch, device=logits.device), positions])


def token_positions(attention_mask: Tensor) -> Tensor:
    """``position_ids`` ``(batch, length)``: every real token's position among its row's real tokens
    (padded positions get the neighbouring value; they are masked). A padded row thus keeps the
    positions it has alone, whichever side the padding is on; HF's forward without ``position_ids``
    counts from the first column, which shifts left-padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def next_token_mask(attention_mask: Tensor) -> Tensor:
    """``(batch, length - 1)`` bool: position ``t`` predicts a real token ``t + 1`` from a real token ``t``
    (the tokens a causal-LM loss scores; padding on either side drops out)."""
    real = attention_mask.bool()
    return real[:, 1:] & real[:, :-1]


def next_token_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits ``(draws, batch, length - 1, vocab)`` (the model's dtype, float32 at least) of the tokens
    ``input_ids[:, 1:]``, from one forward pass with :func:`token_positions`; on an unpadded batch the
    positions are HF's own (``0 .. length - 1``), so ``cross_entropy`` of these logits is
    ``model(input_ids, labels=input_ids).loss``."""
    batch = input_ids.shape[0]
    positions = token_positions(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).logits
    return at_least_float32(logits.unflatten(0, (-1, batch))[:, :, :-1])
