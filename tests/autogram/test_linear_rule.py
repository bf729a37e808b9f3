"""The Linear rule against plain autograd: rows, both Gramian forms, weighted gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _autogram_rows import gram, record, reference_rows
from torch import Tensor, nn

from torchjd.autogram._rules import _linear as linear_module
from torchjd.autogram._rules import find_rule
from torchjd.autogram._rules._linear import LinearRule

RULE = LinearRule()

# (input shapes of the calls, number of seeds): one vector per sample, sequences, reuse.
SHAPES = [
    ([(4, 5)], 1),
    ([(4, 5)], 3),
    ([(3, 2, 5)], 2),
    ([(3, 6, 5)], 1),
    ([(2, 2, 3, 5)], 2),
    ([(4, 5), (4, 5)], 1),
    ([(3, 5), (3, 4, 5), (3, 2, 2, 5)], 2),
    # Per-sample rows larger than the inputs and gradients: materialised in parts of features.
    ([(4, 2, 5)], 1),
    ([(4, 2, 5)], 2),
]


def _calls(lin: nn.Linear, shapes: list[tuple[int, ...]], num_seeds: int) -> list:
    return [record(lin, torch.randn(*shape), num_seeds=num_seeds) for shape in shapes]


@pytest.mark.parametrize(("shapes", "num_seeds"), SHAPES)
@pytest.mark.parametrize("batched", [True, False])
def test_rows_gramian_and_weighted_gradients(
    shapes: list[tuple[int, ...]], num_seeds: int, batched: bool
) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    calls = _calls(lin, shapes, num_seeds)
    expected = reference_rows(calls, [lin.weight, lin.bias], batched)
    rows = RULE.per_row_gradients(lin, calls, ["weight", "bias"], batched)
    torch.testing.assert_close(rows["weight"], expected[0])
    torch.testing.assert_close(rows["bias"], expected[1])
    gramian = RULE.gramian(lin, calls, ["weight", "bias"], batched)
    torch.testing.assert_close(gramian, gram(expected), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        RULE.gramian(lin, calls, ["bias"], batched), gram(expected[1:]), rtol=1e-5, atol=1e-4
    )
    weights = torch.randn(expected[0].shape[0])
    weighted = RULE.weighted_gradients(lin, calls, ["weight", "bias"], batched, weights)
    torch.testing.assert_close(weighted["weight"], torch.tensordot(weights, expected[0], dims=1))
    torch.testing.assert_close(weighted["bias"], torch.tensordot(weights, expected[1], dims=1))


@pytest.mark.parametrize("force", ["ghost", "per_sample"])
@pytest.mark.parametrize("batched", [True, False])
def test_both_weight_forms_agree(
    force: str, batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=False)
    calls = _calls(lin, [(3, 4, 5), (3, 5)], 2)
    expected = gram(reference_rows(calls, [lin.weight], batched))
    ghost = force == "ghost"
    monkeypatch.setattr(linear_module, "_ghost_cost", lambda terms: 0 if ghost else 1)
    monkeypatch.setattr(linear_module, "_per_sample_cost", lambda terms: 1 if ghost else 0)
    monkeypatch.setattr(linear_module, "_GHOST_ELEMENTS_PER_CHUNK", 7)  # several chunks
    gramian = RULE.gramian(lin, calls, ["weight"], batched)
    torch.testing.assert_close(gramian, expected, rtol=1e-5, atol=1e-4)


def test_cost_model_prefers_ghost_for_short_sequences() -> None:
    torch.manual_seed(0)
    wide = nn.Linear(64, 64)
    short = linear_module._terms(wide, [record(wide, torch.randn(8, 2, 64), num_seeds=1)], True)
    assert linear_module._ghost_cost(short) < linear_module._per_sample_cost(short)
    narrow = nn.Linear(2, 2)
    long = linear_module._terms(narrow, [record(narrow, torch.randn(8, 64, 2), num_seeds=1)], True)
    assert linear_module._ghost_cost(long) > linear_module._per_sample_cost(long)


def test_unreached_calls_are_ignored() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    calls = _calls(lin, [(4, 5), (4, 5)], 1)
    calls[1].grad_outputs = [None]
    expected = reference_rows(calls[:1], [lin.weight, lin.bias], True)
    torch.testing.assert_close(RULE.gramian(lin, calls, ["weight", "bias"], True), gram(expected))


def test_keyword_input() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    call = record(lin, input=torch.randn(4, 5), num_seeds=1)
    expected = reference_rows([call], [lin.weight], True)
    torch.testing.assert_close(RULE.gramian(lin, [call], ["weight"], True), gram(expected))


def test_low_precision_is_accumulated_in_float32() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).to(torch.bfloat16)
    call = record(lin, torch.randn(4, 5, dtype=torch.bfloat16), num_seeds=1)
    gramian = RULE.gramian(lin, [call], ["weight", "bias"], True)
    assert gramian.dtype == torch.float32
    x = call.args[0].float()
    d = call.grad_outputs[0][0].float()  # type: ignore[index]
    torch.testing.assert_close(gramian, (x @ x.T + 1) * (d @ d.T))


def test_covered_parameters() -> None:
    assert set(RULE.covered_parameters(nn.Linear(2, 3))) == {"weight", "bias"}
    assert set(RULE.covered_parameters(nn.Linear(2, 3, bias=False))) == {"weight"}

    class Overriding(nn.Linear):
        def forward(self, input: Tensor) -> Tensor:
            return F.linear(input, 2 * self.weight)

    assert RULE.covered_parameters(Overriding(2, 3)) == {}
    assert isinstance(find_rule(nn.Linear(2, 3)), LinearRule)


def test_bad_arguments() -> None:
    lin = nn.Linear(5, 3)
    calls = _calls(lin, [(4, 5)], 1)
    with pytest.raises(ValueError, match="params"):
        RULE.gramian(lin, calls, [], True)
    with pytest.raises(ValueError, match="among"):
        RULE.gramian(lin, calls, ["scale"], True)
    with pytest.raises(ValueError, match="weights"):
        RULE.weighted_gradients(lin, calls, ["weight"], True, torch.ones(5))
    unbatched = _calls(lin, [(5,)], 1)
    with pytest.raises(ValueError, match="batch dimension"):
        RULE.gramian(lin, unbatched, ["weight"], True)
    expected = reference_rows(unbatched, [lin.weight], False)
    torch.testing.assert_close(RULE.gramian(lin, unbatched, ["weight"], False), gram(expected))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("batch_size", [256, 300])
def test_symmetric_blocks_of_many_rows(batch_size: int, with_bias: bool) -> None:
    """Many samples go through the block-wise (lower half only) form: same Gramian."""
    torch.manual_seed(0)
    lin = nn.Linear(7, 4, bias=with_bias)
    calls = _calls(lin, [(batch_size, 7)], 1)
    params = ["weight", "bias"] if with_bias else ["weight"]
    x, grad = calls[0].args[0], calls[0].grad_outputs[0][0]
    expected = (x @ x.T + (1.0 if with_bias else 0.0)) * (grad @ grad.T)
    gramian = RULE.gramian(lin, calls, params, batched=True)
    torch.testing.assert_close(gramian, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(gramian, gramian.T)


@pytest.mark.parametrize(("shapes", "num_seeds"), SHAPES)
@pytest.mark.parametrize("batched", [True, False])
def test_fused_form_matches_separate_calls(
    shapes: list[tuple[int, ...]], num_seeds: int, batched: bool
) -> None:
    """``gramian_then_weighted_gradients`` (which may reuse per-sample rows) agrees."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    calls = _calls(lin, shapes, num_seeds)
    expected = reference_rows(calls, [lin.weight, lin.bias], batched)
    for params in (["weight", "bias"], ["weight"], ["bias"]):
        gramian, weighted = RULE.gramian_then_weighted_gradients(lin, calls, params, batched)
        wanted = (
            [expected[0]]
            if params == ["weight"]
            else expected[1:]
            if params == ["bias"]
            else expected
        )
        torch.testing.assert_close(gramian, gram(wanted), rtol=1e-5, atol=1e-4)
        weights = torch.randn(expected[0].shape[0])
        result = weighted(weights)
        assert list(result) == params
        for name, rows in zip(["weight", "bias"], expected):
            if name in params:
                torch.testing.assert_close(result[name], torch.tensordot(weights, rows, dims=1))


