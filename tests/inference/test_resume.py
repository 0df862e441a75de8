"""Run checkpoints (:mod:`pyro_moe.inference.resume`): every registered family resumed from a checkpoint ends
bitwise equal to its uninterrupted fit (tensors with ``torch.equal``, the history as JSON); SIGINT writes a
checkpoint after a whole step and raises ``FitInterrupted`` (a second one interrupts at once); a resume at
the last step; keep_best hands back the best step's optimiser state; resumes with other options, batches or
from a posterior folder are refused naming what differs."""

from __future__ import annotations

import dataclasses
import json
import random
import signal

import numpy as np
import pyro
import pytest
import torch

from pyro_moe import patch_routers
from pyro_moe.guides.family import hooks_of
from pyro_moe.guides.registry import GUIDE_FAMILIES
from pyro_moe.inference.callbacks import EvaluationCallback, TrainingCallback
from pyro_moe.inference.checkpoint import load_checkpoint
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.recipe_fit import run_recipe
from pyro_moe.inference.recipes import named_recipe
from pyro_moe.inference.resume import CheckpointOptions, FitInterrupted, ResumeError
from pyro_moe.models.expert_patch import patch_experts
from tests.helpers import ANSWERS, FAMILY_SETUPS, SITES_FOR_SCOPE, mcqa_batches
from tests.tiny_models import tiny_model

TRAIN, HELD_OUT = mcqa_batches(3, 8, seed=0), mcqa_batches(2, 6, seed=1)
STEPS = 10
SHORT_SCHEDULES = {"swag": {"guide_options": {"swag": {"rank": 2, "burn_in": 2, "every": 2}}}}
"""Fit options of the families whose defaults need more than :data:`STEPS` steps."""


@pytest.fixture(autouse=True)
def sigint_as_a_terminal_gives_it():
    """Python's own SIGINT handler during each test, even when the tests run with SIGINT ignored (nohup,
    a background job), where a fit deliberately keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class _Crash(TrainingCallback):
    """Raises after step ``at`` (a crash: the process would die there)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, posterior, step):
        if step == self.at:
            raise RuntimeError("crash")


class _Signal(TrainingCallback):
    """Sends this process SIGINT ``times`` times during step ``at`` (after its optimiser step)."""

    def __init__(self, at: int, times: int = 1) -> None:
        self.at, self.times = at, times

    def __call__(self, posterior, step):
        if step == self.at:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)


def _patch(name: str):
    pyro.clear_param_store()
    setup = dict(FAMILY_SETUPS.get(name, {})) | SHORT_SCHEDULES.get(name, {})
    sites = setup.pop("sites", SITES_FOR_SCOPE[GUIDE_FAMILIES[name].scope])
    if sites == "experts":
        return patch_experts(tiny_model("granitemoe"), layers=[1], prior_precision=100.0), setup
    selection = setup.pop("selection", "top-k")
    return patch_routers(tiny_model("granitemoe"), sites, layers=[1], selection=selection), setup


def _fit(name, folder, *, resume=False, callback=None, steps=STEPS, every=3, batches=TRAIN, **options):
    handle, setup = _patch(name)
    setup.setdefault("lr", 0.05)
    checkpoint = CheckpointOptions(folder, every=every, resume=resume)
    return fit(
        handle,
        batches,
        name,
        answer_token_ids=ANSWERS,
        steps=steps,
        progress=False,
        callback=callback,
        checkpoint=checkpoint,
        **(setup | options),
    )


def _scramble_random_streams() -> None:
    """A new process starts from other random states than the interrupted one left."""
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)


def _assert_same_state(expected: FittedPosterior, actual: FittedPosterior) -> None:
    (tensors, config), (other_tensors, other_config) = expected.training_state(), actual.training_state()
    assert sorted(tensors) == sorted(other_tensors)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, other_tensors[name]), name
    assert json.dumps(config, sort_keys=True) == json.dumps(other_config, sort_keys=True)


@pytest.mark.parametrize("name", sorted(GUIDE_FAMILIES))
def test_every_family_resumed_from_a_checkpoint_equals_the_uninterrupted_fit_bitwise(name, tmp_path):
    straight = _fit(name, tmp_path / "straight")
    if not hooks_of(straight.guide.global_guide).trains:  # nothing to optimise, so nothing to checkpoint
        assert straight.history == [] and not (tmp_path / "straight").exists()
        return
    crash = 7
    with pytest.raises(RuntimeError, match="crash"):
        _fit(name, tmp_path / "run", callback=_Crash(crash))
    _, config = load_checkpoint(tmp_path / "run")
    assert config["step_count"] == 6  # the last checkpoint before the crash (every 3 steps)
    _scramble_random_streams()
    resumed = _fit(name, tmp_path / "run", resume=True)
    assert len(resumed.history) == STEPS and resumed.fitted_post_hoc == straight.fitted_post_hoc
    _assert_same_state(straight, resumed)
    for posterior in (straight, resumed):
        posterior.patch.unpatch()


