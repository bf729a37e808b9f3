from __future__ import annotations

import itertools

import pytest
import torch
from _asserts import (
    assert_close,
    assert_differentiable,
    assert_in_simplex,
    assert_permutation_invariant,
    assert_returns_row_for_single_row,
    assert_scale_equivariant,
    assert_zero_for_zero_matrix,
)
from _matrices import G_BASE, J_BASE, NONZERO_KINDS, SCALES, matrices, sample
from hypothesis import given, settings
from torch import Tensor

from torchjd.aggregation import MGDA, MGDAWeighting
from torchjd.aggregation._mgda import _frank_wolfe


def _min_norm_squared_brute_force(gramian: Tensor) -> float:
    """min over the simplex of αᵀGα, by solving the KKT system on every support."""
    # The problem is scale-invariant; solving it at unit trace keeps the KKT system well scaled.
    trace = gramian.trace().item()
    if trace == 0:
        return 0.0
    gramian = gramian / trace
    m = gramian.shape[0]
    best = float("inf")
    for size in range(1, m + 1):
        for support in itertools.combinations(range(m), size):
            index = torch.tensor(support)
            sub = gramian[index][:, index]
            kkt = torch.zeros(size + 1, size + 1, dtype=gramian.dtype)
            kkt[:size, :size] = 2 * sub
            kkt[:size, size] = 1
            kkt[size, :size] = 1
            rhs = torch.zeros(size + 1, 1, dtype=gramian.dtype)
            rhs[size] = 1
            alpha = torch.linalg.lstsq(kkt, rhs, driver="gelsd").solution[:size, 0]
            if alpha.min() < -1e-9 or abs(alpha.sum().item() - 1) > 1e-9:
                continue
            best = min(best, (alpha @ sub @ alpha).item())
    return best * trace


def test_reference_values() -> None:
    assert_close(MGDA()(J_BASE), torch.tensor([0.0, 1.0, 1.0]), atol=1e-4)
    assert_close(MGDAWeighting()(G_BASE), torch.tensor([0.6, 0.4]), atol=1e-4)
    assert_close(MGDA().weighting(J_BASE), torch.tensor([0.6, 0.4]), atol=1e-4)