@pytest.mark.parametrize(
    ("shapes", "num_seeds"), [*SHAPES, ([(300, 5)], 1), ([(130, 5)], 3), ([(260, 5)], 2)]
)
@pytest.mark.parametrize("into_dtype", [torch.float32, torch.float64])
def test_adds_its_gramian_into_the_running_sum(
    shapes: list[tuple[int, ...]], num_seeds: int, into_dtype: torch.dtype
) -> None:
    """``add_gramian_then_weighted_gradients`` adds the block in place (by tiles, or by pairs of
    seeds, for one vector per sample; a block of another dtype is added as a whole)."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    calls = _calls(lin, shapes, num_seeds)
    expected = reference_rows(calls, [lin.weight, lin.bias], True)
    rows = expected[0].shape[0]
    start = torch.randn(rows, rows, dtype=into_dtype)
    running = start.clone()
    weighted = RULE.add_gramian_then_weighted_gradients(
        lin, calls, ["weight", "bias"], True, running
    )
    wanted = start + gram(expected).to(into_dtype)
    torch.testing.assert_close(running, wanted, rtol=1e-5, atol=1e-4)
    weights = torch.randn(rows)
    result = weighted(weights)
    for name, param_rows in zip(["weight", "bias"], expected):
        torch.testing.assert_close(
            result[name], torch.tensordot(weights, param_rows, dims=1), rtol=1e-5, atol=1e-4
        )