def test_sigint_writes_a_checkpoint_after_the_whole_step_and_a_second_one_interrupts_at_once(tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(FitInterrupted) as stop:
        _fit("mfvr", tmp_path / "run", callback=_Signal(at=5), every=100)
    assert (stop.value.step, stop.value.steps, stop.value.folder) == (5, STEPS, tmp_path / "run")
    _, config = load_checkpoint(tmp_path / "run")
    assert config["step_count"] == 5 and len(config["history"]) == 5
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is the caller's again
    with pytest.raises(KeyboardInterrupt):
        _fit("mfvr", tmp_path / "twice", callback=_Signal(at=5, times=2), every=100)
    assert not (tmp_path / "twice").exists()  # no checkpoint due before: the second Ctrl-C stops at once
    assert signal.getsignal(signal.SIGINT) is handler

    _scramble_random_streams()
    resumed = _fit("mfvr", tmp_path / "run", resume=True, every=100)
    _assert_same_state(_fit("mfvr", tmp_path / "straight", every=100), resumed)


def test_a_fit_interrupted_at_its_last_step_resumes_to_its_end_with_the_best_step_kept(tmp_path):
    def evaluation():
        return EvaluationCallback(HELD_OUT, every=2, num_samples=2, keep_best=True)

    class LastStepSignal(EvaluationCallback):
        def __call__(self, posterior, step):
            value = super().__call__(posterior, step)
            if step == STEPS:
                signal.raise_signal(signal.SIGINT)
            return value

    options = dict(lr=0.15, objective="iwae", num_particles=2)
    straight = _fit("mfvr", tmp_path / "straight", callback=evaluation(), **options)
    interrupted = LastStepSignal(HELD_OUT, every=2, num_samples=2, keep_best=True)
    with pytest.raises(FitInterrupted):
        _fit("mfvr", tmp_path / "run", callback=interrupted, **options)
    _scramble_random_streams()
    resumed_evaluation = evaluation()
    resumed = _fit("mfvr", tmp_path / "run", resume=True, callback=resumed_evaluation, **options)
    assert resumed_evaluation.values == interrupted.values and resumed_evaluation.best_step == interrupted.best_step
    _assert_same_state(straight, resumed)


def test_keep_best_hands_back_the_best_steps_optimiser_state_so_training_continues_from_it(tmp_path):
    options = dict(lr=0.15, objective="iwae", num_particles=2)
    evaluation = EvaluationCallback(HELD_OUT, every=2, num_samples=2, keep_best=True)
    kept = _fit("mfvr", tmp_path / "kept", callback=evaluation, steps=12, **options)
    best = evaluation.best_step
    assert best < 12, evaluation.values  # the restore does something here
    stopped = _fit("mfvr", tmp_path / "stopped", steps=best, **options)  # a plain fit that ends at the best step
    last = _fit("mfvr", tmp_path / "last", steps=12, **options)
    moments = kept.engine.optimizer_tensors()
    assert moments.keys() == stopped.engine.optimizer_tensors().keys()
    for key, value in stopped.engine.optimizer_tensors().items():
        assert torch.equal(moments[key], value), key
    assert not all(torch.equal(moments[k], v) for k, v in last.engine.optimizer_tensors().items())

    # saved and loaded, the kept posterior trains on as the stopped fit does (same batch, same draws)
    continued = []
    for posterior, folder in ((kept, tmp_path / "kept.posterior"), (stopped, tmp_path / "stopped.posterior")):
        posterior.save(folder)
        pyro.clear_param_store()
        loaded = FittedPosterior.load(folder, tiny_model("granitemoe"))
        loaded.engine.resume_rng_state = None
        loaded.engine.step_count = best  # the same KL weight and batch order from here
        pyro.set_rng_seed(3)
        loaded.train(TRAIN[:1], steps=3, progress=False)
        continued.append({k: v for k, v in loaded.engine.state_tensors().items() if not k.startswith("rng/")})
    assert continued[0].keys() == continued[1].keys()
    for name, tensor in continued[1].items():
        assert torch.equal(continued[0][name], tensor), name


def test_a_resume_with_other_options_batches_or_from_a_posterior_is_refused_naming_what_differs(tmp_path):
    with pytest.raises(RuntimeError, match="crash"):
        _fit("mean-field", tmp_path / "run", callback=_Crash(4))
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ResumeError, match=r"fitted with lr=0\.05, this fit has 0\.1"):
        _fit("mean-field", tmp_path / "run", resume=True, lr=0.1)
    with pytest.raises(ResumeError, match=r"fitted with steps=10, this fit has 12"):
        _fit("mean-field", tmp_path / "run", resume=True, steps=12)
    with pytest.raises(ResumeError, match="other training batches"):
        _fit("mean-field", tmp_path / "run", resume=True, batches=mcqa_batches(3, 8, seed=5))
    handle, _ = _patch("mean-field")
    other_run = CheckpointOptions(tmp_path / "run", every=3, resume=True, run={"data": "other.jsonl"})
    with pytest.raises(ResumeError, match=r"written with data=None, this run has 'other\.jsonl'"):
        fit(handle, TRAIN, "mean-field", answer_token_ids=ANSWERS, steps=STEPS, lr=0.05, checkpoint=other_run)
    assert (tmp_path / "run" / "config.json").read_text() == before  # a refused resume changes nothing
    _fit("mean-field", tmp_path / "done", steps=2).save(tmp_path / "posterior")
    with pytest.raises(ResumeError, match="is not a run checkpoint"):
        _fit("mean-field", tmp_path / "posterior", resume=True)
    with pytest.raises(Exception, match="every"):
        CheckpointOptions(tmp_path, every=-1)


