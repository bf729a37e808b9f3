from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from _asserts import assert_close
from _matrices import G_BASE, J_BASE
from torch import Tensor, nn

from torchjd.aggregation import (
    MGDA,
    Aggregator,
    ConFIG,
    GeneralizedWeighting,
    GradDrop,
    Mean,
    MeanWeighting,
    MGDAWeighting,
    NonDifferentiableError,
    PCGrad,
    Sum,
    SumWeighting,
    Weighting,
)
from torchjd.aggregation._aggregator_bases import GramianWeightedAggregator, WeightedAggregator
from torchjd.aggregation._weighting_bases import _Composition


class _FirstRow(Aggregator):
    def forward(self, matrix: Tensor, /) -> Tensor:
        self._check_is_matrix(matrix)
        return matrix[0]


class _Diagonal(Weighting[Tensor]):
    def forward(self, stat: Tensor, /) -> Tensor:
        return stat.diagonal()


class _SumOfRows(GeneralizedWeighting):
    def forward(self, generalized_gramian: Tensor, /) -> Tensor:
        return generalized_gramian.sum(dim=-1)


def test_abstract_bases_cannot_be_instantiated() -> None:
    for base in (Aggregator, Weighting, GeneralizedWeighting):
        with pytest.raises(TypeError):
            base()  # type: ignore[abstract]


def test_minimal_aggregator() -> None:
    aggregator = _FirstRow()
    assert torch.equal(aggregator(J_BASE), J_BASE[0])
    assert repr(aggregator) == "_FirstRow()"
    assert str(aggregator) == "_FirstRow"
    assert isinstance(aggregator, nn.Module)
    assert list(aggregator.parameters()) == []
    assert list(aggregator.buffers()) == []


def test_check_is_matrix_message() -> None:
    for shape in [(3,), (2, 3, 4), ()]:
        expected = (
            "Parameter `matrix` should be a tensor of dimension 2. Found `matrix.shape = "
            f"{torch.Size(shape)}`."
        )
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
            Aggregator._check_is_matrix(torch.zeros(shape))
    Aggregator._check_is_matrix(torch.zeros(0, 0))


def test_weighting_is_generic_and_composable() -> None:
    assert Weighting[Tensor] is not None
    weighting = _Diagonal()
    composed = weighting << (lambda matrix: matrix @ matrix.T)
    assert isinstance(composed, _Composition)
    assert isinstance(composed, Weighting)
    assert composed.weighting is weighting
    assert torch.equal(composed(J_BASE), torch.tensor([18.0, 38.0]))
    # Compositions compose: (w << f) << g is w(f(g(x))).
    twice = composed << (lambda matrix: 2 * matrix)
    assert torch.equal(twice(J_BASE), torch.tensor([72.0, 152.0]))
    assert repr(composed) == "_Composition(\n  (weighting): _Diagonal()\n)"


def test_generalized_weighting_subclass() -> None:
    weights = _SumOfRows()(torch.ones(2, 3, 3, 2))
    assert weights.shape == (2, 3, 3)


def test_weighted_aggregator_combines_rows() -> None:
    weights = torch.tensor([1.0, -2.0])
    assert torch.equal(WeightedAggregator.combine(J_BASE, weights), weights @ J_BASE)
    aggregator = WeightedAggregator(SumWeighting())
    assert torch.equal(aggregator(J_BASE), J_BASE.sum(dim=0))
    with pytest.raises(ValueError, match="dimension 2"):
        aggregator(torch.ones(3))


def test_gramian_weighted_aggregator_structure() -> None:
    aggregator = MGDA()
    assert isinstance(aggregator, GramianWeightedAggregator)
    assert isinstance(aggregator.weighting, _Composition)
    assert isinstance(aggregator.gramian_weighting, MGDAWeighting)
    assert repr(aggregator.weighting) == "_Composition(\n  (weighting): MGDAWeighting()\n)"
    assert_close(aggregator.weighting(J_BASE), aggregator.gramian_weighting(G_BASE), atol=1e-6)
    assert_close(aggregator(J_BASE), aggregator.weighting(J_BASE) @ J_BASE, atol=1e-6)


