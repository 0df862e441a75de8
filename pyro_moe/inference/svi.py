"""The SVI engine: objectives, KL weight, optimisation and its state.

Any Pyro model and guide called with the keyword arguments of a batch train here; the engine
adds what :class:`pyro.infer.SVI` lacks for this project: a KL weight ``beta`` with linear
annealing, gradient clipping, a stop with a named culprit on non-finite values or a failed
factorisation (``torch.linalg.LinAlgError``, e.g. the Cholesky factor of a covariance that is not
positive definite), keeping the last finite state, and a state that can be saved and resumed.

Objectives (vectorised particles at dim -2, ``max_plate_nesting=1``):

* ``elbo``: ``TraceMeanField_ELBO`` (analytic KL where registered, Monte Carlo otherwise);
* ``iwae``: ``RenyiELBO`` with ``alpha`` in ``[0, 1)`` and ``K`` particles; ``alpha = 0`` is the
  importance-weighted bound, a bound on the log of the Monte Carlo predictive; per example when
  every latent site is local (see :class:`DifferentiableRenyiELBO`).

Data-parallel (``data_parallel``, see :mod:`pyro_moe.distributed`): each rank steps on its shard of
the global batch and the gradients are averaged over the ranks with weights ``B_r / B`` before
clipping and the optimiser step, which equals one process stepping on the whole batch.

Example::

    engine = SVIEngine(model, guide, TrainingOptions(objective="iwae", num_particles=4, lr=1e-2))
    for batch in batches:
        record = engine.step(batch)           # {"step", "loss", "nll", "kl", "beta"}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, RenyiELBO, TraceMeanField_ELBO
from pyro.infer.util import get_dependent_plate_dims, is_identically_zero, torch_sum
from pyro.poutine.messenger import Messenger
from torch import Tensor

from pyro_moe.distributed import DataParallel, RankRandomness
from pyro_moe.errors import ConfigurationError, DistributedError, NonFiniteError
from pyro_moe.inference.options import OPTIMIZERS, Objective, TrainingOptions
from pyro_moe.random_streams import RandomState
from pyro_moe.validation import check_integer, check_number

__all__ = ["OBJECTIVE_TERMS", "DifferentiableRenyiELBO", "KLWeight", "NonFiniteError", "SVIEngine", "make_elbo"]

OBJECTIVE_TERMS: dict[Objective, tuple[str, ...]] = {
    Objective.ELBO: ("loss", "kl", "nll"),
    Objective.IWAE: ("loss", "nll"),
}
"""The terms of a step's record each objective has (what the progress bar shows): the iwae bound has
no KL term (its record's ``kl`` is NaN)."""


class DifferentiableRenyiELBO(RenyiELBO):
    """Pyro's ``RenyiELBO`` with a ``differentiable_loss`` (for fully reparameterised guides).

    When every latent site is local (in the examples plate or in a token plate of the batch's
    tokens: per-token logits and temperatures), the examples are independent given their own
    latents and the bound is taken per example, as the IWAE of Burda et al. (2016) does:
    ``-s / (1 - alpha) * sum_i log mean_k w_ik^(1 - alpha)`` with ``log w_ik`` example ``i``'s
    ``(log p - log q) / s`` in particle ``k`` (its tokens summed) and ``s`` the data scale (the
    observation's scale: ``J`` for one of ``J`` batches in ``fit``, ``N / B`` for a random ``B`` of ``N``).
    With alpha = 0 each example's term bounds the log of its own Monte Carlo predictive.

    With a global latent site (router weights, layer temperatures, hierarchical prior scales) the
    particles are whole joint draws and the bound is Pyro's: ``-1 / (1 - alpha) * log mean_k
    w_k^(1 - alpha)`` over the minibatch's joint ``log w_k``. Data-parallel, this bound does not
    split over the ranks' shards: the ranks' shard terms of ``log w_k`` (sites in the examples or
    token plates) are all-reduced, weighted by their rows, and every rank evaluates the bound of the
    whole batch; its gradient flows through its own shard's terms (``data_parallel``, set by
    :class:`SVIEngine` while it steps, when every rank computes the loss).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_parallel: DataParallel | None = None

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any):
        joint_particles, example_particles, data_scale = [], [], None
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and not is_identically_zero(site["score_parts"].score_function):
                    raise ConfigurationError(f"iwae needs reparameterised guide sites; {name} is not.")
            per_example = _example_log_weights(model_trace, guide_trace)
            if per_example is None:
                joint_particles.append(_joint_log_weight(model_trace, guide_trace, self.data_parallel))
            else:
                data_scale = per_example[1]
                example_particles.append(per_example[0])
        vectorised = self.vectorize_particles and self.num_particles > 1
        if joint_particles:
            particles = joint_particles[0] if vectorised else torch.stack(joint_particles)
            log_weights = (1.0 - self.alpha) * particles
            log_mean_weight = torch.logsumexp(log_weights, dim=0) - math.log(self.num_particles)
            return -log_mean_weight.sum() / (1.0 - self.alpha)
        particles = example_particles[0] if vectorised else torch.cat(example_particles)  # (K, B)
        log_mean_weight = torch.logsumexp((1.0 - self.alpha) * particles, dim=0) - math.log(self.num_particles)
        return -data_scale * log_mean_weight.sum() / (1.0 - self.alpha)


def _sample_sites(model_trace: Any, guide_trace: Any) -> Iterator[tuple[dict, float]]:
    """The sample sites of both traces with the sign of their log-density in ``log w``."""
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                yield site, sign


def _in_data_plate(site: dict) -> bool:
    """Whether ``site`` lives in the examples or a token plate (dim -1): a term of one shard."""
    return any(frame.dim == -1 for frame in site["cond_indep_stack"])


def _joint_log_weight(model_trace: Any, guide_trace: Any, data_parallel: DataParallel | None = None) -> Tensor:
    """``log p - log q`` of the whole trace, ``(K,)`` (Pyro's ``RenyiELBO`` sum); data-parallel, the
    shard terms are those of the whole batch (see :class:`DifferentiableRenyiELBO`)."""
    sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
    shared, sharded = 0.0, 0.0
    for site, sign in _sample_sites(model_trace, guide_trace):
        term = sign * torch_sum(site["log_prob"], sum_dims)
        if _in_data_plate(site):
            sharded = sharded + term
        else:
            shared = shared + term
    if data_parallel is None:
        return shared + sharded
    return shared + _whole_batch_terms(model_trace, torch.as_tensor(shared), torch.as_tensor(sharded), data_parallel)


def _whole_batch_terms(model_trace: Any, shared: Tensor, sharded: Tensor, data_parallel: DataParallel) -> Tensor:
    """The shard terms of the whole batch, ``sum_r (B_r / B) t_r`` (each ``t_r`` at data scale
    ``n / B_r``, ``n`` the examples the batch stands for), with the gradient of this rank's own
    ``t_r``; refuses ranks whose global draws differ."""
    observed = [site for site in model_trace.nodes.values() if site["type"] == "sample" and site["is_observed"]]
    frames = [frame for site in observed for frame in site["cond_indep_stack"] if frame.dim == -1]
    if not frames:
        raise ConfigurationError("a data-parallel iwae needs the observations in an examples plate at dim -1.")
    rows = frames[0].size
    reduced = torch.cat([rows * sharded.detach().reshape(-1), sharded.new_full((1,), rows)]).double()
    extremes = torch.cat([shared.detach().reshape(-1), -shared.detach().reshape(-1)]).double()
    data_parallel.all_reduce_([reduced], "the all-reduce of the shards' importance weights")
    data_parallel.all_reduce_([extremes], "comparing the global draws across ranks", op="max")
    if not torch.allclose(extremes[: len(extremes) // 2], -extremes[len(extremes) // 2 :], rtol=1e-6, atol=1e-6):
        raise DistributedError(
            f"rank {data_parallel.rank}: the ranks drew different values of the global sites; the joint "
            "importance-weighted bound needs the same draws on every rank (pyro_moe.distributed.RankRandomness)."
        )
    whole = (reduced[:-1] / reduced[-1]).to(sharded.dtype).reshape(sharded.shape)
    return whole + sharded - sharded.detach()


def _example_log_weights(model_trace: Any, guide_trace: Any) -> tuple[Tensor, float] | None:
    """Per-example ``(log p - log q) / s`` ``(K, B)`` and the data scale ``s``, or ``None`` when a
    latent site is not local to the examples (then only the joint bound is valid)."""
    observed = [site for site in model_trace.nodes.values() if site["type"] == "sample" and site["is_observed"]]
    if len(observed) != 1 or not any(frame.dim == -1 for frame in observed[0]["cond_indep_stack"]):
        return None
    scale = observed[0]["scale"]
    scale = float(scale) if not isinstance(scale, Tensor) else float(scale.item()) if scale.numel() == 1 else None
    if scale is None:
        return None
    batch = observed[0]["log_prob"].shape[-1]
    log_weights = 0.0
    for site, sign in _sample_sites(model_trace, guide_trace):
        log_prob = site["log_prob"]
        local = any(frame.dim == -1 for frame in site["cond_indep_stack"])
        if not local or log_prob.dim() == 0 or log_prob.shape[-1] % batch:
            return None
        # tokens are flattened batch-major (batch x length): (..., B * L) -> (..., B)
        log_weights = log_weights + sign * log_prob.reshape(*log_prob.shape[:-1], batch, -1).sum(-1)
    return torch.atleast_2d(log_weights) / scale, scale


def make_elbo(objective: Objective | str, num_particles: int = 1, alpha: float = 0.0) -> ELBO:
    """The Pyro loss of ``objective`` with ``num_particles`` vectorised particles."""
    try:
        objective = Objective(objective)
    except ValueError:
        accepted = ", ".join(o.value for o in Objective)
        raise ConfigurationError(f"unknown objective {objective!r}; accepted: {accepted}.") from None
    check_integer("num_particles", num_particles)
    options = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    if objective is Objective.ELBO:
        return TraceMeanField_ELBO(**options)
    check_number("the iwae objective's alpha", alpha, inclusive=True, below=1.0)
    return DifferentiableRenyiELBO(alpha=alpha, **options)


class KLWeight(Messenger):
    """Scales the log-densities of all latent (unobserved) sample sites by ``beta``: under it, the
    ELBO becomes ``E[log p(y | z)] - beta KL``."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and self.beta != 1.0:
            msg["scale"] = msg["scale"] * self.beta


class _SiteRecorder(Messenger):
    """Records the names of the sample sites drawn under it (token plates left out), in order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def _pyro_post_sample(self, msg: dict) -> None:
        if not msg["name"].endswith(".tokens"):
            self.names.append(msg["name"])


def _finite(value: Tensor) -> bool:
    return bool(torch.isfinite(value).all())


class SVIEngine:
    """Stochastic variational inference on ``model`` and ``guide`` with Adam (or plain SGD).

    Args:
        model, guide: Pyro callables taking a batch's keyword arguments.
        options: the objective, particles, step size, optimiser, KL weight and its warm-up, clipping
            (:class:`~pyro_moe.inference.options.TrainingOptions`; ``steps`` and ``seed`` are the caller's).
        nll: returns the last call's mean negative log-likelihood per example (for reports).
        param_prefix: the prefix of this fit's parameter names, left out of saved states (so that a
            reload under another prefix finds them).
        data_parallel: step data-parallel (batches are this rank's shards, with ``input_ids``
            ``(B_r, length)``; see :mod:`pyro_moe.distributed`); ``None``: one process.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        options: TrainingOptions | None = None,
        *,
        nll: Callable[[], float] = lambda: math.nan,
        param_prefix: str = "",
        data_parallel: DataParallel | None = None,
    ) -> None:
        options = TrainingOptions() if options is None else options
        self.model, self.guide, self.nll, self.param_prefix = model, guide, nll, param_prefix
        self.data_parallel = data_parallel
        self.options = options
        self.elbo = make_elbo(options.objective, options.num_particles, options.alpha)
        self.objective = Objective(options.objective)
        self.kl_weight = KLWeight(options.beta)
        self.params: dict[str, Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.step_count = 0
        self.history: list[dict[str, float]] = []
        self.resume_rng_state: RandomState | None = None

    def beta_at(self, step: int) -> float:
        """The KL weight at ``step`` (0-based)."""
        beta, warm_up = self.options.beta, self.options.beta_anneal_steps
        return beta if warm_up == 0 else beta * min(1.0, (step + 1) / warm_up)

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        """The differentiable loss (negative objective) on ``batch`` at the current KL weight (this
        process's alone, also when data-parallel)."""
        with self.kl_weight:
            return self.elbo.differentiable_loss(self.model, self.guide, **batch)

    @contextmanager
    def _on_shard(self, whole_batch_bound: bool) -> Iterator[None]:
        """Data-parallel: global sites draw the same values on every rank, the rest from this rank's
        stream (:class:`RankRandomness`); with ``whole_batch_bound`` the joint iwae bound is that of
        the whole batch (collectives: every rank must compute its loss)."""
        if self.data_parallel is None:
            yield
            return
        if whole_batch_bound and isinstance(self.elbo, DifferentiableRenyiELBO):
            self.elbo.data_parallel = self.data_parallel
        try:
            with RankRandomness(self.data_parallel.rank, self.step_count):
                yield
        finally:
            if isinstance(self.elbo, DifferentiableRenyiELBO):
                self.elbo.data_parallel = None

    def _start(self, batch: Mapping[str, Any]) -> None:
        with poutine.trace(param_only=True) as capture, self._on_shard(whole_batch_bound=False):
            self.loss(batch)
        store = pyro.get_param_store()
        self.params = {name: store._params[name] for name in sorted(capture.trace.nodes)}
        if not self.params:
            raise ConfigurationError("the guide has no parameters to train.")
        if self.data_parallel is not None:  # every rank starts from rank 0's parameters, as DDP does
            values = [param.detach() for param in self.params.values()]
            self.data_parallel.check_same_layout(values, "guide parameters")
            self.data_parallel.broadcast_(values, "the broadcast of the initial guide parameters")
        optimizer = getattr(torch.optim, OPTIMIZERS[self.options.optimizer])
        self.optimizer = optimizer(list(self.params.values()), lr=self.options.lr)

    def _culprit(self, batch: Mapping[str, Any]) -> str:
        """Name the first site whose value or log-density is not finite."""
        with torch.no_grad():
            guide_trace = poutine.trace(self.guide).get_trace(**batch)
            model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(**batch)
        for role, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or name.endswith(".tokens"):
                    continue
                if not _finite(site["value"].float()):
                    return f"{role} site {name!r} (value)"
                if not _finite(site["fn"].log_prob(site["value"])):
                    return f"{role} site {name!r} (log-density)"
        return "no single site (the objective's combination overflowed)"

    def _failing_site(self, batch: Mapping[str, Any]) -> str:
        """Where a factorisation fails: in the guide or the model, after which of its sample sites
        (the failing one is being built, so it has no name yet)."""
        guide_trace = None
        for role in ("guide", "model"):
            recorder = _SiteRecorder()
            function = self.guide if role == "guide" else poutine.replay(self.model, trace=guide_trace)
            try:
                with torch.no_grad(), recorder:
                    trace = poutine.trace(function).get_trace(**batch)
            except torch.linalg.LinAlgError:
                return f"in the {role} " + (
                    f"after its site {recorder.names[-1]!r}" if recorder.names else "before its first site"
                )
            guide_trace = trace
        return "in neither the guide nor the model when traced again (a random draw)"

    def step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One optimisation step on ``batch``; returns and records ``step, loss, nll, kl, beta``."""
        if self.optimizer is None:
            self._start(batch)
        if self.resume_rng_state is not None:  # a resumed run continues the saved random streams
            self.resume_rng_state.restore()
            self.resume_rng_state = None
        self.kl_weight.beta = beta = self.beta_at(self.step_count)
        try:
            with self._on_shard(whole_batch_bound=True):
                loss = self.loss(batch)
        except NonFiniteError as error:
            reason = str(error).split("\n")[0]  # without the trace shapes Pyro appends
            message = f"at step {self.step_count}: {reason} The parameters keep their last finite values."
            raise NonFiniteError(message) from None
        except ValueError as error:
            if "invalid values" not in str(error):
                raise
            raise NonFiniteError(
                f"at step {self.step_count}: a distribution got non-finite parameters ({error}). "
                "The parameters keep their last finite values."
            ) from None
        except torch.linalg.LinAlgError as error:  # a Cholesky (or other factorisation) of a bad matrix
            reason = str(error).split("\n")[0]
            raise NonFiniteError(
                f"at step {self.step_count}: a factorisation failed {self._failing_site(batch)} ({reason}). "
                "The parameters keep their last finite values."
            ) from None
        finite = _finite(loss)
        if not finite and self.data_parallel is None:
            raise NonFiniteError(
                f"the loss is {loss.item()} at step {self.step_count}; culprit: {self._culprit(batch)}. "
                "The parameters keep their last finite values."
            )
        self.optimizer.zero_grad()
        if finite:
            loss.backward()
        loss_value, nll = loss.item(), self.nll()
        if self.data_parallel is not None:
            params, rows = list(self.params.values()), len(batch["input_ids"])
            average = self.data_parallel.average_gradients(params, rows, [loss_value, nll], not finite)
            if average.failed_ranks:
                self.optimizer.zero_grad()
                culprit = f"here: {self._culprit(batch)}" if not finite else "see that rank's error"
                raise NonFiniteError(
                    f"the loss is not finite on rank(s) {average.failed_ranks} at step {self.step_count}; culprit "
                    f"{culprit}. The parameters keep their last finite values."
                )
            loss_value, nll = average.values
        bad = [name for name, param in self.params.items() if param.grad is not None and not _finite(param.grad)]
        if bad:
            self.optimizer.zero_grad()
            raise NonFiniteError(
                f"non-finite gradients of {bad[:3]} at step {self.step_count}; culprit: {self._culprit(batch)}. "
                "The parameters keep their last finite values."
            )
        if self.options.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.options.clip_norm)
        self.optimizer.step()
        record = {"step": self.step_count, "loss": loss_value, "nll": nll, "beta": beta}
        batch_size = len(batch["input_ids"]) if "input_ids" in batch else 1
        scale = batch.get("num_examples") or batch_size
        record["kl"] = (loss_value - scale * nll) / beta if "kl" in OBJECTIVE_TERMS[self.objective] else math.nan
        self.history.append(record)
        self.step_count += 1
        return record

    def progress_terms(self, record: Mapping[str, float]) -> dict[str, str]:
        """The terms of ``record`` (from :meth:`step`) that this engine's objective has
        (:data:`OBJECTIVE_TERMS`), formatted for a progress bar's postfix."""
        return {name: f"{record[name]:.3g}" for name in OBJECTIVE_TERMS[self.objective]}

    def state_tensors(self) -> dict[str, Tensor]:
        """Parameters (unconstrained, by name: bit-exact on reload), optimiser state and RNG, as flat tensors."""
        tensors = {
            f"param/{name.removeprefix(self.param_prefix)}": value.detach() for name, value in self.params.items()
        }
        tensors.update(self.optimizer_tensors())
        tensors.update(RandomState.current().tensors())
        return tensors

    def optimizer_tensors(self) -> dict[str, Tensor]:
        """The optimiser's state (Adam's moments and step counts) as flat tensors ``optimizer/{index}/{key}``,
        ``index`` the position of the parameter in name order; detached, not copies. Empty before the first step."""
        tensors: dict[str, Tensor] = {}
        if self.optimizer is not None:
            for index, state in self.optimizer.state_dict()["state"].items():
                for key, value in state.items():
                    tensors[f"optimizer/{index}/{key}"] = torch.as_tensor(value).detach()
        return tensors

    def load_optimizer_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Set the optimiser's state to copies of :meth:`optimizer_tensors` (entries of other names are ignored);
        the optimiser must exist (after the first step or :meth:`load_state_tensors`)."""
        moments: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(("optimizer/", "adam/")):  # "adam/": checkpoints from before SGD
                _, index, field = key.split("/")
                moments.setdefault(int(index), {})[field] = value
        if not moments:
            return
        devices = [self.params[name].device for name in sorted(self.params)]
        state = self.optimizer.state_dict()
        state["state"] = {
            index: {k: v.clone() if k == "step" else v.to(devices[index], copy=True) for k, v in entries.items()}
            for index, entries in moments.items()
        }
        self.optimizer.load_state_dict(state)

    def load_state_tensors(self, tensors: Mapping[str, Tensor], batch: Mapping[str, Any]) -> None:
        """Restore :meth:`state_tensors` (the model and guide must be built as when saved)."""
        store = pyro.get_param_store()
        names = [self.param_prefix + key.removeprefix("param/") for key in tensors if key.startswith("param/")]
        with torch.no_grad():
            for name in names:
                if name not in store:
                    raise ConfigurationError(f"the checkpoint has parameter {name!r}, which the rebuilt guide lacks.")
                saved = tensors["param/" + name.removeprefix(self.param_prefix)]
                if saved.shape != store._params[name].shape:
                    raise ConfigurationError(
                        f"the checkpoint's parameter {name!r} has shape {tuple(saved.shape)}, the guide its "
                        f"configuration describes {tuple(store._params[name].shape)} (edited guide options?)."
                    )
                # in place: modules hold the very tensors the store holds (plain nn.Parameters of
                # autoguides are read from the module, not from the store)
                store._params[name].copy_(tensors["param/" + name.removeprefix(self.param_prefix)])
        self._start(batch)
        if set(self.params) != set(names):
            raise ConfigurationError(
                f"the checkpoint's parameters {sorted(names)[:5]} differ from the guide's {sorted(self.params)[:5]}."
            )
        self.load_optimizer_tensors(tensors)
        self.resume_rng_state = RandomState.from_tensors(dict(tensors))