def test_a_resume_with_another_stateful_callback_or_its_options_changed_is_refused(tmp_path):
    held_out = mcqa_batches(1, 8, seed=9)
    with pytest.raises(RuntimeError, match="crash"):
        _fit("mean-field", tmp_path / "plain", callback=_Crash(4))  # no state: any stateless callback continues
    with pytest.raises(
        ResumeError, match=r"written with the callback none, this fit has \{'type': 'EvaluationCallback'"
    ):
        _fit("mean-field", tmp_path / "plain", resume=True, callback=EvaluationCallback(held_out, every=2))
    _fit("mean-field", tmp_path / "best", steps=4, callback=EvaluationCallback(held_out, every=2, keep_best=True))
    with pytest.raises(ResumeError, match=r"'keep_best': True.*'keep_best': False"):
        _fit("mean-field", tmp_path / "best", resume=True, steps=4, callback=EvaluationCallback(held_out, every=2))


def test_a_resume_on_another_model_is_refused_naming_the_block_whose_weights_differ(tmp_path):
    with pytest.raises(RuntimeError, match="crash"):
        _fit("mean-field", tmp_path / "run", callback=_Crash(4))
    pyro.clear_param_store()
    other = tiny_model("granitemoe")
    with torch.no_grad():
        other.model.layers[1].block_sparse_moe.router.weight.add_(0.5)  # same shapes, other router weights
    handle = patch_routers(other, SITES_FOR_SCOPE[GUIDE_FAMILIES["mean-field"].scope], layers=[1])
    checkpoint = CheckpointOptions(tmp_path / "run", every=3, resume=True)
    with pytest.raises(ResumeError, match=r"written on another model: .*layers\.1"):
        fit(handle, TRAIN, "mean-field", answer_token_ids=ANSWERS, steps=STEPS, lr=0.05, checkpoint=checkpoint)


def test_a_recipe_resumed_from_its_checkpoint_equals_the_uninterrupted_recipe(tmp_path, monkeypatch):
    """The calibration NLL along the fit, the best step and the learned scales' trajectory are in the checkpoint."""
    recipe = dataclasses.replace(
        named_recipe("mfvr-iwae-expert").with_training(steps=9, seed=2),
        scale_grid=(0.3, 1.0),
        selection_samples=2,
        calibration_samples=2,
        evaluate_every=2,
    )

    def run(folder, **options):
        pyro.clear_param_store()
        checkpoint = CheckpointOptions(folder, every=3, **options)
        return run_recipe(
            tiny_model("granitemoe"),
            recipe,
            TRAIN,
            HELD_OUT,
            answer_token_ids=ANSWERS,
            progress=False,
            checkpoint=checkpoint,
        )

    straight = run(tmp_path / "straight")
    expected = straight.to_json()  # the learned scales are read from the param store, which the next fit clears
    crashing = EvaluationCallback.__call__

    def crash(self, posterior, step):
        if step == 7:
            raise RuntimeError("crash")
        return crashing(self, posterior, step)

    monkeypatch.setattr(EvaluationCallback, "__call__", crash)
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "run")
    monkeypatch.undo()
    _scramble_random_streams()
    resumed = run(tmp_path / "run", resume=True)
    assert resumed.scale_trajectory == straight.scale_trajectory and len(straight.scale_trajectory) > 3
    assert resumed.calibration_nll == straight.calibration_nll and resumed.best_step == straight.best_step
    assert resumed.to_json() == expected and expected["prior_scales"]
    _assert_same_state(straight.posterior, resumed.posterior)
