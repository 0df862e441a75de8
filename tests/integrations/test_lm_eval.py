"""The lm-evaluation-harness model ``pyro-moe``: at the prior mean it scores as the harness's own ``HFLM``
on the unpatched model; model-average log-likelihoods are an explicit average over seeded draws; the
choices of one question share their draws, and one-token choices are read from one pass whose draws are those
of ``predict`` on the prompt under the question's seed; bad ``model_args`` end before any task is loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro.poutine.messenger import Messenger

from pyro_moe import at_prior_mean, fit, patch_routers
from pyro_moe.core.routing_context import PARTICLE_DIM, routing_context
from pyro_moe.errors import PyroMoEError
from pyro_moe.guides.router_guide import is_local_site
from pyro_moe.inference.predictive import predict
from pyro_moe.random_streams import question_seed, seeded
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from pyro_moe.integrations.lm_eval import PyroMoELM  # noqa: E402

FAMILY = "mixtral"
QUESTIONS = [
    ("Question : what colour is the sky ? Answer :", ["blue", "yes", "no", "the sky"], 0),
    ("Question : is the sky blue ? Answer :", ["yes", "no"], 0),
    ("Question : 1 and 2 is ? Answer :", ["3", "4", "1 2", "12"], 1),
    ("Question : which is true ? Answer :", ["true", "false", "a"], 1),
    ("", ["the sky is blue"], 0),  # empty context: the harness puts BOS before the continuation
]
TEXT = " ".join(["the sky is blue and what colour is the sky ?"] * 9)  # 90 tokens: two windows of 64 positions


def requests_of(questions: list) -> list[Instance]:
    return [
        Instance("loglikelihood", doc={}, arguments=(context, " " + choice if context else choice), idx=i)
        for context, choices, _ in questions
        for i, choice in enumerate(choices)
    ]


def hf_reference() -> HFLM:
    """The harness's own HF model on the unpatched tiny model."""
    return HFLM(pretrained=tiny_model(FAMILY), tokenizer=tiny_tokenizer(), batch_size=3, device="cpu")


