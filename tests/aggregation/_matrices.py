"""Samplers of test matrices (Jacobians) with controlled shape, rank, duplicated rows and scale.

Every sampler is deterministic given its ``seed`` (it uses its own CPU generator, never the global
one, so it does not disturb the random draws of the aggregators under test) and returns a tensor of
the requested ``dtype`` on the requested ``device``.

Typical use::

    from _matrices import SCALES, matrices, sample_matrix

    matrix = sample_matrix(5, 7, rank=2, scale=1e6, seed=3)

    @given(matrices(max_rows=16, kinds=("full", "low_rank"), scales=SCALES))
    def test_something(matrix): ...

Kinds of matrices (``MatrixKind``):

* ``"full"``: full rank ``min(m, n)``;
* ``"low_rank"``: rank ``max(1, min(m, n) // 2)``;
* ``"rank_one"``: all rows proportional to one vector (with signs, so rows conflict);
* ``"zero"``: all entries zero;
* ``"duplicated"``: about half of the rows are copies of other rows;
* ``"non_conflicting"``: all pairwise inner products of rows are non-negative.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from hypothesis import strategies as st
from torch import Tensor

MatrixKind = Literal["full", "low_rank", "rank_one", "zero", "duplicated", "non_conflicting"]
ALL_KINDS: tuple[MatrixKind, ...] = get_args(MatrixKind)
NONZERO_KINDS: tuple[MatrixKind, ...] = tuple(kind for kind in ALL_KINDS if kind != "zero")

#: Orders of magnitude of the entries that float64 computations should withstand.
SCALES: tuple[float, ...] = (1e-12, 1e-6, 1.0, 1e6, 1e12)

#: The matrix of the spec's reference values, and its Gramian ``[[18, -22], [-22, 38]]``.
J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
G_BASE = J_BASE @ J_BASE.T


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _finish(matrix: Tensor, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    return matrix.to(dtype=dtype, device=device)


def sample_matrix(
    m: int,
    n: int,
    *,
    rank: int | None = None,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Return a random ``m x n`` matrix of rank exactly ``rank`` (almost surely).

    The matrix is ``U V`` with standard normal factors ``U`` (``m x rank``) and ``V``
    (``rank x n``), normalised so that the entries are of the order of ``scale``.

    :param rank: The rank, between 0 and ``min(m, n)``; ``None`` means full rank.
    :param scale: The order of magnitude of the entries.
    """
    full_rank = min(m, n)
    rank = full_rank if rank is None else rank
    if not 0 <= rank <= full_rank:
        raise ValueError(f"`rank` should be in [0, {full_rank}] for a {m}x{n} matrix, got {rank}.")
    if rank == 0:
        return torch.zeros(m, n, dtype=dtype, device=device)
    generator = _generator(seed)
    left = torch.randn(m, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, n, generator=generator, dtype=torch.float64)
    return _finish(left @ right * (scale / math.sqrt(rank)), dtype, device)


