from __future__ import annotations

import pytest
import torch
from _asserts import assert_close
from _matrices import generalized_gramian
from hypothesis import given, settings
from hypothesis import strategies as st

from torchjd.aggregation import (
    AlignedMTLWeighting,
    Flattening,
    GeneralizedWeighting,
    IMTLGWeighting,
    MeanWeighting,
    MGDAWeighting,
    UPGradWeighting,
    Weighting,
)

_WEIGHTINGS: list[Weighting[torch.Tensor]] = [
    MeanWeighting(),
    MGDAWeighting(),
    IMTLGWeighting(),
    AlignedMTLWeighting(),
]


def test_reference_value() -> None:
    result = Flattening(UPGradWeighting())(torch.ones(2, 3, 3, 2))
    assert_close(result, torch.full((2, 3), 0.1667), atol=1e-4)


def test_mean_reference_value() -> None:
    result = Flattening(MeanWeighting())(torch.ones(2, 3, 3, 2))
    assert_close(result, torch.full((2, 3), 1 / 6), atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    n=st.integers(1, 6),
    weighting_index=st.integers(0, len(_WEIGHTINGS) - 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_is_the_weighting_of_the_flattened_gramian(
    shape: list[int], n: int, weighting_index: int, seed: int
) -> None:
    # For a Jacobian of shape [m_1, ..., m_k, n], the generalized Gramian (autogram layout) must
    # give the weights of the flattened m x n Jacobian, reshaped to [m_1, ..., m_k].
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(*shape, n, generator=generator, dtype=torch.float64)
    weighting = _WEIGHTINGS[weighting_index]
    flat = jacobian.reshape(-1, n)
    expected = weighting(flat @ flat.T).reshape(tuple(shape))
    result = Flattening(weighting)(generalized_gramian(jacobian))
    assert result.shape == tuple(shape)
    assert_close(result, expected, atol=1e-12)


def test_one_dimension_is_the_plain_weighting() -> None:
    gramian = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
    assert torch.equal(Flattening(MGDAWeighting())(gramian), MGDAWeighting()(gramian))


def test_scalar_gramian_gives_a_scalar_weight() -> None:
    result = Flattening(MeanWeighting())(torch.tensor(4.0))
    assert result.shape == ()
    assert result.item() == 1.0


def test_generalized_gramian_layout_is_not_transposed() -> None:
    # With rows of very different norms, reading the second half in the wrong order would mix up
    # the rows; the weights must follow the rows of the Jacobian.
    jacobian = torch.zeros(2, 3, 6, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            jacobian[i, j, 3 * i + j] = 1.0 + 3 * i + j
    result = Flattening(IMTLGWeighting())(generalized_gramian(jacobian))
    norms = jacobian.norm(dim=-1)
    # IMTL-G on orthogonal rows weighs each row by 1 / norm (normalised).
    expected = (1 / norms) / (1 / norms).sum()
    assert_close(result, expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(2,), (2, 2, 1), (2, 3, 2, 3), (2, 3, 3)])
def test_shapes_that_are_not_generalized_gramians_raise(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="generalized_gramian"):
        Flattening(MeanWeighting())(torch.ones(shape))


def test_structure_and_repr() -> None:
    flattening = Flattening(UPGradWeighting())
    assert isinstance(flattening, GeneralizedWeighting)
    assert isinstance(flattening.weighting, UPGradWeighting)
    assert repr(Flattening(MeanWeighting())) == "Flattening(\n  (weighting): MeanWeighting()\n)"
    assert str(Flattening(MeanWeighting())) == repr(Flattening(MeanWeighting()))


def test_hooks_on_the_inner_weighting_fire() -> None:
    calls: list[torch.Size] = []
    weighting = MeanWeighting()
    weighting.register_forward_hook(lambda _module, inputs, _output: calls.append(inputs[0].shape))
    Flattening(weighting)(torch.ones(2, 3, 3, 2))
    assert calls == [torch.Size([6, 6])]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    jacobian = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [-1.0, 0.0]]])
    result = Flattening(MGDAWeighting())(generalized_gramian(jacobian).to(dtype))
    assert result.dtype == dtype
    assert result.shape == (2, 2)
