"""Data parallelism over ``torch.distributed``: the process group, shards, reductions and the random
streams of one SVI step.

Launch a fit with ``torchrun --nproc_per_node=N`` (or ``accelerate launch``): every process loads
the model and all the data, and :func:`pyro_moe.fit` finds the process group and runs data-parallel.

* **SVI**: every global batch of ``B`` rows is cut into contiguous shards, one per rank
  (:meth:`DataParallel.shard_rows`). A rank's loss is the usual minibatch estimate on its ``B_r``
  rows (data scale ``n / B_r``, ``n`` the examples the global batch stands for: ``J B`` in ``fit``);
  the gradients are averaged with weights ``B_r / B``. The ELBO is
  linear in the examples given the global draws, so this is exactly the gradient of the
  single-process loss on the whole batch. Global latent sites (router weights, layer temperatures)
  draw the same values on every rank; per-token sites and dropout draw from the rank's own stream
  (:class:`RankRandomness`).
* **Curvature**: batches are dealt round-robin (:meth:`DataParallel.shard_batches`), every rank
  accumulates its sums and they are reduced once (:meth:`DataParallel.all_reduce_`).
* **Failures**: every collective names what it was doing; a rank that died or hung makes the others
  raise :class:`~pyro_moe.errors.DistributedError` within the process group's timeout, after
  tearing the process group down (so that the process can end cleanly).

Example (``torchrun --nproc_per_node=2 train.py``)::

    init_distributed(timeout=600)           # from torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    posterior = pyro_moe.fit(patch, batches, "mean-field", answer_token_ids=ids)   # data-parallel
    posterior.save("runs/fit")              # rank 0 writes, the others return at once
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger
from torch import Tensor

from pyro_moe.errors import ConfigurationError, DistributedError
from pyro_moe.random_streams import RandomState
from pyro_moe.validation import check_number

__all__ = [
    "DEFAULT_TIMEOUT",
    "DataParallel",
    "GradientAverage",
    "RankRandomness",
    "data_parallel",
    "init_distributed",
]

DEFAULT_TIMEOUT = 1800.0
"""Seconds a collective waits for the other processes before it fails (torch's own default)."""

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""The environment a launcher (torchrun, accelerate launch) sets for every process."""

Item = TypeVar("Item")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


@dataclass(frozen=True)
class GradientAverage:
    """What :meth:`DataParallel.average_gradients` returns besides the averaged gradients.

    Attributes:
        values: the ``values`` of every rank, averaged with weights ``B_r / B``.
        failed_ranks: ranks whose loss was not finite (then no gradient was reduced).
    """

    values: list[float]
    failed_ranks: list[int]


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run.

    Attributes:
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of processes (at least 2).
        timeout: seconds a collective waits (for error messages).
    """

    rank: int
    world_size: int
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes checkpoints, logs and reports."""
        return self.rank == 0

    # ------------------------------------------------------------------------------------ shards

    def check_batch_sizes(self, sizes: Sequence[int]) -> None:
        """Refuse global batches with fewer rows than processes (a rank would have nothing to do)."""
        small = [index for index, size in enumerate(sizes) if size < self.world_size]
        if small:
            raise ConfigurationError(
                f"batch {small[0]} has {sizes[small[0]]} rows, fewer than the {self.world_size} processes; "
                f"every global batch needs at least one row per process (raise the batch size)."
            )

    def row_range(self, size: int) -> tuple[int, int]:
        """This rank's contiguous ``[start, stop)`` of ``size`` rows (the first ``size % world_size``
        ranks take one row more)."""
        base, extra = divmod(size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def shard_rows(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """This rank's rows of a global ``batch``: every tensor whose first dimension is the batch's
        (that of ``input_ids``) is sliced, everything else (``num_examples``) is kept."""
        size = len(batch["input_ids"])
        start, stop = self.row_range(size)
        return {
            key: value[start:stop] if isinstance(value, Tensor) and value.dim() and len(value) == size else value
            for key, value in batch.items()
        }

    def shard_batches(self, items: Sequence[Item]) -> list[tuple[int, Item]]:
        """This rank's ``(index, item)`` pairs of ``items``, dealt round-robin."""
        return [(index, items[index]) for index in range(self.rank, len(items), self.world_size)]

    # ------------------------------------------------------------------------------ collectives

    def _collective(self, what: str, operation: Callable[[], Any]) -> Any:
        """Run a collective; a failure tears the process group down (it cannot be used after a failed
        collective, and a process that ends with it pending aborts) and raises :class:`DistributedError`."""
        try:
            return operation()
        except RuntimeError as error:
            if dist.is_initialized():
                dist.destroy_process_group()
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed: another process died, failed or did not "
                f"answer within the timeout of {self.timeout:g} s ({_one_line(error)})."
            ) from error

    def all_reduce_(self, tensors: Sequence[Tensor], what: str, op: str = "sum") -> None:
        """Sum (``op="sum"``) or maximum (``op="max"``) of ``tensors`` over the ranks, in place; one
        collective per device and dtype (the tensors are flattened into one buffer each)."""
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for tensor in tensors:
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        for members in groups.values():
            flat = torch.cat([tensor.reshape(-1) for tensor in members])
            self._collective(what, lambda flat=flat: dist.all_reduce(flat, op=reduce_op))
            offset = 0
            for tensor in members:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def all_gather(self, tensor: Tensor, what: str) -> list[Tensor]:
        """``tensor`` of every rank (all of the same shape), in rank order."""
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(gathered, tensor.contiguous()))
        return gathered

    def broadcast_(self, tensors: Sequence[Tensor], what: str) -> None:
        """Overwrite ``tensors`` in place with rank 0's."""
        for tensor in tensors:
            self._collective(what, lambda tensor=tensor: dist.broadcast(tensor, src=0))

    def check_same_layout(self, tensors: Sequence[Tensor], what: str) -> None:
        """Refuse to go on unless every rank holds tensors of the same count and sizes."""
        sizes = [len(tensors), sum(tensor.numel() for tensor in tensors)]
        for tensor in tensors:
            sizes.extend(tensor.shape)
        signature = torch.tensor(
            [len(sizes), int.from_bytes(hashlib.blake2b(str(sizes).encode(), digest_size=6).digest(), "little")]
        )
        extremes = torch.cat([signature, -signature])
        self.all_reduce_([extremes], f"comparing {what} across ranks", op="max")
        if not torch.equal(extremes[:2], -extremes[2:]):
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: the ranks hold different {what} ({len(tensors)} tensors, "
                f"{sizes[1]} numbers here); every process must build the same model, sites and guide."
            )

    def average_gradients(self, params: Sequence[Tensor], weight: int, values: Sequence[float], failed: bool):
        """Replace every parameter's gradient by the average over the ranks, weighted by the ranks'
        ``weight`` (their number of rows ``B_r``): ``sum_r B_r g_r / sum_r B_r``.

        A parameter without a gradient on every rank keeps none (as in one process). ``values``
        (the loss and the NLL) are averaged with the same weights. When a rank reports ``failed``
        (a non-finite loss), no gradient is reduced and every rank learns which ranks failed.

        Returns:
            :class:`GradientAverage`.
        """
        scalars = torch.zeros(1 + len(values) + self.world_size + len(params), dtype=torch.float64)
        scalars[0] = weight
        scalars[1 : 1 + len(values)] = weight * torch.tensor(values, dtype=torch.float64)
        flags = 1 + len(values)
        scalars[flags + self.rank] = float(failed)
        scalars[flags + self.world_size :] = torch.tensor([param.grad is not None for param in params])
        scalars = torch.nan_to_num(scalars)
        self.all_reduce_([scalars], "the all-reduce of the step's weights and losses")
        total = float(scalars[0])
        averaged = (scalars[1 : 1 + len(values)] / total).tolist()
        failed_ranks = torch.nonzero(scalars[flags : flags + self.world_size]).flatten().tolist()
        if failed_ranks:
            return GradientAverage(averaged, failed_ranks)
        with_grad = [param for param, flag in zip(params, scalars[flags + self.world_size :], strict=True) if flag]
        gradients = []
        for param in with_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            gradients.append(param.grad.mul_(weight / total))
        self.all_reduce_(gradients, "the all-reduce of the guide's gradients")
        return GradientAverage(averaged, [])


