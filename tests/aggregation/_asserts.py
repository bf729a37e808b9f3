"""Assertions shared by the tests of aggregators and weightings.

Each helper states one property from the literature on Jacobian descent (or one contract of the
API), applies the aggregator (or weighting) to the given input, and fails with a message that
names the property. Tolerances are explicit: ``atol`` is absolute, ``rtol`` is relative to the
natural scale of the compared quantity (documented per helper), so that the same call works for
matrices with entries of order 1e-12 or 1e12.

Random aggregators (``Random``, ``GradDrop``, ``PCGrad``) do not satisfy the equalities below
call-to-call; helpers that call the aggregator several times reset the global seed (``seed``) before
each call so that they can still be used where the property holds for fixed random draws.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torchjd.aggregation import NonDifferentiableError

AggregatorLike = Callable[[Tensor], Tensor]


def _call(aggregator: AggregatorLike, matrix: Tensor, seed: int | None) -> Tensor:
    if seed is not None:
        torch.manual_seed(seed)
    return aggregator(matrix)


def _max_abs(tensor: Tensor) -> float:
    return tensor.abs().max().item() if tensor.numel() else 0.0


def assert_close(
    actual: Tensor,
    expected: Tensor,
    *,
    atol: float,
    rtol: float = 0.0,
    scale: float | None = None,
) -> None:
    """``|actual - expected| <= atol + rtol * scale`` entry-wise, shapes equal; ``scale``
    defaults to ``max|expected|``."""
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    expected = expected.to(actual.dtype)
    scale = _max_abs(expected) if scale is None else scale
    tolerance = atol + rtol * scale
    error = _max_abs(actual - expected)
    assert error <= tolerance, (
        f"max error {error:.3g} > tolerance {tolerance:.3g}\nactual={actual}\nexpected={expected}"
    )


def assert_non_conflicting(
    aggregator: AggregatorLike, matrix: Tensor, *, atol: float = 0.0, rtol: float = 1e-6
) -> None:
    """Non-conflicting: ``matrix @ A(matrix) >= -tol`` entry-wise (the result does not decrease
    any objective to first order), with ``tol = atol + rtol * ‖matrix‖_F²`` (the order of
    magnitude of ``matrix @ A(matrix)`` when the result combines the rows)."""
    result = aggregator(matrix)
    products = matrix @ result
    tolerance = atol + rtol * matrix.square().sum().item()
    worst = products.min().item() if products.numel() else 0.0
    assert worst >= -tolerance, (
        f"conflicting: min(J @ A(J)) = {worst:.3g} < -{tolerance:.3g}; J @ A(J) = {products}"
    )


def assert_permutation_invariant(
    aggregator: AggregatorLike,
    matrix: Tensor,
    *,
    n_permutations: int = 3,
    atol: float = 0.0,
    rtol: float = 1e-6,
    seed: int | None = None,
) -> None:
    """Permutation invariance: ``A(P @ matrix) == A(matrix)`` for random row permutations ``P``
    (``rtol`` is relative to ``max(max|A(matrix)|, max|matrix|)``). ``seed``: reset the global
    seed before each call."""
    expected = _call(aggregator, matrix, seed)
    generator = torch.Generator().manual_seed(0)
    for _ in range(n_permutations):
        permutation = torch.randperm(matrix.shape[0], generator=generator).to(matrix.device)
        actual = _call(aggregator, matrix[permutation], seed)
        scale = max(_max_abs(expected), _max_abs(matrix))
        assert_close(actual, expected, atol=atol, rtol=rtol, scale=scale)


def assert_weighting_permutation_equivariant(
    weighting: AggregatorLike,
    gramian: Tensor,
    *,
    n_permutations: int = 3,
    atol: float = 0.0,
    rtol: float = 1e-6,
    seed: int | None = None,
) -> None:
    """Permutation equivariance of a Gramian weighting: ``W(P G Pᵀ) == P W(G)`` (``rtol`` is
    relative to ``max|W(G)|``)."""
    weights = _call(weighting, gramian, seed)
    generator = torch.Generator().manual_seed(0)
    for _ in range(n_permutations):
        permutation = torch.randperm(gramian.shape[0], generator=generator).to(gramian.device)
        permuted = gramian[permutation][:, permutation]
        actual = _call(weighting, permuted, seed)
        assert_close(actual, weights[permutation], atol=atol, rtol=rtol)


def assert_linear_under_scaling(
    aggregator: AggregatorLike,
    matrix: Tensor,
    *,
    n_trials: int = 3,
    atol: float = 0.0,
    rtol: float = 1e-6,
    seed: int | None = None,
) -> None:
    """Linearity under scaling (Jacobian descent paper, Definition 3): ``c ↦ A(diag(c) @ matrix)``
    is linear on positive ``c``; checked as ``A(diag(a c1 + b c2) J) = a A(diag(c1) J) + b
    A(diag(c2) J)`` for random positive ``c1, c2, a, b`` (``rtol`` relative to the largest
    entry of the right-hand side or of the matrix)."""
    generator = torch.Generator().manual_seed(0)
    m = matrix.shape[0]

    def scaled(c: Tensor) -> Tensor:
        return _call(aggregator, c.to(matrix).unsqueeze(1) * matrix, seed)

    for _ in range(n_trials):
        c1 = torch.rand(m, generator=generator, dtype=torch.float64) + 0.1
        c2 = torch.rand(m, generator=generator, dtype=torch.float64) + 0.1
        a, b = (torch.rand(2, generator=generator, dtype=torch.float64) + 0.1).tolist()
        expected = a * scaled(c1) + b * scaled(c2)
        scale = max(_max_abs(expected), _max_abs(matrix))
        assert_close(scaled(a * c1 + b * c2), expected, atol=atol, rtol=rtol, scale=scale)


def assert_scale_equivariant(
    aggregator: AggregatorLike,
    matrix: Tensor,
    *,
    factors: tuple[float, ...] = (1e-3, 0.5, 7.0, 1e3),
    atol: float = 0.0,
    rtol: float = 1e-6,
    seed: int | None = None,
) -> None:
    """Positive homogeneity: ``A(c * matrix) == c * A(matrix)`` for every ``c`` in ``factors``
    (``rtol`` relative to ``c * max(max|A(matrix)|, max|matrix|)``)."""
    expected = _call(aggregator, matrix, seed)
    for factor in factors:
        actual = _call(aggregator, factor * matrix, seed)
        scale = factor * max(_max_abs(expected), _max_abs(matrix))
        assert_close(actual, factor * expected, atol=atol, rtol=rtol, scale=scale)


def assert_returns_row_for_single_row(
    aggregator: AggregatorLike, row: Tensor, *, atol: float = 0.0, rtol: float = 1e-6
) -> None:
    """A one-row matrix aggregates to its row (``row`` is 1-D; ``rtol`` relative to its max)."""
    assert row.ndim == 1
    assert_close(aggregator(row.unsqueeze(0)), row, atol=atol, rtol=rtol)


def assert_zero_for_zero_matrix(
    aggregator: AggregatorLike,
    m: int,
    n: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> None:
    """An all-zero ``m x n`` matrix aggregates to exactly zero (not NaN)."""
    result = aggregator(torch.zeros(m, n, dtype=dtype, device=device))
    assert result.shape == (n,)
    assert torch.equal(result, torch.zeros_like(result)), f"expected zeros, got {result}"


def assert_empty_columns(
    aggregator: AggregatorLike, m: int, *, dtype: torch.dtype = torch.float64
) -> None:
    """An ``m x 0`` matrix aggregates to an empty vector."""
    result = aggregator(torch.zeros(m, 0, dtype=dtype))
    assert result.shape == (0,)
    assert result.dtype == dtype


def assert_output_like_input(aggregator: AggregatorLike, matrix: Tensor) -> Tensor:
    """The result has shape ``[n]`` and the dtype and device of ``matrix``, and is finite.
    Returns it."""
    result = aggregator(matrix)
    assert result.shape == (matrix.shape[1],), f"shape {result.shape}"
    assert result.dtype == matrix.dtype, f"dtype {result.dtype} != {matrix.dtype}"
    assert result.device == matrix.device, f"device {result.device} != {matrix.device}"
    assert torch.isfinite(result).all(), f"non-finite result {result}"
    return result


def assert_weights_like_input(weighting: AggregatorLike, stat: Tensor) -> Tensor:
    """The weights have shape ``[m]`` and the dtype and device of ``stat``, and are finite.
    Returns them."""
    weights = weighting(stat)
    assert weights.shape == (stat.shape[0],), f"shape {weights.shape}"
    assert weights.dtype == stat.dtype, f"dtype {weights.dtype} != {stat.dtype}"
    assert weights.device == stat.device, f"device {weights.device} != {stat.device}"
    assert torch.isfinite(weights).all(), f"non-finite weights {weights}"
    return weights


def assert_in_simplex(weights: Tensor, *, atol: float = 1e-6) -> None:
    """The weights are non-negative and sum to one (up to ``atol``)."""
    assert weights.min().item() >= -atol, f"negative weight in {weights}"
    total = weights.sum().item()
    assert abs(total - 1.0) <= atol, f"weights sum to {total}, not 1"


def assert_non_differentiable(aggregator: AggregatorLike, matrix: Tensor) -> None:
    """The result looks differentiable but backpropagating through it raises
    :class:`NonDifferentiableError` naming the aggregator."""
    matrix = matrix.detach().clone().requires_grad_(True)
    result = aggregator(matrix)
    assert result.requires_grad
    try:
        result.sum().backward()
    except NonDifferentiableError as error:
        assert str(aggregator) in str(error)
    else:
        raise AssertionError(f"{aggregator} was differentiated through without error")


def assert_differentiable(aggregator: AggregatorLike, matrix: Tensor) -> Tensor:
    """Backpropagating through the result works and gives a finite gradient of the matrix's shape.
    Returns that gradient."""
    matrix = matrix.detach().clone().requires_grad_(True)
    result = aggregator(matrix)
    (gradient,) = torch.autograd.grad(result.sum(), matrix)
    assert gradient.shape == matrix.shape
    assert torch.isfinite(gradient).all(), f"non-finite gradient {gradient}"
    return gradient