def test_edge_cases() -> None:
    assert torch.equal(MGDAWeighting()(torch.zeros(3, 3)), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(MGDAWeighting()(torch.tensor([[4.0]])), torch.tensor([1.0]))
    assert_returns_row_for_single_row(MGDA(), torch.tensor([3.0, -1.0, 2.0]))
    assert_zero_for_zero_matrix(MGDA(), 4, 3)
    with pytest.raises(IndexError):
        MGDA()(torch.zeros(0, 3))


def test_repr_and_attributes() -> None:
    aggregator = MGDA(epsilon=0.01, max_iters=7)
    assert repr(aggregator) == "MGDA(epsilon=0.01, max_iters=7)"
    assert str(aggregator) == "MGDA"
    assert repr(MGDA()) == "MGDA(epsilon=0.001, max_iters=100)"
    weighting = aggregator.gramian_weighting
    assert isinstance(weighting, MGDAWeighting)
    assert (weighting.epsilon, weighting.max_iters) == (0.01, 7)
    assert repr(MGDAWeighting()) == "MGDAWeighting()"


def test_negative_max_iters_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_iters"):
        MGDAWeighting(max_iters=-1)


@pytest.mark.parametrize("m", [2, 3, 5, 16])
def test_device_loop_is_the_same_as_early_stopping(m: int) -> None:
    # The loop used off-CPU (all iterations, frozen after convergence) must give exactly the
    # result of the early-stopping loop; both are run on CPU here.
    for seed in range(5):
        matrix = sample("full", m, 4, seed=seed)
        gramian = matrix @ matrix.T
        for epsilon, max_iters in [(1e-3, 100), (0.1, 100), (1e-3, 3), (0.0, 50)]:
            early = _frank_wolfe(gramian, epsilon=epsilon, max_iters=max_iters, stop_on_host=True)
            masked = _frank_wolfe(gramian, epsilon=epsilon, max_iters=max_iters, stop_on_host=False)
            assert torch.equal(early, masked)


@settings(max_examples=40, deadline=None)
@given(matrices(min_rows=2, max_rows=2, max_cols=8, scales=SCALES))
def test_two_rows_exact_minimum_norm(matrix: Tensor) -> None:
    # On two rows the first Frank–Wolfe step already reaches the exact minimiser of the segment.
    g1, g2 = matrix
    difference = g1 - g2
    squared = difference @ difference
    alpha1 = 0.5 if squared == 0 else ((g2 - g1) @ g2 / squared).clamp(0, 1).item()
    expected = alpha1 * g1 + (1 - alpha1) * g2
    assert_close(MGDA()(matrix), expected, atol=0.0, rtol=1e-9, scale=matrix.abs().max().item())


@settings(max_examples=25, deadline=None)
@given(matrices(min_rows=1, max_rows=5, max_cols=6, scales=SCALES))
def test_close_to_brute_force_minimum_norm(matrix: Tensor) -> None:
    gramian = matrix @ matrix.T
    reference = _min_norm_squared_brute_force(gramian)
    scale = gramian.diagonal().max().item()
    for aggregator, relative_gap in [(MGDA(), 1e-2), (MGDA(epsilon=0.0, max_iters=1000), 2e-3)]:
        weights = aggregator.weighting(matrix)
        assert_in_simplex(weights, atol=1e-9)
        value = (weights @ gramian @ weights).item()
        # Frank–Wolfe stays above the minimum and gets close to it.
        assert value >= reference - 1e-9 * scale
        assert value <= reference + relative_gap * scale


@settings(max_examples=12, deadline=None)
@given(matrices(min_rows=1, max_rows=64, max_cols=32, kinds=NONZERO_KINDS, scales=SCALES))
def test_properties_on_many_rows(matrix: Tensor) -> None:
    gramian = matrix @ matrix.T
    weights = MGDAWeighting()(gramian)
    assert_in_simplex(weights, atol=1e-9)
    # Frank–Wolfe with exact line search never increases the objective.
    m = matrix.shape[0]
    uniform = torch.full((m,), 1 / m, dtype=matrix.dtype)
    scale = gramian.diagonal().max().item()
    assert (weights @ gramian @ weights).item() <= (uniform @ gramian @ uniform).item() + (
        1e-12 * scale
    )
    assert_scale_equivariant(MGDA(), matrix, factors=(1e-3, 1e3), rtol=1e-9)


@settings(max_examples=10, deadline=None)
@given(matrices(min_rows=2, max_rows=12, max_cols=8, kinds=("full", "non_conflicting")))
def test_permutation_invariant(matrix: Tensor) -> None:
    # Exact ties of argmin are the only source of non-invariance; random matrices have none, but
    # convergence may stop at a slightly different iterate, hence the tolerance.
    aggregator = MGDA(epsilon=0.0, max_iters=200)
    result = aggregator(matrix)
    assert_permutation_invariant(
        aggregator,
        matrix,
        n_permutations=2,
        atol=1e-3 * result.norm().item() + 1e-3 * matrix.abs().max().item(),
    )


def test_differentiable_and_weights_carry_history() -> None:
    matrix = sample("full", 4, 5, seed=1)
    assert_differentiable(MGDA(), matrix)
    gramian = (matrix @ matrix.T).requires_grad_(True)
    assert MGDAWeighting()(gramian).requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    result = MGDA()(J_BASE.to(dtype))
    assert result.dtype == dtype
    assert_close(result.double(), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), atol=2e-2)
    weights = MGDAWeighting()(G_BASE.to(dtype))
    assert weights.dtype == dtype
    assert_close(weights.double(), torch.tensor([0.6, 0.4], dtype=torch.float64), atol=2e-2)


def test_kinds_of_matrices_give_weights_in_simplex() -> None:
    for kind in NONZERO_KINDS:
        matrix = sample(kind, 6, 4, seed=3)
        assert_in_simplex(MGDA().weighting(matrix), atol=1e-9)


def test_random_draws_are_not_used() -> None:
    state = torch.get_rng_state()
    MGDA()(sample("full", 5, 3))
    assert torch.equal(torch.get_rng_state(), state)


def test_known_minimum_norm_point() -> None:
    matrix = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    result = MGDA(epsilon=0.0, max_iters=1000)(matrix)
    assert_close(result, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-3)