def test_gramian_of_low_precision_matrices_is_computed_in_float32() -> None:
    seen: list[torch.dtype] = []
    aggregator = GramianWeightedAggregator(MeanWeighting())
    aggregator.gramian_weighting.register_forward_hook(
        lambda _module, inputs, _output: seen.append(inputs[0].dtype)
    )
    result = aggregator(J_BASE.half())
    assert seen == [torch.float32]
    assert result.dtype == torch.float16


def test_monitoring_hook_on_weighting_receives_the_matrix_and_the_weights() -> None:
    calls: list[tuple[Any, ...]] = []
    aggregator = MGDA()
    aggregator.weighting.register_forward_hook(
        lambda module, inputs, output: calls.append((module, inputs, output))
    )
    result = aggregator(J_BASE)
    ((module, inputs, weights),) = calls
    assert module is aggregator.weighting
    assert len(inputs) == 1 and inputs[0] is J_BASE
    assert_close(weights, torch.tensor([0.6, 0.4]), atol=1e-4)
    assert_close(result, weights @ J_BASE, atol=1e-6)


def test_monitoring_hooks_on_aggregator() -> None:
    pre_calls: list[Tensor] = []
    calls: list[tuple[Tensor, Tensor]] = []
    aggregator = Mean()
    aggregator.register_forward_pre_hook(lambda _module, inputs: pre_calls.append(inputs[0]))
    aggregator.register_forward_hook(
        lambda _module, inputs, output: calls.append((inputs[0], output))
    )
    result = aggregator(J_BASE)
    assert len(pre_calls) == 1 and pre_calls[0] is J_BASE
    ((matrix, output),) = calls
    assert matrix is J_BASE and output is result
    # The cosine similarity of the monitoring example.
    similarity = nn.functional.cosine_similarity(output, matrix.mean(dim=0), dim=0)
    assert_close(similarity, torch.tensor(1.0), atol=1e-6)


def test_backward_hook_on_differentiable_aggregator() -> None:
    grads: list[Any] = []
    aggregator = Sum()
    aggregator.register_full_backward_hook(
        lambda _module, grad_input, _grad_output: grads.append(grad_input)
    )
    matrix = J_BASE.clone().requires_grad_(True)
    aggregator(matrix).sum().backward()
    assert len(grads) == 1
    assert matrix.grad is not None
    assert torch.equal(matrix.grad, torch.ones(2, 3))


@pytest.mark.parametrize(
    ("aggregator", "text"),
    [
        (ConFIG(), "ConFIG"),
        (ConFIG(torch.tensor([1.0, 2.0])), "ConFIG([1., 2.])"),
        (PCGrad(), "PCGrad"),
        (GradDrop(), "GradDrop"),
    ],
)
def test_non_differentiable_error(aggregator: Aggregator, text: str) -> None:
    assert issubclass(NonDifferentiableError, RuntimeError)
    matrix = J_BASE.clone().requires_grad_(True)
    result = aggregator(matrix)
    assert result.requires_grad
    expected = f"Trying to differentiate through {text}, which is not differentiable."
    with pytest.raises(NonDifferentiableError, match=f"^{re.escape(expected)}$"):
        result.sum().backward()


def test_non_differentiable_aggregators_work_without_grad() -> None:
    with torch.no_grad():
        assert ConFIG()(J_BASE.clone().requires_grad_(True)).shape == (3,)
    assert not PCGrad()(J_BASE).requires_grad


def test_non_differentiable_error_can_be_built_from_any_module() -> None:
    error = NonDifferentiableError(MGDA())
    assert str(error) == "Trying to differentiate through MGDA, which is not differentiable."