def sample_rank_one(
    m: int,
    n: int,
    *,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Return an ``m x n`` matrix whose rows are multiples (of both signs) of one vector."""
    return sample_matrix(
        m, n, rank=min(1, m, n), scale=scale, seed=seed, dtype=dtype, device=device
    )


def sample_with_duplicated_rows(
    m: int,
    n: int,
    *,
    n_distinct: int | None = None,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Return an ``m x n`` matrix made of ``n_distinct`` distinct random rows, each used at least
    once, the others being exact copies of them, in random order.

    :param n_distinct: The number of distinct rows; ``None`` means ``ceil(m / 2)``.
    """
    n_distinct = math.ceil(m / 2) if n_distinct is None else n_distinct
    if m > 0 and not 1 <= n_distinct <= m:
        raise ValueError(f"`n_distinct` should be in [1, {m}], got {n_distinct}.")
    generator = _generator(seed)
    distinct = torch.randn(n_distinct, n, generator=generator, dtype=torch.float64) * scale
    extra = torch.randint(0, max(n_distinct, 1), (m - n_distinct,), generator=generator)
    sources = torch.cat([torch.arange(n_distinct), extra])
    order = torch.randperm(m, generator=generator)
    return _finish(distinct[sources[order]], dtype, device)


def sample_non_conflicting(
    m: int,
    n: int,
    *,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Return an ``m x n`` matrix whose rows have pairwise non-negative inner products.

    The rows are non-negative vectors, rotated by one random orthogonal matrix.
    """
    generator = _generator(seed)
    non_negative = torch.randn(m, n, generator=generator, dtype=torch.float64).abs() * scale
    rotation, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return _finish(non_negative @ rotation, dtype, device)


def sample(
    kind: MatrixKind,
    m: int,
    n: int,
    *,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Return a matrix of the given ``kind`` (see the module docstring)."""
    if kind == "zero":
        return torch.zeros(m, n, dtype=dtype, device=device)
    if kind == "full":
        return sample_matrix(m, n, scale=scale, seed=seed, dtype=dtype, device=device)
    if kind == "low_rank":
        rank = max(1, min(m, n) // 2) if min(m, n) > 0 else 0
        return sample_matrix(m, n, rank=rank, scale=scale, seed=seed, dtype=dtype, device=device)
    if kind == "rank_one":
        return sample_rank_one(m, n, scale=scale, seed=seed, dtype=dtype, device=device)
    if kind == "duplicated":
        return sample_with_duplicated_rows(m, n, scale=scale, seed=seed, dtype=dtype, device=device)
    if kind == "non_conflicting":
        return sample_non_conflicting(m, n, scale=scale, seed=seed, dtype=dtype, device=device)
    raise ValueError(f"Unknown matrix kind {kind!r}; expected one of {ALL_KINDS}.")


@st.composite
def matrices(
    draw: st.DrawFn,
    *,
    min_rows: int = 1,
    max_rows: int = 64,
    min_cols: int = 1,
    max_cols: int = 64,
    kinds: tuple[MatrixKind, ...] = NONZERO_KINDS,
    scales: tuple[float, ...] = (1.0,),
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Hypothesis strategy of matrices: draws a shape, a kind, a scale and a seed, then samples.

    Shrinking goes towards few rows and columns, the first kind and the first scale.
    """
    m = draw(st.integers(min_rows, max_rows), label="m")
    n = draw(st.integers(min_cols, max_cols), label="n")
    kind = draw(st.sampled_from(kinds), label="kind")
    scale = draw(st.sampled_from(scales), label="scale")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    return sample(kind, m, n, scale=scale, seed=seed, dtype=dtype)


def gramian(matrix: Tensor) -> Tensor:
    """Return the Gramian ``matrix @ matrix.T`` of the rows of ``matrix``."""
    return matrix @ matrix.T


def generalized_gramian(jacobian: Tensor) -> Tensor:
    """Return the generalized Gramian of a Jacobian of shape ``[m_1, ..., m_k, n]``.

    Its shape is ``[m_1, ..., m_k, m_k, ..., m_1]`` (the layout of ``Engine.compute_gramian``):
    entry ``[i_1, ..., i_k, j_k, ..., j_1]`` is the inner product of the rows ``[i_1, ..., i_k]``
    and ``[j_1, ..., j_k]``.
    """
    shape = jacobian.shape[:-1]
    k = len(shape)
    flat = jacobian.reshape(-1, jacobian.shape[-1])
    square = (flat @ flat.T).reshape(tuple(shape) + tuple(shape))
    return square.permute([*range(k), *reversed(range(k, 2 * k))])


def random_permutation(m: int, seed: int = 0) -> Tensor:
    """Return a random permutation of ``range(m)`` drawn from a private generator."""
    return torch.randperm(m, generator=_generator(seed))
