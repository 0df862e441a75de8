"""The dense ``laplace`` family through ``fit`` against the explicit Hessian of the negative log joint.

The reference never runs pyro-moe: the negative log joint of the router weight ``W`` of one layer,
``-sum_n log softmax(answer_n(W))[y_n] + tau/2 ||W - W0||^2``, is written with ``functional_call`` on
the **unpatched** HF model (float64) and differentiated twice by ``torch.autograd.functional.hessian``
at the fitted mode. The fitted posterior's precision (the inverse of its covariance) must equal it.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from pyro_moe import fit, patch_routers
from pyro_moe.core.families import find_moe_routers
from tests.helpers import ANSWERS
from tests.reference.tiny_float64 import REFERENCE_FAMILIES, float64_model, unpadded_batches
from tests.tiny_models import MOE_LAYERS

PRIOR_SCALE = 3.0


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_the_precision_through_fit_is_the_hessian_of_the_negative_log_joint(family):
    batches = unpadded_batches(2, 4)
    layer = MOE_LAYERS[family][-1]
    handle = patch_routers(float64_model(family), {"weight": PRIOR_SCALE}, layers=[layer])
    posterior = fit(handle, batches, "laplace", answer_token_ids=ANSWERS, steps=30, lr=0.02, progress=False)
    gaussian = posterior.guide.global_guide
    correlation = gaussian.scale_tril @ gaussian.scale_tril.T
    covariance = (gaussian.scale[:, None] * correlation * gaussian.scale[None, :]).double()
    precision = torch.linalg.inv(covariance)

    reference = float64_model(family)
    (path,) = [loc.path for loc in find_moe_routers(reference) if loc.layer_index == layer]
    prior_mean = reference.get_submodule(path).weight.detach().clone()
    tau = float(torch.tensor(PRIOR_SCALE, dtype=torch.float32)) ** -2  # the prior's scale is a float32 value

    def negative_log_joint(flat: torch.Tensor) -> torch.Tensor:
        weight = flat.reshape(prior_mean.shape)
        total = 0.5 * tau * (weight - prior_mean).square().sum()
        for batch in batches:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            logits = functional_call(reference, {f"{path}.weight": weight}, (), inputs).logits[:, -1, ANSWERS]
            total = total - torch.log_softmax(logits, -1).gather(-1, batch["labels"][:, None]).sum()
        return total

    mode = gaussian.loc.detach().double()
    assert not torch.equal(mode, prior_mean.reshape(-1))  # the MAP steps moved the weights
    hessian = torch.autograd.functional.hessian(negative_log_joint, mode)
    identity = torch.eye(len(hessian), dtype=torch.float64)
    scale = float(hessian.abs().max())
    assert float((precision - hessian).abs().max()) / scale <= 1e-5
    data = hessian - tau * identity  # the likelihood's part alone, to float32 accuracy (the sites are float32)
    assert float(data.abs().max()) > 0.01 * scale
    assert float((precision - tau * identity - data).abs().max() / data.abs().max()) <= 1e-4
    posterior.patch.unpatch()
