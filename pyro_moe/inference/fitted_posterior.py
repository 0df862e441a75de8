"""A trained posterior over the router sites of a patched model: :class:`FittedPosterior`, what
:func:`pyro_moe.inference.fitting.fit` returns. It trains (the SVI loop over minibatches, the frozen backbone,
run checkpoints; :meth:`FittedPosterior.train`), predicts in both predictive modes, generates, calibrates a
post-hoc temperature per predictive mode (:mod:`pyro_moe.inference.calibration`), saves as safetensors plus
JSON and loads onto a fresh model (:meth:`FittedPosterior.load`, the checks of
:mod:`pyro_moe.inference.posterior_restore`). :func:`build_posterior` builds the likelihood, guide and engine
a configuration describes.

Example::

    posterior = fit(handle, batches, guide="low-rank", answer_token_ids=letter_ids, steps=300)
    posterior.train(batches, 100)                                  # 100 more steps
    posterior.calibrate(calibration_batches)                       # one temperature, model-average
    posterior.save("runs/low-rank")
    posterior = FittedPosterior.load("runs/low-rank", model)      # on a fresh, unpatched model
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.core.routing_context import PredictiveMode
from pyro_moe.distributed import DataParallel, data_parallel
from pyro_moe.errors import ConfigurationError, PyroMoEError
from pyro_moe.evaluation.temperature_scaling import TemperatureScaling
from pyro_moe.guides.family import hooks_of
from pyro_moe.guides.router_guide import RouterGuide
from pyro_moe.inference.calibration import calibrated_probs, fit_predictive_temperature
from pyro_moe.inference.callbacks import TrainingCallback, as_callback
from pyro_moe.inference.checkpoint import (
    CONFIG,
    CheckpointError,
    read_checkpoint_folder,
    save_checkpoint,
)
from pyro_moe.inference.generation import Generation, generate
from pyro_moe.inference.model_fingerprint import model_fingerprint
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.inference.posterior_restore import check_same_model, load_buffers, renamed_hyperprior_parameters
from pyro_moe.inference.predictive import RoutedPrediction, predict, predictive_mode
from pyro_moe.inference.resume import (
    Checkpointer,
    CheckpointOptions,
    batches_digest,
)
from pyro_moe.inference.saved_config import check_saved_config
from pyro_moe.inference.svi import SVIEngine
from pyro_moe.models.expert_patch import patch_experts
from pyro_moe.models.likelihoods import Likelihood, check_batches, likelihood_from_config
from pyro_moe.models.priors import learned_scale_name
from pyro_moe.models.router_patch import RouterPatch, check_unpatched, patch_routers
from pyro_moe.validation import check_integer

__all__ = ["FittedPosterior", "build_posterior"]


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The backbone does not train: no gradients for its parameters (restored afterwards)."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


@contextlib.contextmanager
def _training(guide: nn.Module) -> Iterator[None]:
    """The guide in training mode while it trains, in evaluation mode afterwards (SWAG: iterate, then Gaussian)."""
    guide.train()
    try:
        yield
    finally:
        guide.eval()


class FittedPosterior:
    """A trained guide with its model; see the module docstring.

    Attributes:
        patch: the patched model.
        likelihood: the MCQA or the next-token likelihood (``config["likelihood"]``).
        guide: the :class:`~pyro_moe.guides.router_guide.RouterGuide`.
        engine: the SVI engine (history, optimiser state).
        config: everything that rebuilds the patch, the guide and the training; after
            :meth:`calibrate`, ``config["calibration"]`` holds each calibrated mode's temperature.
    """

    def __init__(
        self, patch: RouterPatch, likelihood: Likelihood, guide: RouterGuide, engine: SVIEngine, config: dict
    ) -> None:
        self.patch, self.likelihood, self.guide, self.engine, self.config = patch, likelihood, guide, engine, config

    @property
    def training_options(self) -> TrainingOptions:
        """How this posterior trains (from :attr:`config`)."""
        return TrainingOptions.from_config(self.config)

    @property
    def fitted_post_hoc(self) -> bool:
        """Whether the post-hoc stage ran (a fitted Laplace; ``laplace_fitted`` in older checkpoints)."""
        return bool(self.config.get("post_hoc_fitted", self.config.get("laplace_fitted", False)))

    @property
    def history(self) -> list[dict[str, float]]:
        """One record per step: ``step, loss, nll, kl, beta``, and a callback's value under its name
        (``held_out_nll``) at the steps where it returned one."""
        return self.engine.history

    def _device(self) -> torch.device:
        return self.patch.model.get_input_embeddings().weight.device

    @property
    def data_parallel(self) -> DataParallel | None:
        """The data-parallel run this posterior trains in (``None``: one process)."""
        return self.engine.data_parallel

    def prior_scales(self) -> dict[str, Tensor]:
        """The learned prior scales (empirical Bayes, ``mode="learned"``) by the name of the site they
        scale (e.g. ``"model.layers.1.mlp.gate.logits"``), in the constrained (positive) space,
        detached copies: ``()`` for a scale per layer, ``(experts,)`` per expert.

        Empty when no scale is learned (``fixed`` scales; ``hierarchical`` scales are sample sites
        with a posterior in the guide). The scales survive ``pyro.clear_param_store()``: the posterior
        puts its own back (:meth:`~pyro_moe.guides.router_guide.RouterGuide.restore_learned_scales`)."""
        self.guide.restore_learned_scales()
        store, prefix = pyro.get_param_store(), self.engine.param_prefix
        names = {site: learned_scale_name(site, prefix) for site in self.patch.learned_scale_sites}
        return {site: store[name].detach().clone() for site, name in names.items() if name in store}

    @property
    def calibration(self) -> dict[str, TemperatureScaling]:
        """The temperature of every calibrated predictive mode (:meth:`calibrate`), by mode name; empty
        before any calibration and after further training."""
        return {
            mode: TemperatureScaling(entry["temperature"], entry["calibration_nll"], entry["unscaled_nll"])
            for mode, entry in self.config.get("calibration", {}).items()
        }

    def calibrate(
        self,
        calibration_batches: Iterable[Mapping[str, Tensor]],
        *,
        mode: PredictiveMode | str = PredictiveMode.MODEL_AVERAGE,
        num_samples: int = 16,
        seed: int = 0,
    ) -> TemperatureScaling:
        """Fit a post-hoc temperature on this posterior's averaged answer probabilities in predictive
        ``mode`` and keep it: :meth:`predict` in that mode then returns ``softmax(log p / T)`` of the
        average ``p`` (``calibrated=False``: the plain average), and :meth:`save` / :meth:`load` keep it.

        ``T`` is :func:`~pyro_moe.evaluation.temperature_scaling.fit_temperature` on ``log p`` of the
        calibration batches (:mod:`pyro_moe.inference.calibration`): on a deterministic predictive,
        exactly temperature scaling of the model's answer logits. Calibrate on held-out data, never on
        the test split, and last: :meth:`train` drops the temperatures of a posterior it trains further
        (they were fitted to the old predictive); tuning that changes the predictive afterwards (an
        expert Laplace's prior precision) does not know them.

        Args:
            calibration_batches: held-out batches (dicts of ``input_ids`` ``(B, L)``, ``attention_mask``
                ``(B, L)``, ``labels`` ``(B,)``).
            mode: the predictive mode to calibrate (one of the patch's ``predictive_modes``).
            num_samples: ``S`` draws per prediction, as the calibrated predictions should use.
            seed: seeds the draws; the caller's random streams are restored afterwards.

        Returns:
            The fitted :class:`~pyro_moe.evaluation.temperature_scaling.TemperatureScaling`.

        Raises:
            ConfigurationError: an unknown mode or one the patch does not predict in, a bad
                ``num_samples`` or ``seed``, no batch or a malformed one; every calibration label ranked
                first (``T -> 0``); all before anything in the posterior changes.
        """
        mode = predictive_mode(mode)
        if mode not in self.patch.predictive_modes:
            accepted = ", ".join(m.value for m in self.patch.predictive_modes)
            raise ConfigurationError(f"this posterior predicts in {accepted}, not {mode.value}.")
        check_integer("num_samples", num_samples)
        check_integer("seed", seed, minimum=0)
        batches = check_batches(calibration_batches, self.likelihood.num_choices)

        def averaged(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
            return self.predict(input_ids, attention_mask, num_samples=num_samples, mode=mode, calibrated=False).probs

        scaling = fit_predictive_temperature(averaged, batches, seed)
        entry = {**dataclasses.asdict(scaling), "num_samples": num_samples, "seed": seed}
        entry["examples"] = sum(len(batch["labels"]) for batch in batches)
        self.config["calibration"] = {**self.config.get("calibration", {}), mode.value: entry}
        return scaling

    def train(
        self,
        data: Iterable[Mapping[str, Tensor]],
        steps: int,
        progress: bool = True,
        callback: TrainingCallback | Callable[[FittedPosterior, int], float | None] | None = None,
        checkpoint: CheckpointOptions | None = None,
    ) -> FittedPosterior:
        """Run ``steps`` more SVI steps on ``data`` (also how :func:`fit` trains and how a loaded
        posterior resumes); the batch order continues from the step count. Data-parallel, every
        rank gives the same ``data`` and steps on its rows of each batch. A posterior that has
        trained already may be given 0 steps (the end of a fit resumed at its last step: the
        callback's finish and the post-hoc stage only).

        The ``J`` batches are visited once per epoch, in an order drawn from ``seed + epoch`` (so the
        order is a function of the seed and the step count alone, whatever the number of processes),
        and a batch of ``B_j`` rows stands for ``J B_j`` examples: its rows (their observations and
        per-token sites) weigh ``J``, global sites count once. Its share of the data is ``B_j / N``
        and it is drawn with probability ``1 / J``, so weighing it by ``1 / (1 / J) = J`` makes every
        step an unbiased estimate of the full-data objective, and an epoch's average exactly it, for
        any batch sizes (a smaller last batch included). ``N / B_j`` (the uniform-subsample weight)
        would overweight the rows of a small batch: its expectation is ``sum_j N / (J B_j) S_j``.
        Visiting every batch once per epoch (rather than drawing batches in proportion to their sizes)
        keeps the epoch average exact and the order a permutation.

        ``callback`` (see :mod:`pyro_moe.inference.callbacks`, e.g. an
        :class:`~pyro_moe.inference.callbacks.EvaluationCallback`) is checked before the first
        step, called after every step with the number of steps done (a returned number goes into
        that step's history record under the callback's name) and finished after the last.
        ``checkpoint``: write run checkpoints while the steps run, and on SIGINT write one and raise
        :class:`~pyro_moe.inference.resume.FitInterrupted` (:mod:`pyro_moe.inference.resume`; its
        ``resume`` is for :func:`fit`)."""
        hooks = hooks_of(self.guide.global_guide)
        start = self.engine.step_count
        check_integer("steps", steps, minimum=0 if start else self.guide.min_steps)
        if self.fitted_post_hoc:
            raise ConfigurationError("a posterior fitted post hoc (a Laplace) cannot resume training; fit a new one.")
        if checkpoint is not None and not isinstance(checkpoint, CheckpointOptions):
            raise ConfigurationError(f"checkpoint must be CheckpointOptions or None, got {checkpoint!r}.")
        batches = self.likelihood.check_batches(data)
        callback = None if callback is None else as_callback(callback)
        if callback is not None and (steps or not start):
            callback.check(self, start, steps)
        num_examples = sum(len(batch["input_ids"]) for batch in batches)
        num_batches = len(batches)
        parallel = self.data_parallel
        if parallel is not None:
            parallel.check_batch_sizes([len(batch["input_ids"]) for batch in batches])
            progress = progress and parallel.is_main
        device, seed = self._device(), self.config["seed"]
        hooks.check_fit(self.patch, start, steps, self.config["num_particles"])
        if not hooks.trains:  # nothing to optimise (temp-sampling)
            return self
        self.config.pop("calibration", None)  # fitted to the predictive these steps change
        checkpointer = None
        if checkpoint is not None:
            checkpointer = Checkpointer(checkpoint, self, callback, batches_digest(batches), start + steps)
        interrupts = contextlib.nullcontext() if checkpointer is None else checkpointer.stop_on_interrupt()
        if not steps and self.engine.resume_rng_state is not None:  # no step to restore it: the state as saved
            self.engine.resume_rng_state.restore()
            self.engine.resume_rng_state = None
        bar = tqdm(range(start, start + steps), desc=f"fit {self.guide.spec}", disable=not progress)
        with _frozen(self.patch.model), _training(self.guide):
            with interrupts, contextlib.closing(bar):
                for step in bar:
                    epoch, position = divmod(step, num_batches)
                    order = torch.randperm(num_batches, generator=torch.Generator().manual_seed(seed + epoch))
                    batch = batches[int(order[position])]
                    stands_for = num_batches * len(batch["input_ids"])  # J B_j: its rows weigh J (see the docstring)
                    batch = {k: v.to(device) for k, v in (parallel.shard_rows(batch) if parallel else batch).items()}
                    record = self.engine.step({**batch, "num_examples": stands_for})
                    hooks.after_step(self.engine.step_count)
                    value = None if callback is None else callback(self, self.engine.step_count)
                    if value is not None:
                        record[callback.name] = float(value)
                    bar.set_postfix(self.engine.progress_terms(record))  # the terms its objective has
                    if checkpointer is not None:
                        checkpointer.after_step(self.engine.step_count)
            if callback is not None:
                callback.finish(self)
            if hooks.post_hoc:
                batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
                self.guide.finish_post_hoc(batches, num_examples, progress, parallel)
                self.config["post_hoc_fitted"] = True
        return self

    def predict(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, calibrated: bool = True, **options: Any
    ) -> RoutedPrediction:
        """:func:`pyro_moe.predict` with this posterior (``model-average`` by default): MCQA answers, so a
        posterior fitted on text refuses (its perplexity: :func:`pyro_moe.inference.perplexity.perplexity`).

        In a mode :meth:`calibrate` has calibrated, ``probs`` are the calibrated probabilities and
        ``temperature`` the temperature applied, unless ``calibrated=False``; ``sample_probs`` are always
        the per-draw answer probabilities of the posterior, untempered (their mean is the uncalibrated
        ``probs``: the temperature belongs to the average it was fitted on, not to single draws)."""
        prediction = predict(
            self.patch,
            input_ids,
            attention_mask,
            answer_token_ids=self.likelihood.answer_token_ids,
            guide=self.guide,
            **options,
        )
        scaling = self.calibration.get(predictive_mode(options.get("mode", PredictiveMode.MODEL_AVERAGE)).value)
        if not calibrated or scaling is None:
            return prediction
        probs = calibrated_probs(prediction.probs, scaling)
        return dataclasses.replace(prediction, probs=probs, temperature=scaling.temperature)

    def generate(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int, **options: Any
    ) -> Generation:
        """:func:`pyro_moe.inference.generation.generate` with this posterior: up to ``max_new_tokens`` tokens
        after each left-padded prompt, every one with its averaged probability, predictive and expected
        entropy and mutual information (``model-average`` by default; ``num_samples``, ``mode``,
        ``do_sample``, ``temperature``, ``top_p``, ``seed``, ``eos_token_id``, ``stop_strings``,
        ``tokenizer``, ``top_k_per_sample``, ``max_samples_per_pass`` as there). The calibration
        temperatures (:meth:`calibrate`) belong to the answer letters and are not applied."""
        return generate(
            self.patch, input_ids, attention_mask, max_new_tokens=max_new_tokens, guide=self.guide, **options
        )

    def save(self, folder: str | Path) -> Path:
        """Write the guide's parameters, the optimiser state and the configuration (safetensors + JSON)
        with a manifest binding them to their bytes and to the model (its fingerprint), as one atomic
        folder (:mod:`pyro_moe.inference.checkpoint`): ``folder`` is replaced as a whole, so it must be
        new, empty or a checkpoint.

        Data-parallel, only rank 0 writes; the others return at once (so calling it on every rank or
        on rank 0 alone both work)."""
        if self.data_parallel is not None and not self.data_parallel.is_main:
            return Path(folder)
        return save_checkpoint(folder, *self.training_state(), model=model_fingerprint(self.patch))

    def training_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What :meth:`save` writes: the tensors (parameters, buffers, optimiser and random state) and the
        configuration with the history and step count (the run checkpoints of
        :mod:`pyro_moe.inference.resume` add to it)."""
        tensors = self.engine.state_tensors()
        tensors.update({f"buffer/{name}": value for name, value in self.guide.named_buffers()})
        config = {**self.config, "history": self.engine.history, "step_count": self.engine.step_count}
        if self.fitted_post_hoc:
            config["post_hoc_state"] = hooks_of(self.guide.global_guide).fitted_metadata()
        return tensors, config

    @classmethod
    def load(
        cls,
        folder: str | Path,
        model: nn.Module,
        distributed: bool | None = None,
        *,
        allow_other_model: bool = False,
    ) -> FittedPosterior:
        """Patch ``model`` as the saved posterior was patched and restore its guide and training state.

        The folder's bytes are checked against its manifest, every configuration entry against the
        model (:func:`~pyro_moe.inference.saved_config.check_saved_config`), and the model against the
        fingerprint of the one the posterior was fitted on (configuration and the weights of the MoE
        blocks with sample sites, :mod:`~pyro_moe.inference.model_fingerprint`). ``model`` is patched
        in place (undo with ``posterior.patch.unpatch()``); a refusal leaves it unpatched.

        Args:
            folder: a folder :meth:`save` wrote.
            model: the model it was fitted on (fresh, unpatched).
            distributed: as in :func:`fit`; a checkpoint resumes under any number of processes.
            allow_other_model: load into a model whose fingerprint differs (a deliberate transfer, e.g.
                to a fine-tune of the same architecture), with a warning naming what differs.

        Raises:
            CheckpointError: a missing, changed or extra file; a configuration entry the model cannot
                use (naming it), guide options the guide refuses, tensors that do not fit the guide the
                configuration describes; another model than the fitted one (naming the configuration
                entries or the blocks whose weights differ), unless ``allow_other_model``.
            ConfigurationError: ``model`` already carries a patch.
        """
        parallel = data_parallel(distributed)
        saved = read_checkpoint_folder(folder)
        tensors, config = saved.tensors, saved.config
        check_unpatched(model)
        check_saved_config(config, model, saved.folder / CONFIG)
        try:
            if "experts" in config["sites"]:
                patch = patch_experts(model, config["layers"], sites=config["sites"])
            else:
                patch = patch_routers(model, config["sites"], layers=config["layers"], selection=config["selection"])
        except ConfigurationError as error:
            raise CheckpointError(f"checkpoint file {saved.folder / CONFIG}: entry 'sites': {error}") from None
        try:
            check_same_model(saved, patch, allow_other_model)
            posterior, dummy = _rebuilt(patch, config, parallel, saved.folder / CONFIG)
            device = posterior._device()
            if posterior.fitted_post_hoc:
                if any(name.startswith("param/") for name in tensors):  # what the SVI steps trained (per-token parts)
                    posterior.engine.load_state_tensors(tensors, dummy)
                buffers = {
                    name.removeprefix("buffer/global_guide."): tensor.to(device)
                    for name, tensor in tensors.items()
                    if name.startswith("buffer/global_guide.")
                }
                metadata = config.get("post_hoc_state", config.get("kronecker_laplace", {}))  # older: kronecker_laplace
                posterior.guide.restore_post_hoc(buffers, metadata, dummy)
            elif hooks_of(posterior.guide.global_guide).trains:
                tensors = renamed_hyperprior_parameters(tensors, posterior.engine.param_prefix)
                posterior.engine.load_state_tensors(tensors, dummy)
                load_buffers(posterior.guide, tensors)
            posterior.guide.eval()
            posterior.engine.history = list(config.get("history", []))
            posterior.engine.step_count = config.get("step_count", 0)
        except ConfigurationError as error:  # tensors that do not fit the guide the configuration describes
            patch.unpatch()
            raise CheckpointError(f"checkpoint {saved.folder}: {error}") from None
        except BaseException:
            patch.unpatch()
            raise
        return posterior


def _rebuilt(
    patch: RouterPatch, config: dict, parallel: DataParallel | None, source: Path
) -> tuple[FittedPosterior, dict[str, Any]]:
    """The posterior ``config`` (read from ``source``) describes on ``patch``, its guide set up on a
    placeholder batch (returned too); what the likelihood or the guide refuses names ``source``."""
    try:
        posterior = build_posterior(patch, config, parallel)
        dummy = {**posterior.likelihood.placeholder_batch(posterior._device()), "num_examples": 1}
        posterior.guide.setup(**dummy)
    except PyroMoEError as error:
        raise CheckpointError(f"checkpoint file {source}: {error}") from None
    except (TypeError, ValueError) as error:  # guide options reach Pyro's and torch's constructors as they are
        if not config.get("guide_options"):
            raise
        raise CheckpointError(
            f"checkpoint file {source}: entry 'guide_options': the guide {config['guide']!r} refuses "
            f"{config['guide_options']}: {error}."
        ) from None
    return posterior, dummy


_FIT_NUMBERS = itertools.count()


def build_posterior(patch: RouterPatch, config: dict, parallel: DataParallel | None) -> FittedPosterior:
    """Likelihood (as ``config`` names it), guide and engine of a fit; their parameters carry a prefix of their own."""
    prefix = f"pyro_moe.fit{next(_FIT_NUMBERS)}/"
    likelihood = likelihood_from_config(patch, config, param_prefix=prefix)
    guide = RouterGuide(likelihood, config["guide"], config.get("guide_options"))
    options = TrainingOptions.from_config(config)
    engine = SVIEngine(
        likelihood, guide, options, nll=lambda: likelihood.last_nll, param_prefix=prefix, data_parallel=parallel
    )
    return FittedPosterior(patch, likelihood, guide, engine, config)
