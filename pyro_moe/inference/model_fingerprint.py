"""The fingerprint of the model a posterior was fitted on, so that it is not loaded into another one.

A posterior's parameters mean something only next to the weights they were fitted against: the
same architecture with other weights (another checkpoint, a fine-tune) runs, but answers nonsense.
:func:`model_fingerprint` records

* the model's configuration (``model.config``, without the entries that say how it was loaded or
  what a forward returns: ``dtype``, ``use_cache``, ``_name_or_path``, the transformers version, ...)
  and its SHA-256;
* per MoE block that holds a sample site (the parent of each patched router or experts module), a
  SHA-256 of its parameters and buffers: names, dtypes, shapes and values; a tensor of more than
  :data:`FULL_HASH_ELEMENTS` elements contributes :data:`SAMPLED_ELEMENTS` elements at a fixed stride.

It reads the tensors where they are (CPU or GPU: the bytes of equal values are equal on every
device) and moves at most a few MiB per block to the CPU, so it costs milliseconds even for large
experts. The weights' dtype is part of their hash: the same checkpoint loaded in another dtype
(``--dtype bfloat16`` for a posterior fitted in float32) is another model, whose rounded weights the
posterior was not fitted against; transfer it deliberately (``allow_other_model``). Offloaded weights
(``meta`` tensors under a ``device_map`` with disk offload) cannot be read and are not supported.
:func:`model_differences` names what differs: configuration entries, or blocks.

Example::

    saved = model_fingerprint(posterior.patch)                     # JSON-ready dict, into the manifest
    model_differences(saved, model_fingerprint(other_patch))       # [] for the same model
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pyro_moe.models.router_patch import RouterPatch

__all__ = ["FULL_HASH_ELEMENTS", "SAMPLED_ELEMENTS", "model_differences", "model_fingerprint"]

FULL_HASH_ELEMENTS = 1 << 20
"""Tensors up to this many elements (router weights) are hashed whole."""
SAMPLED_ELEMENTS = 1 << 16
"""Elements a larger tensor (experts' weights) contributes, at a fixed stride over its flattened values."""
LOADING_ENTRIES = frozenset(
    {
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "attn_implementation",
    }
)
"""Entries of ``model.config`` that say how the model was loaded or what a forward returns, not what it is."""


def _model_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return {}
    entries = json.loads(config.to_json_string(use_diff=False))
    return {key: value for key, value in entries.items() if not key.startswith("_") and key not in LOADING_ENTRIES}


def _tensor_bytes(tensor: Tensor) -> bytes:
    """The bytes of ``tensor``'s values (all of them, or :data:`SAMPLED_ELEMENTS` at a fixed stride), on the CPU."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() > FULL_HASH_ELEMENTS:
        stride = flat.numel() // SAMPLED_ELEMENTS
        flat = flat[torch.arange(SAMPLED_ELEMENTS, device=flat.device) * stride]
    return flat.contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _block_hash(block: nn.Module) -> str:
    digest = hashlib.sha256()
    tensors = [*block.named_parameters(remove_duplicate=False), *block.named_buffers(remove_duplicate=False)]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def model_fingerprint(patch: RouterPatch) -> dict[str, Any]:
    """The fingerprint of ``patch``'s model (see the module docstring), JSON-ready: ``config`` (the
    configuration entries), ``config_sha256`` and ``weights`` (SHA-256 per MoE block path). The same
    patched or not: a Bayesian router shares its router's parameters under their names."""
    config = _model_config(patch.model)
    blocks = sorted({location.path.rpartition(".")[0] for location in patch.site_locations})
    return {
        "config": config,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "weights": {path: _block_hash(patch.model.get_submodule(path)) for path in blocks},
    }


def model_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase per difference (empty: the same model)."""
    differences = []
    if saved.get("config_sha256") != current.get("config_sha256"):
        before, now = saved.get("config", {}), current.get("config", {})
        keys = sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))
        shown = ", ".join(f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in keys[:5])
        differences.append(f"model configuration ({shown or 'entries'}{', ...' if len(keys) > 5 else ''})")
    before, now = saved.get("weights", {}), current.get("weights", {})
    changed = sorted(path for path in set(before) | set(now) if before.get(path) != now.get(path))
    if changed:
        differences.append(f"weights of {', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}")
    return differences