def data_parallel(enabled: bool | None = None) -> DataParallel | None:
    """The current data-parallel run, or ``None`` for one process.

    Args:
        enabled: ``None``: data-parallel when a process group of two or more processes is
            initialised (see :func:`init_distributed`); ``False``: never; ``True``: such a group must exist.
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise ConfigurationError(f"distributed must be None (automatic), True or False, got {enabled!r}.")
    running = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if enabled and not running:
        raise ConfigurationError(
            "distributed=True needs an initialised process group of two or more processes: launch with "
            "torchrun --nproc_per_node=N and call pyro_moe.distributed.init_distributed() first."
        )
    if not running or enabled is False:
        return None
    return DataParallel(dist.get_rank(), dist.get_world_size(), _TIMEOUT.get("seconds", DEFAULT_TIMEOUT))


_TIMEOUT: dict[str, float] = {}


def init_distributed(timeout: float = DEFAULT_TIMEOUT) -> DataParallel | None:
    """Join the process group a launcher describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, as torchrun and accelerate set them); ``None`` for one process.

    The backend is gloo for CPU tensors, with NCCL for CUDA tensors when CUDA is there (then each
    process takes the GPU ``LOCAL_RANK``). Collectives fail after ``timeout`` seconds.
    """
    check_number("timeout", timeout)  # seconds
    if dist.is_available() and dist.is_initialized():
        return data_parallel()
    world_size = os.environ.get("WORLD_SIZE", "1")
    if not world_size.isdigit():
        raise ConfigurationError(f"WORLD_SIZE must be a positive integer, got {world_size!r}.")
    if int(world_size) <= 1:
        return None
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigurationError(
            f"WORLD_SIZE is {world_size} but {', '.join(missing)} not set; launch with torchrun or accelerate launch."
        )
    if not dist.is_available():
        raise ConfigurationError("this torch build has no torch.distributed; data-parallel fits need it.")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    _TIMEOUT["seconds"] = float(timeout)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except RuntimeError as error:
        raise DistributedError(
            f"rank {os.environ['RANK']} of {world_size}: joining the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} failed ({_one_line(error)})."
        ) from error
    return data_parallel()


class RankRandomness(Messenger):
    """Inside one SVI step of a data-parallel run: global latent sites (in no plate at dim -1) draw
    from the random stream every rank shares, so all ranks draw the same values; everything else
    (per-token sites, which live in the token plate at dim -1, and dropout) draws from this rank's
    own stream, seeded from the shared state, the rank and the step.

    On exit the shared stream continues where the global draws left it, whatever the rank's shard
    size was, so the ranks stay in step (and a checkpoint's random state is the same on all).
    """

    def __init__(self, rank: int, step: int) -> None:
        super().__init__()
        self.rank, self.step = rank, step
        self._shared: RandomState | None = None
        self._own: RandomState | None = None

    @staticmethod
    def _is_global_draw(msg: dict) -> bool:
        return (
            msg["type"] == "sample"
            and not msg["is_observed"]
            and not any(frame.dim == -1 for frame in msg["cond_indep_stack"])
        )

    def __enter__(self) -> RankRandomness:
        self._shared = RandomState.current()
        digest = hashlib.blake2b(digest_size=8)
        for state in self._shared.tensors().values():
            digest.update(state.numpy().tobytes())
        digest.update(f"rank {self.rank} step {self.step}".encode())
        torch.manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._shared.restore()
        return super().__exit__(*exc)

    def _process_message(self, msg: dict) -> None:
        if self._is_global_draw(msg):
            self._own = RandomState.current()
            self._shared.restore()

    def _postprocess_message(self, msg: dict) -> None:
        if self._is_global_draw(msg):
            self._shared = RandomState.current()
            self._own.restore()
