"""The next-token likelihood against HF's own causal-LM loss, its batch check, and likelihoods from configurations."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine

from pyro_moe import ConfigurationError, at_prior_mean, patch_routers
from pyro_moe.models.likelihoods import (
    LikelihoodKind,
    MCQALikelihood,
    NextTokenLikelihood,
    check_text_batches,
    likelihood_from_config,
)
from tests.helpers import ANSWERS, mcqa_batches, padded_text_batch
from tests.tiny_models import tiny_model


def _documents() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(4, 60, (length,), generator=generator) for length in (7, 4, 6)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_log_likelihood_of_a_padded_batch_is_hfs_loss_of_each_document_alone(side):
    """Every example's log-likelihood at the prior mean is minus HF's summed causal-LM loss of its
    document run alone (``model(ids, labels=ids).loss`` times its predicted tokens), whichever side
    the batch is padded on."""
    documents, reference = _documents(), tiny_model("qwen2_moe")
    expected = torch.stack(
        [-reference(ids[None], labels=ids[None]).loss.detach() * (len(ids) - 1) for ids in documents]
    )
    batch = padded_text_batch(documents, side)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    likelihood = NextTokenLikelihood(patch_routers(tiny_model("qwen2_moe"), {"logits": 2.0}, layers="all"))
    with torch.no_grad(), at_prior_mean():
        trace = poutine.trace(likelihood).get_trace(input_ids, attention_mask, num_examples=12)
    site = trace.nodes["next_tokens"]
    site_log_prob = site["fn"].log_prob(site["value"])
    torch.testing.assert_close(site_log_prob, expected, rtol=1e-5, atol=1e-5)
    assert site["scale"] == 12 / 3  # a minibatch of 3 of 12 documents stands for all
    assert likelihood.last_nll == pytest.approx(float(-expected.mean()), rel=1e-5)


def test_text_batches_are_checked_before_any_work():
    ids = torch.randint(4, 60, (2, 5))
    mask = torch.ones_like(ids)
    good = {"input_ids": ids, "attention_mask": mask}
    assert check_text_batches([good]) == [good]
    cases = [
        (good, "not one"),
        ([], "the text data are empty"),
        ([{**good, "labels": torch.zeros(2, dtype=torch.long)}], "batch 0 has labels: an MCQA batch"),
        ([good, {"input_ids": ids}], r"text batch 1 lacks \['attention_mask'\]"),
        ([{**good, "token_type_ids": mask}], r"has keys \['token_type_ids'\] the likelihood does not take"),
        ([{"input_ids": ids, "attention_mask": mask[:, :3]}], "must both be"),
        ([{"input_ids": ids.float(), "attention_mask": mask}], "integer token ids"),
        ([{"input_ids": ids, "attention_mask": torch.eye(2, 5, dtype=torch.long)}], "no real token after a real token"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            check_text_batches(data)


def test_mcqa_batch_check_points_text_batches_to_the_next_token_likelihood():
    handle = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers=[1])
    batch = {key: value for key, value in mcqa_batches(count=1)[0].items() if key != "labels"}
    with pytest.raises(ConfigurationError, match=r"lacks \['labels'\].*answer_token_ids=None"):
        MCQALikelihood(handle, ANSWERS).check_batches([batch])


def test_likelihoods_round_trip_their_configuration():
    handle = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers=[1])
    mcqa, text = MCQALikelihood(handle, ANSWERS), NextTokenLikelihood(handle)
    assert mcqa.to_config() == {"likelihood": "mcqa", "answer_token_ids": ANSWERS.tolist()}
    assert text.to_config() == {"likelihood": "next-token"}
    rebuilt = likelihood_from_config(handle, text.to_config(), "fit/")
    assert isinstance(rebuilt, NextTokenLikelihood) and rebuilt.param_prefix == "fit/"
    older = likelihood_from_config(handle, {"answer_token_ids": [4, 5]})  # checkpoints from before text fits
    assert older.kind is LikelihoodKind.MCQA and older.answer_token_ids.tolist() == [4, 5]
    with pytest.raises(ConfigurationError, match=r"unknown likelihood 'poetry'.*mcqa, next-token"):
        likelihood_from_config(handle, {"likelihood": "poetry"})
    with pytest.raises(ConfigurationError, match="fitted on text"):
        text.answer_token_ids  # noqa: B018


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen3_moe"])
def test_a_float64_model_gives_float64_answer_logits_and_log_likelihoods_exactly_hfs(family):
    """At the prior mean the answer logits of a float64 model are float64 and equal the unpatched HF
    model's bit for bit (where the routing rule reproduces HF's arithmetic, the routing scores in float32
    as HF's own), and the observed site's log-density and the NLL are float64 to float64 rounding."""
    model = tiny_model(family, dtype=torch.float64)
    model.config._experts_implementation = "eager"  # grouped_mm has no float64
    input_ids = torch.randint(4, 60, (5, 7), generator=torch.Generator().manual_seed(2))
    attention_mask, labels = torch.ones_like(input_ids), input_ids[:, -1] % 4
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits[:, -1, ANSWERS]
    expected = torch.log_softmax(reference, -1).gather(-1, labels[:, None]).squeeze(-1)
    likelihood = MCQALikelihood(patch_routers(model, {"weight": 0.1, "logits": 1.0}), ANSWERS)
    with torch.no_grad(), at_prior_mean():
        trace = poutine.trace(likelihood).get_trace(input_ids, attention_mask, labels=labels)
    answer_logits = trace.nodes["_RETURN"]["value"][0]
    site = trace.nodes["answer"]
    assert answer_logits.dtype == site["fn"].log_prob(site["value"]).dtype == torch.float64
    assert torch.equal(answer_logits, reference)
    # float64 rounding only (float32 answer logits were 1e-7 off)
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), expected, rtol=0, atol=1e-14)
    assert likelihood.last_nll == pytest.approx(float(-expected.mean()), rel=0, abs=1e-14)
    likelihood.patch.unpatch()
