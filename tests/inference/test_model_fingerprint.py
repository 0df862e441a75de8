"""A posterior is bound to the model it was fitted on: another model of the same shape with other
weights, or another configuration, is refused naming what differs; ``allow_other_model`` transfers it."""

from __future__ import annotations

import hashlib
import json

import pyro
import pytest
import torch

from pyro_moe import patch_routers
from pyro_moe.inference.checkpoint import MANIFEST, CheckpointError
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.model_fingerprint import model_differences, model_fingerprint
from pyro_moe.models.expert_patch import patch_experts
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model


@pytest.fixture
def saved(tmp_path):
    pyro.clear_param_store()
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    posterior = fit(handle, mcqa_batches(count=2), "mean-field", answer_token_ids=ANSWERS, steps=2, progress=False)
    return posterior.save(tmp_path / "fit")


def _is_patched(model) -> bool:
    return any("Bayesian" in type(module).__name__ for module in model.modules())


def test_the_fingerprint_hashes_the_moe_blocks_values_patched_or_not():
    model = tiny_model("granitemoe")
    block = model.get_submodule("model.layers.1.block_sparse_moe")
    expected = hashlib.sha256()  # an independent reading: every tensor of the block (all small), sorted by name
    tensors = sorted([*block.named_parameters(), *block.named_buffers()], key=lambda item: item[0])
    for name, tensor in tensors:
        expected.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        expected.update(tensor.detach().contiguous().numpy().tobytes())
    handle = patch_routers(model, {"weight": 0.2}, layers=[1])
    fingerprint = model_fingerprint(handle)
    assert fingerprint["weights"] == {"model.layers.1.block_sparse_moe": expected.hexdigest()}
    handle.unpatch()
    with patch_routers(model, {"logits": 1.0}, layers=[1]) as again:
        assert model_fingerprint(again) == fingerprint
    assert "dtype" not in fingerprint["config"] and fingerprint["config"]["num_local_experts"] == 4
    with patch_experts(tiny_model("granitemoe"), [1]) as experts:
        assert model_fingerprint(experts)["weights"] == fingerprint["weights"]  # the same block, experts patched
    with patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1]) as same:
        assert model_differences(fingerprint, model_fingerprint(same)) == []


def test_another_model_of_the_same_shape_is_refused_unless_allowed(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    assert list(manifest["model"]["weights"]) == ["model.layers.1.block_sparse_moe"]

    other = tiny_model("granitemoe", seed=1)  # same configuration, other weights
    routers = {name: type(module) for name, module in other.named_modules()}
    with pytest.raises(
        CheckpointError, match=r"fitted on another model: weights of model\.layers\.1\.block_sparse_moe differ"
    ):
        FittedPosterior.load(saved, other)
    assert {name: type(module) for name, module in other.named_modules()} == routers  # left unpatched

    nudged = tiny_model("granitemoe")
    with torch.no_grad():
        nudged.model.layers[1].block_sparse_moe.router.weight[0, 0] += 1e-6
    with pytest.raises(CheckpointError, match=r"weights of model\.layers\.1\.block_sparse_moe differ"):
        FittedPosterior.load(saved, nudged)

    wider = tiny_model("granitemoe")
    wider.config.rms_norm_eps = 1e-5  # another configuration entry, same tensors
    with pytest.raises(CheckpointError, match=r"model configuration \(rms_norm_eps 1e-06 -> 1e-05\) differ"):
        FittedPosterior.load(saved, wider)

    with pytest.warns(UserWarning, match=r"allow_other_model.*weights of model\.layers\.1\.block_sparse_moe"):
        transferred = FittedPosterior.load(saved, other, allow_other_model=True)
    assert _is_patched(other) and transferred.engine.step_count == 2
    transferred.patch.unpatch()

    pyro.clear_param_store()
    same = FittedPosterior.load(saved, tiny_model("granitemoe"))  # the model it was fitted on: no warning
    assert same.config["guide"] == "mean-field"
