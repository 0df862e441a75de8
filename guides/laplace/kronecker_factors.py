"""Kronecker factors: sums of outer products accumulated batch by batch, kept full or as top-r eigenpairs.

A factor of dimension ``d`` collects ``sum_t w_t x_t x_t^T`` over the rows ``x_t`` of the batches it is
fed. :class:`FullFactor` keeps the ``d x d`` sum and decomposes it at the end (exact; for small ``d``).
:class:`LowRankFactor` keeps only the current top-``r`` eigenpairs ``Q diag(l) Q^T`` (``d x r`` plus
``r``) and folds each batch in with one thin SVD of ``[Q diag(l)^(1/2), X^T]``: memory ``O(d (r + n))``
for a batch of ``n`` rows, never a ``d x d`` matrix and never one matrix per row. With ``r >= d`` it is
exact. Both count the rows they saw and work in float64 on the rows' device.

Data-parallel, every rank feeds its own rows and :meth:`FullFactor.reduce` /
:meth:`LowRankFactor.reduce` combine the ranks' sums once: a full factor by an all-reduce, a
low-rank one by gathering the ranks' ``Q diag(l)^(1/2)`` and one more thin SVD (exact for
``r >= d``; otherwise the top ``r`` of the sum of the ranks' top-``r`` parts, the same kind of
truncation the streaming update makes).

Example::

    factor = LowRankFactor(dim=1408, rank=10)
    for rows in batches:                       # (n, 1408)
        factor.update(rows)
    eigen = factor.eigen()                     # EigenFactor: vectors (1408, 10), values (10,)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pyro_moe.distributed import DataParallel
from pyro_moe.validation import check_integer

__all__ = ["EigenFactor", "FullFactor", "LowRankFactor", "make_factor"]

FACTOR_DTYPE = torch.float64
"""Accumulation dtype of every factor (the sums of many outer products lose digits in float32)."""


@dataclass
class EigenFactor:
    """A positive semi-definite factor ``vectors diag(values) vectors^T``.

    Attributes:
        vectors: ``(dim, rank)`` orthonormal columns (zero columns where nothing was seen).
        values: ``(rank,)`` non-negative eigenvalues, largest first.
        count: number of rows accumulated.
    """

    vectors: Tensor
    values: Tensor
    count: int

    def dense(self) -> Tensor:
        """The ``(dim, dim)`` matrix."""
        return (self.vectors * self.values) @ self.vectors.T


def _top_eigenpairs(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top-``rank`` eigenpairs of the symmetric ``matrix``, largest first, negatives clipped to 0."""
    values, vectors = torch.linalg.eigh(matrix)
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    return vectors, values.clamp_min(0.0)


class FullFactor:
    """The exact ``(dim, dim)`` sum of outer products."""

    def __init__(self, dim: int) -> None:
        self.dim, self.count = dim, 0
        self.total: Tensor | None = None

    def update(self, rows: Tensor, scale: float = 1.0) -> None:
        """Add ``scale * sum_t x_t x_t^T`` for ``rows`` ``(n, dim)``."""
        rows = rows.detach().to(FACTOR_DTYPE)
        if self.total is None:
            self.total = torch.zeros(self.dim, self.dim, dtype=FACTOR_DTYPE, device=rows.device)
        self.total += scale * (rows.T @ rows)
        self.count += rows.shape[0]

    def eigen(self, device: torch.device | None = None) -> EigenFactor:
        """All ``dim`` eigenpairs (zeros when nothing was added)."""
        if self.total is None:
            return EigenFactor(
                torch.zeros(self.dim, self.dim, dtype=FACTOR_DTYPE, device=device),
                torch.zeros(self.dim, dtype=FACTOR_DTYPE, device=device),
                0,
            )
        vectors, values = _top_eigenpairs(self.total, self.dim)
        return EigenFactor(vectors, values, self.count)

    def reduce(self, data_parallel: DataParallel, device: torch.device) -> None:
        """Sum the ranks' factors and counts (every rank ends with the total; ``device``: where a
        factor that saw nothing makes its zeros)."""
        if self.total is None:
            self.total = torch.zeros(self.dim, self.dim, dtype=FACTOR_DTYPE, device=device)
        count = torch.tensor([self.count], dtype=FACTOR_DTYPE, device=self.total.device)
        data_parallel.all_reduce_([self.total, count], "the all-reduce of a Kronecker factor")
        self.count = int(count.item())


class LowRankFactor:
    """The top-``rank`` eigenpairs of the sum of outer products, updated batch by batch."""

    def __init__(self, dim: int, rank: int) -> None:
        check_integer("rank", rank)
        self.dim, self.rank, self.count = dim, min(rank, dim), 0
        self.vectors: Tensor | None = None  # (dim, rank)
        self.values: Tensor | None = None  # (rank,)

    def update(self, rows: Tensor, scale: float = 1.0) -> None:
        """Fold ``scale * sum_t x_t x_t^T`` (``rows`` ``(n, dim)``, ``scale >= 0``) into the kept
        eigenpairs with one thin SVD of ``(dim, rank + n)``."""
        rows = rows.detach().to(FACTOR_DTYPE)
        count = rows.shape[0]
        if scale != 1.0:
            rows = rows * scale**0.5
        columns = rows.T
        if self.vectors is not None:
            columns = torch.cat([self.vectors * self.values.sqrt(), columns], dim=1)
        left, singular, _ = torch.linalg.svd(columns, full_matrices=False)
        kept = min(self.rank, singular.shape[0])
        vectors = torch.zeros(self.dim, self.rank, dtype=FACTOR_DTYPE, device=rows.device)
        values = torch.zeros(self.rank, dtype=FACTOR_DTYPE, device=rows.device)
        vectors[:, :kept], values[:kept] = left[:, :kept], singular[:kept] ** 2
        self.vectors, self.values = vectors, values
        self.count += count

    def eigen(self, device: torch.device | None = None) -> EigenFactor:
        """The kept eigenpairs (zeros when nothing was added)."""
        if self.vectors is None:
            return EigenFactor(
                torch.zeros(self.dim, self.rank, dtype=FACTOR_DTYPE, device=device),
                torch.zeros(self.rank, dtype=FACTOR_DTYPE, device=device),
                0,
            )
        return EigenFactor(self.vectors.clone(), self.values.clone(), self.count)

    def reduce(self, data_parallel: DataParallel, device: torch.device) -> None:
        """Combine the ranks' kept eigenpairs: gather every rank's ``Q diag(l)^(1/2)`` ``(dim, rank)``
        and keep the top ``rank`` of their sum (every rank ends with the same factor)."""
        if self.vectors is None:
            self.vectors = torch.zeros(self.dim, self.rank, dtype=FACTOR_DTYPE, device=device)
            self.values = torch.zeros(self.rank, dtype=FACTOR_DTYPE, device=device)
        count = torch.tensor([self.count], dtype=FACTOR_DTYPE, device=self.vectors.device)
        data_parallel.all_reduce_([count], "the all-reduce of a Kronecker factor's row count")
        parts = data_parallel.all_gather(self.vectors * self.values.sqrt(), "the gathering of a low-rank factor")
        self.vectors, self.values, self.count = None, None, 0
        self.update(torch.cat(parts, dim=1).T)
        self.count = int(count.item())


def make_factor(dim: int, rank: int | None) -> FullFactor | LowRankFactor:
    """A full factor for ``rank=None``, else a streaming top-``rank`` one."""
    return FullFactor(dim) if rank is None else LowRankFactor(dim, rank)