def write_task(folder: Path) -> Path:
    """A local multiple-choice task and a perplexity task (``dataset_path: json``) in ``folder``."""
    rows = [{"question": q, "choices": c, "label": label} for q, c, label in QUESTIONS[:4]]
    (folder / "mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "text.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "tiny_text.yaml").write_text(
        f"task: tiny_text\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'text.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )
    return folder


def test_at_prior_mean_equals_hflm_on_the_unpatched_model():
    patch = patch_routers(tiny_model(FAMILY), {"logits": 1.0})
    adapter = PyroMoELM(model=patch, tokenizer=tiny_tokenizer(), num_samples=2, batch_size=2)
    reference = hf_reference()
    requests = requests_of(QUESTIONS)
    rolling = [Instance("loglikelihood_rolling", doc={}, arguments=(TEXT,), idx=0)]
    with at_prior_mean():
        ours, ours_rolling = adapter.loglikelihood(requests), adapter.loglikelihood_rolling(rolling)
    theirs, theirs_rolling = reference.loglikelihood(requests), reference.loglikelihood_rolling(rolling)
    assert len(adapter.tok_encode(TEXT)) > adapter.max_length == 64  # the rolling text needs two windows
    for (value, greedy), (expected, expected_greedy) in zip(ours, theirs, strict=True):
        assert value == pytest.approx(expected, abs=1e-5)
        assert greedy == expected_greedy
    assert ours_rolling[0] == pytest.approx(theirs_rolling[0], abs=1e-5)


def test_a_multiple_choice_task_gives_hflm_accuracy(tmp_path):
    tasks = write_task(tmp_path)
    patch = patch_routers(tiny_model(FAMILY), {"logits": 1.0})
    adapter = PyroMoELM(model=patch, tokenizer=tiny_tokenizer(), num_samples=2)
    manager = TaskManager(include_path=str(tasks))
    options = {"tasks": ["tiny_mc"], "task_manager": manager, "log_samples": True}
    with at_prior_mean():
        ours = lm_eval.simple_evaluate(model=adapter, **options)
    theirs = lm_eval.simple_evaluate(model=hf_reference(), **options)
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
    ours_ll = [r[0][0] for s in ours["samples"]["tiny_mc"] for r in s["resps"]]
    theirs_ll = [r[0][0] for s in theirs["samples"]["tiny_mc"] for r in s["resps"]]
    assert ours_ll == pytest.approx(theirs_ll, abs=1e-5)


class GlobalDraws(Messenger):
    """Records the value of every global sample site of every pass."""

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[dict[str, torch.Tensor]] = [{}]

    def _pyro_post_sample(self, msg: dict) -> None:
        if not msg["is_observed"] and not is_local_site(msg) and msg["type"] == "sample":
            if msg["name"] in self.passes[-1]:
                self.passes.append({})
            self.passes[-1][msg["name"]] = msg["value"].clone()


def global_patch():
    """A patch with global sites only (router weights): their draws are the whole randomness."""
    return patch_routers(tiny_model(FAMILY), {"weight": 0.5})


def test_model_average_is_an_explicit_loop_over_seeded_draws():
    patch = global_patch()
    adapter = PyroMoELM(model=patch, tokenizer=tiny_tokenizer(), num_samples=3, seed=5)
    context, choices, _ = QUESTIONS[0]
    requests = requests_of([QUESTIONS[0]])
    recorder = GlobalDraws()
    with recorder:
        values = [value for value, _ in adapter.loglikelihood(requests)]
    draws = recorder.passes[0]
    tokenizer = tiny_tokenizer()
    for choice, value in zip(choices, values, strict=True):
        context_ids = tokenizer.encode(context)
        whole = tokenizer.encode(context + " " + choice)
        sums = []
        for s in range(3):  # one draw at a time, conditioned on the recorded values of draw s
            condition = {name: value[s : s + 1] for name, value in draws.items()}
            with (
                torch.no_grad(),
                pyro.plate("samples", 1, dim=PARTICLE_DIM),
                pyro.condition(data=condition),
                routing_context(),
            ):
                logits = patch.model(torch.tensor([whole])).logits[0]
            log_probs = torch.log_softmax(logits, -1)
            positions = range(len(context_ids) - 1, len(whole) - 1)
            sums.append(sum(float(log_probs[t, whole[t + 1]]) for t in positions))
        expected = torch.logsumexp(torch.tensor(sums, dtype=torch.float64), 0).item() - math.log(3)
        assert value == pytest.approx(expected, abs=1e-5)
    again = PyroMoELM(model=patch, tokenizer=tiny_tokenizer(), num_samples=3, seed=5).loglikelihood(requests)
    assert [v for v, _ in again] == values  # reproducible from the seed


def test_the_choices_of_one_question_share_their_draws():
    adapter = PyroMoELM(model=global_patch(), tokenizer=tiny_tokenizer(), num_samples=2, batch_size=1)
    recorder = GlobalDraws()
    with recorder:
        adapter.loglikelihood(requests_of(QUESTIONS[:2]))
    # question 1 ("the sky" is two tokens): one pass per choice (batch_size 1); question 2 ("yes", "no" are one
    # token each): one pass over its context for both choices
    assert len(recorder.passes) == 5
    first, second = recorder.passes[:4], recorder.passes[4]
    for draws in first[1:]:
        assert all(torch.equal(draws[name], first[0][name]) for name in first[0])
    assert not all(torch.equal(first[0][name], second[name]) for name in first[0])  # another question


def sample_sites(trace: pyro.poutine.Trace) -> list[tuple[str, torch.Tensor]]:
    """Every sample site of a trace, in order, with its value."""
    return [(name, site["value"]) for name, site in trace.nodes.items() if site["type"] == "sample"]


@pytest.mark.parametrize("mode", ["model-average", "routing-average"])
def test_one_token_choices_are_read_from_one_pass_with_the_draws_of_predict_on_the_prompt(mode):
    """The choices ``yes`` / ``no`` of one context: one pass over the context alone whose every draw (global and
    per-token, recorded by a trace) is the draw of :func:`pyro_moe.predict` on the prompt (batch 1) under the
    question's seed, and whose per-draw log-likelihoods are that prediction's per-draw probabilities."""
    handle = patch_routers(tiny_model(FAMILY), {"weight": 0.5, "logits": 1.0})
    posterior = fit(handle, mcqa_batches(1), "mean-field+mfvr", answer_token_ids=ANSWERS, steps=2, progress=False)
    tokenizer = tiny_tokenizer()
    adapter = PyroMoELM(model=posterior, tokenizer=tokenizer, mode=mode, num_samples=3, seed=7)
    context, choices, _ = QUESTIONS[1]
    with pyro.poutine.trace() as ours:  # a second pass would repeat the site names: the trace would refuse it
        adapter.loglikelihood(requests_of([QUESTIONS[1]]))
    ids = tokenizer.encode(context)
    with seeded(question_seed(7, ids)), pyro.poutine.trace() as theirs:
        prediction = predict(
            posterior.patch, torch.tensor([ids]), num_samples=3, mode=mode, guide=posterior.guide, return_samples=True
        )
    ours_sites, theirs_sites = sample_sites(ours.trace), sample_sites(theirs.trace)
    assert [name for name, _ in ours_sites] == [name for name, _ in theirs_sites]
    assert any(value.dim() > 2 for _, value in ours_sites)  # per-token draws are among them
    for (name, value), (_, expected) in zip(ours_sites, theirs_sites, strict=True):
        assert torch.equal(value, expected), name
    for choice in choices:
        (token,) = tokenizer.encode(context + " " + choice)[len(ids) :]
        expected = prediction.sample_probs[:, 0, token].double().log()
        torch.testing.assert_close(adapter.draw_log_likelihoods[context, " " + choice], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("pretrained={model},colour=blue", "unknown pyro-moe model_args"),
        ("pretrained={model},num_samples=0", "num_samples"),
        ("pretrained={model},mode=ensemble-average", "unknown predictive mode"),
        ("pretrained={model},posterior={posterior}", "differ"),
    ],
)
def test_bad_model_args_end_before_any_task_is_loaded(tmp_path, monkeypatch, model_args, message):
    model_folder, other_folder = tmp_path / "model", tmp_path / "other"
    tiny_model(FAMILY).save_pretrained(model_folder)
    tiny_tokenizer().save_pretrained(model_folder)
    other = patch_routers(tiny_model(FAMILY, seed=1), {"weight": 0.5})
    fit(other, mcqa_batches(1), "mean-field", answer_token_ids=ANSWERS, steps=1, progress=False).save(other_folder)

    def no_tasks(*args, **kwargs):
        raise AssertionError("a task was loaded")

    monkeypatch.setattr(TaskManager, "__init__", no_tasks)
    args = model_args.format(model=model_folder, posterior=other_folder)
    with pytest.raises(PyroMoEError, match=message):
        lm_eval.simple_evaluate(model="pyro-moe", model_args=args, tasks=["tiny_mc"])


def test_generate_until_at_prior_mean_equals_hflm_greedy():
    family = "olmoe"  # its greedy continuations stay inside the tiny tokenizer's vocabulary more often
    adapter = PyroMoELM(model=patch_routers(tiny_model(family), {"logits": 1.0}), tokenizer=tiny_tokenizer())
    requests = [
        Instance("generate_until", doc={}, arguments=(context, {"until": ["true"], "max_gen_toks": 6}), idx=0)
        for context in ("Question : what colour is the sky ? Answer :", "the sky is", "1 2 3")
    ]
    with at_prior_mean():
        ours = adapter.generate_until(requests)
    reference = HFLM(pretrained=tiny_model(family), tokenizer=tiny_tokenizer(), batch_size=1, device="cpu")
    assert ours == reference.generate_until(requests)
    assert all(ours) and not any("true" in text for text in ours)  # cut before the stop string
