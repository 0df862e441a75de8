"""The batches a fit and its callbacks take: checked once, before any work.

Example::

    batches = check_batches(mcqa_batches(questions, tokenizer, 50), num_choices=4)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

from pyro_moe.errors import ConfigurationError

__all__ = ["BATCH_KEYS", "check_batches"]

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def check_batches(data: Iterable[Mapping[str, Tensor]], num_choices: int) -> list[dict[str, Tensor]]:
    """The batches as a list, checked: non-empty, the keys ``input_ids`` ``(batch, length)``,
    ``attention_mask`` (same shape) and ``labels`` ``(batch,)`` in ``[0, num_choices)``."""
    batches = [dict(batch) for batch in data]
    if not batches:
        raise ConfigurationError("the data are empty: give at least one batch of input_ids, attention_mask, labels.")
    for index, batch in enumerate(batches):
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise ConfigurationError(f"batch {index} lacks {missing}; every batch needs {', '.join(BATCH_KEYS)}.")
        ids, mask, labels = (batch[key] for key in BATCH_KEYS)
        if ids.dim() != 2 or mask.shape != ids.shape or labels.shape != ids.shape[:1]:
            raise ConfigurationError(
                f"batch {index}: input_ids {tuple(ids.shape)}, attention_mask {tuple(mask.shape)} and labels "
                f"{tuple(labels.shape)} must be (batch, length), (batch, length) and (batch,)."
            )
        if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= num_choices:
            raise ConfigurationError(
                f"batch {index}: labels must be integers in [0, {num_choices}) (one per answer letter), "
                f"got values in [{labels.min().item()}, {labels.max().item()}]."
            )
    return batches
