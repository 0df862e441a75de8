"""``fit``: posteriors over the router sites of a patched model, by SVI, with guides by name.

Every guide family trains the same model on the same data with the same loop: the MCQA
likelihood (multiple-choice batches and the answer letters' ids) or the next-token likelihood
(text batches, ``answer_token_ids=None``) on minibatches (an unbiased estimate of the full-data
objective for any batch sizes, the average over an epoch exactly it: :meth:`FittedPosterior.train`), the frozen
backbone, Adam, an optional KL weight with linear annealing, gradient clipping, a seed, and a
progress bar with the loss, KL and NLL. The result predicts with both predictive modes, saves as
safetensors plus JSON and resumes; :meth:`FittedPosterior.calibrate` adds a post-hoc temperature per
predictive mode (:mod:`pyro_moe.inference.calibration`), saved with it.

Example::

    handle = patch_routers(model, {"weight": 0.05}, layers=[1, 2])
    posterior = fit(handle, batches, guide="low-rank", answer_token_ids=letter_ids, steps=300)
    posterior = fit(handle, batches, "low-rank", answer_token_ids=letter_ids, training=TrainingOptions(steps=300))
    prediction = posterior.predict(input_ids, attention_mask, num_samples=16)
    posterior.calibrate(calibration_batches)                       # one temperature, model-average
    posterior.predict(input_ids, attention_mask).temperature       # the calibrated probabilities' T
    posterior.save("runs/low-rank")
    posterior = FittedPosterior.load("runs/low-rank", model)      # on a fresh, unpatched model
    text = fit(handle, text_batches(documents, tokenizer, 8), "mfvr", answer_token_ids=None, steps=300)

Under ``torchrun`` (after :func:`pyro_moe.distributed.init_distributed`) the same calls run
data-parallel: every rank steps on its shard of each global batch, the guide's gradients are
averaged, a Laplace fit reduces its curvature once, and only rank 0 writes (see
:mod:`pyro_moe.distributed`). The batches and their order do not depend on the number of
processes, so a checkpoint resumes under any number of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pyro
import torch
from torch import Tensor

from pyro_moe.distributed import data_parallel
from pyro_moe.inference.callbacks import TrainingCallback, as_callback
from pyro_moe.inference.fitted_posterior import FittedPosterior, build_posterior
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.inference.posterior_restore import load_buffers
from pyro_moe.inference.resume import (
    CheckpointOptions,
    batches_digest,
    check_resumable,
    read_checkpoint,
    restore_host_random,
)
from pyro_moe.models.likelihoods import likelihood_kind
from pyro_moe.models.router_patch import RouterPatch

__all__ = ["FittedPosterior", "fit"]


def fit(
    patch: RouterPatch,
    data: Iterable[Mapping[str, Tensor]],
    guide: str = "mean-field",
    *,
    answer_token_ids: Tensor | Sequence[int] | None,
    training: TrainingOptions | None = None,
    guide_options: Mapping[str, Mapping[str, Any]] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    distributed: bool | None = None,
    callback: TrainingCallback | Callable[[FittedPosterior, int], float | None] | None = None,
    checkpoint: CheckpointOptions | None = None,
    **overrides: Any,
) -> FittedPosterior:
    """Fit a posterior over the router sites of ``patch`` on MCQA or text ``data`` by SVI.

    Args:
        patch: the patched model; its sites decide which guide parts are needed.
        data: MCQA batches (dicts of ``input_ids``, ``attention_mask``, ``labels``), e.g. from
            :func:`pyro_moe.data.mcqa_batches`, or text batches (``input_ids``, ``attention_mask``
            only), e.g. from :func:`pyro_moe.data.text_batches`; the full data set is all of them.
        guide: a registered guide name, ``"global+local"`` (see :mod:`pyro_moe.guides.registry`).
        answer_token_ids: which likelihood, said explicitly: ``(choices,)`` token ids of the answer
            letters for MCQA batches (the answer at the last prompt position is observed), or
            ``None`` for text batches (every real next token is observed,
            :class:`~pyro_moe.models.likelihoods.NextTokenLikelihood`).
        training: steps, objective, particles, step size, optimiser, KL weight, clipping and seed
            (:class:`~pyro_moe.inference.options.TrainingOptions`; default: its defaults). A guide with
            nothing to train (``temp-sampling``) does no steps.
        guide_options: options per guide family, e.g. ``{"low-rank": {"rank": 4}}``.
        device: move the model (and so the guide) there first, e.g. ``"cuda"``.
        progress: show a progress bar (on rank 0 only, data-parallel).
        distributed: ``None``: data-parallel when a process group of two or more processes is
            initialised (:func:`pyro_moe.distributed.init_distributed`), every rank giving the same
            ``data``; ``False``: fit in this process alone; ``True``: require the process group.
        callback: runs after every step (:meth:`FittedPosterior.train`), e.g.
            ``EvaluationCallback(validation_batches, every=50, keep_best=True)``: held-out NLL in the
            history, the best evaluation's parameters restored at the end.
        checkpoint: write run checkpoints every few steps and on SIGINT
            (:class:`~pyro_moe.inference.resume.CheckpointOptions`, :mod:`pyro_moe.inference.resume`); with
            ``resume=True`` and a checkpoint in its folder, continue that fit (parameters, optimiser,
            random streams, history, the callback's state) after checking that it was written with the
            same options and batches: the result equals the uninterrupted fit bitwise (one process, the
            same device and threads). The checkpoint stays when the fit ends (delete it once the
            posterior is saved).
        overrides: fields of :class:`~pyro_moe.inference.options.TrainingOptions` replacing those of
            ``training`` (``steps=300, lr=0.05``).

    Raises:
        ConfigurationError: unknown guide, a guide that does not cover the model's sites or does not
            fit the likelihood (the Kronecker Laplace families: MCQA only), empty data, labels outside
            the choices, MCQA batches with ``answer_token_ids=None`` or text batches with answer ids,
            text without a next token to observe, bad options, data-parallel batches with fewer rows
            than processes, a callback's bad options or held-out batches, a checkpoint to resume that
            was written with other options or batches (:class:`~pyro_moe.inference.resume.ResumeError`);
            before training starts.
        FitInterrupted: SIGINT during the steps, with ``checkpoint``: the checkpoint is written.
    """
    options = (training or TrainingOptions()).with_overrides(overrides)
    parallel = data_parallel(distributed)
    config = {
        "guide": guide,
        "guide_options": {k: dict(v) for k, v in (guide_options or {}).items()},
        **options.to_config(),
        "sites": patch.sites.to_config(),
        "selection": patch.sites.selection.value,
        "layers": [location.layer_index for location in patch.locations],
        "likelihood": likelihood_kind(answer_token_ids).value,
    }
    if answer_token_ids is not None:
        config["answer_token_ids"] = torch.as_tensor(answer_token_ids).long().tolist()
    posterior = build_posterior(patch, config, parallel)  # refuses bad answer ids, guides and options
    batches = posterior.likelihood.check_batches(data)
    if parallel is not None:
        parallel.check_batch_sizes([len(batch["input_ids"]) for batch in batches])
    callback = None if callback is None else as_callback(callback)
    saved = None
    if checkpoint is not None and checkpoint.resume:
        saved = read_checkpoint(checkpoint.folder, patch)
        if saved is not None:
            check_resumable(checkpoint.folder, saved[1], config, checkpoint, batches_digest(batches), callback)
    pyro.set_rng_seed(options.seed)
    original_device = patch.model.get_input_embeddings().weight.device
    try:
        if device is not None:
            patch.model.to(device)
        first = {k: v.to(posterior._device()) for k, v in batches[0].items()}
        posterior.guide.setup(**first, num_examples=sum(len(b["input_ids"]) for b in batches))
    except BaseException:
        patch.model.to(original_device)  # a refused guide leaves the model where it was
        raise
    if saved is not None:
        _resume(posterior, *saved, {**first, "num_examples": sum(len(b["input_ids"]) for b in batches)}, callback)
    steps = options.steps - posterior.engine.step_count
    return posterior.train(batches, steps, progress=progress, callback=callback, checkpoint=checkpoint)


def _resume(
    posterior: FittedPosterior,
    tensors: Mapping[str, Tensor],
    config: Mapping[str, Any],
    batch: Mapping[str, Any],
    callback: TrainingCallback | None,
) -> None:
    """Continue a run checkpoint (:func:`pyro_moe.inference.resume.read_checkpoint`) in the freshly set-up
    ``posterior``: parameters, buffers, optimiser, random streams, history, step count, the callback's state."""
    posterior.engine.load_state_tensors(tensors, batch)  # torch's streams: restored at the next step
    load_buffers(posterior.guide, tensors)
    posterior.engine.history = [dict(record) for record in config["history"]]
    posterior.engine.step_count = int(config["step_count"])
    if callback is not None:
        state = {name.removeprefix("callback/"): t for name, t in tensors.items() if name.startswith("callback/")}
        callback.restore_checkpoint_state(state, config["checkpoint"].get("callback", {}))
    restore_host_random(tensors)
