from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _autojac_utils import (
    AGGREGATOR_FACTORIES,
    N_ROWS,
    ColumnMedian,
    SolveAggregator,
    recorded,
    reference_jacobian,
    split_like,
)
from torch import Tensor, nn
from torch.testing import assert_close

from torchjd.aggregation import Aggregator, Constant, Mean, Sum, UPGrad
from torchjd.autojac import backward

CHUNK_SIZES = [1, 2, 3, None]


def _linear_map(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(N_ROWS, 7, generator=generator, dtype=dtype)
    x = torch.randn(7, generator=generator, dtype=dtype, requires_grad=True)
    return jacobian, x


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", list(AGGREGATOR_FACTORIES))
def test_linear_map_gives_aggregation(name: str, chunk_size: int | None) -> None:
    jacobian, x = _linear_map()
    aggregator = AGGREGATOR_FACTORIES[name]()
    backward(jacobian @ x, aggregator, parallel_chunk_size=chunk_size)
    assert x.grad is not None
    assert_close(x.grad, aggregator(jacobian), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", ["Mean", "MGDA", "SolveAggregator", "ColumnMedian"])
def test_float64(name: str, chunk_size: int | None) -> None:
    jacobian, x = _linear_map(torch.float64)
    aggregator = AGGREGATOR_FACTORIES[name]()
    backward(jacobian @ x, aggregator, parallel_chunk_size=chunk_size)
    assert x.grad is not None
    assert x.grad.dtype == torch.float64
    assert_close(x.grad, aggregator(jacobian), rtol=1e-10, atol=1e-12)


def test_float64_matrix_reaches_aggregator() -> None:
    jacobian, x = _linear_map(torch.float64)
    aggregator, recorder = recorded(Mean())
    backward(jacobian @ x, aggregator)
    assert recorder.matrices[0].dtype == torch.float64
    assert_close(recorder.matrices[0], jacobian, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Mean", "Constant", "MGDA", "SolveAggregator", "ColumnMedian"])
def test_list_equals_concatenation(name: str) -> None:
    def outputs(p: Tensor) -> list[Tensor]:
        return [p[:3].reshape(1, 3) * p[1], (p**2).sum(), torch.sin(p[2:4])]  # 3 + 1 + 2 rows

    aggregator = AGGREGATOR_FACTORIES[name]()
    if name == "Constant":
        aggregator = Constant(torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5, 2.0]))
    p1 = torch.tensor([1.0, -2.0, 0.5, 3.0], requires_grad=True)
    p2 = p1.detach().clone().requires_grad_()
    backward(outputs(p1), aggregator)
    backward(torch.cat([t.reshape(-1) for t in outputs(p2)]), aggregator)
    assert p1.grad is not None and p2.grad is not None
    assert_close(p1.grad, p2.grad)


def test_jacobian_row_and_column_order() -> None:
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    y1 = torch.stack([a[0] * b[0, 0], a[1]]).reshape(2, 1)  # rows 0, 1
    y2 = a.sum() * 5.0  # row 2
    aggregator, recorder = recorded(Mean())
    backward([y1, y2], aggregator, inputs=[a, b])
    expected = torch.tensor([[3.0, 0.0, 1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 0.0]])
    assert_close(recorder.matrices[0], expected)


def test_default_inputs_order() -> None:
    p1 = torch.tensor([1.0, 2.0], requires_grad=True)
    p2 = torch.tensor([4.0, 5.0, 6.0], requires_grad=True)
    out = torch.stack([(p2**2).sum() + p1.sum(), (p1 * p2[:2]).sum()])
    aggregator, recorder = recorded(Mean())
    backward(out, aggregator)
    # Columns: p1 first, then p2.
    expected = torch.tensor([[1.0, 1.0, 8.0, 10.0, 12.0], [4.0, 5.0, 1.0, 2.0, 0.0]])
    assert_close(recorder.matrices[0], expected)
    assert p1.grad is not None and p2.grad is not None
    assert_close(p1.grad, expected[:, :2].mean(dim=0))
    assert_close(p2.grad, expected[:, 2:].mean(dim=0))


def test_default_inputs_skip_frozen_and_non_leaf_tensors() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    frozen = torch.tensor([3.0, 4.0])
    hidden = p * 2
    hidden.retain_grad()
    y = torch.stack([(hidden * frozen).sum(), hidden.prod()])
    aggregator, recorder = recorded(Sum())
    backward(y, aggregator)
    assert recorder.matrices[0].shape == (2, 2)
    assert frozen.grad is None
    assert p.grad is not None
    assert_close(p.grad, torch.tensor([6.0, 8.0]) + torch.tensor([8.0, 4.0]))


def test_docstring_example_with_upgrad() -> None:
    param = torch.tensor([1.0, 2.0], requires_grad=True)
    y1 = torch.tensor([-1.0, 1.0]) @ param
    y2 = (param**2).sum()
    backward([y1, y2], UPGrad())
    assert param.grad is not None
    assert_close(param.grad, torch.tensor([0.5, 2.5]), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "make_aggregator", [Mean, lambda: recorded(Mean())[0]], ids=["fast", "hooked"]
)
def test_docstring_example_with_mean(make_aggregator: Callable[[], Aggregator]) -> None:
    # The two gradients do not conflict, so UPGrad gives their mean here.
    param = torch.tensor([1.0, 2.0], requires_grad=True)
    y1 = torch.tensor([-1.0, 1.0]) @ param
    y2 = (param**2).sum()
    backward([y1, y2], make_aggregator())
    assert param.grad is not None
    assert_close(param.grad, torch.tensor([0.5, 2.5]), rtol=0, atol=1e-6)


def test_aggregator_called_once_with_hooks_and_detached_matrix() -> None:
    jacobian, x = _linear_map()
    aggregator, recorder = recorded(SolveAggregator())
    outputs: list[Tensor] = []
    aggregator.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    backward(jacobian @ x, aggregator, parallel_chunk_size=2)
    assert len(recorder.matrices) == 1 and len(outputs) == 1
    assert_close(recorder.matrices[0], jacobian)
    assert x.grad is not None
    assert_close(x.grad, outputs[0])


def test_weighting_hook_fires() -> None:
    # The monitoring pattern: a hook on `aggregator.weighting` receives the Jacobian and weights.
    jacobian, x = _linear_map()
    aggregator = SolveAggregator()
    seen: list[tuple[Tensor, Tensor]] = []
    aggregator.weighting.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    backward(jacobian @ x, aggregator)
    assert len(seen) == 1
    assert_close(seen[0][0], jacobian)
    assert x.grad is not None
    assert_close(x.grad, seen[0][1] @ jacobian)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", ["Mean", "SolveAggregator", "ColumnMedian"])
def test_mlp_matches_reference(name: str, chunk_size: int | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    losses = model(torch.randn(4, 3)).pow(2).sum(dim=1)  # 4 losses
    params = list(model.parameters())
    aggregator = AGGREGATOR_FACTORIES[name]()
    expected = split_like(aggregator(reference_jacobian([losses], params)), params)
    backward(losses, aggregator, parallel_chunk_size=chunk_size)
    for param, grad in zip(params, expected):
        assert param.grad is not None
        assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["Mean", "SolveAggregator", "ColumnMedian"])
def test_rnn_one_row_at_a_time(name: str) -> None:
    torch.manual_seed(0)
    rnn = nn.RNN(input_size=10, hidden_size=20, num_layers=2)
    output, _ = rnn(torch.randn(5, 3, 10))
    losses = ((output - torch.randn(5, 3, 20)) ** 2).mean(dim=[1, 2])
    params = list(rnn.parameters())
    aggregator = AGGREGATOR_FACTORIES[name]()
    expected = split_like(aggregator(reference_jacobian([losses], params)), params)
    backward(losses, aggregator, parallel_chunk_size=1)
    for param, grad in zip(params, expected):
        assert param.grad is not None
        assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)


def test_rnn_example_with_upgrad() -> None:
    torch.manual_seed(0)
    rnn = nn.RNN(input_size=10, hidden_size=20, num_layers=2)
    output, _ = rnn(torch.randn(5, 3, 10))
    losses = ((output - torch.randn(5, 3, 20)) ** 2).mean(dim=[1, 2])
    params = list(rnn.parameters())
    aggregator = UPGrad()
    expected = split_like(aggregator(reference_jacobian([losses], params)), params)
    backward(losses, aggregator, parallel_chunk_size=1)
    for param, grad in zip(params, expected):
        assert param.grad is not None
        assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)


def test_mixed_dtypes_keep_their_dtype() -> None:
    p32 = torch.tensor([1.0, 2.0], requires_grad=True)
    p64 = torch.tensor([3.0, -1.0], dtype=torch.float64, requires_grad=True)
    y = torch.stack([(p32.double() * p64).sum(), (p32.double() ** 2).sum() - p64.sum()])
    jacobian = torch.tensor([[3.0, -1.0, 1.0, 2.0], [2.0, 4.0, -1.0, -1.0]], dtype=torch.float64)
    for aggregator in [Mean(), SolveAggregator(), ColumnMedian()]:
        p32.grad, p64.grad = None, None
        backward(y, aggregator, retain_graph=True)
        expected = aggregator(jacobian)
        assert p32.grad is not None and p64.grad is not None
        assert p32.grad.dtype == torch.float32 and p64.grad.dtype == torch.float64
        assert_close(p32.grad, expected[:2].float())
        assert_close(p64.grad, expected[2:])


def test_unused_input_gets_zeros() -> None:
    used = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.tensor([3.0], requires_grad=True)
    for chunk_size in CHUNK_SIZES:
        for aggregator in [Mean(), SolveAggregator(), ColumnMedian()]:
            unused.grad = None
            y = torch.stack([used.sum(), used.prod(), used[0]])
            backward(y, aggregator, inputs=[used, unused], parallel_chunk_size=chunk_size)
            assert_close(unused.grad, torch.zeros(1))


def test_empty_tensor_among_tensors() -> None:
    jacobian, x = _linear_map()
    empty = (x[:0] * 2).reshape(0, 3)
    aggregator = SolveAggregator()
    backward([empty, jacobian @ x], aggregator)
    assert x.grad is not None
    assert_close(x.grad, aggregator(jacobian), rtol=1e-5, atol=1e-6)


def test_grad_accumulates_in_place() -> None:
    for aggregator in [Mean(), SolveAggregator(), ColumnMedian()]:
        jacobian, x = _linear_map()
        existing = torch.ones(7)
        x.grad = existing
        backward(jacobian @ x, aggregator)
        assert x.grad is existing
        assert_close(x.grad, 1.0 + aggregator(jacobian), rtol=1e-5, atol=1e-6)


def test_new_grad_does_not_alias_constant_weights() -> None:
    # y = x + 0 passes the cotangent through unchanged: the .grad must be a copy, otherwise a
    # later in-place accumulation would write into the aggregator's weights.
    weights = torch.tensor([2.0, 3.0])
    x = torch.tensor([1.0, 1.0], requires_grad=True)
    backward(x + 0.0, Constant(weights), inputs=[x])
    assert x.grad is not None
    assert_close(x.grad, torch.tensor([2.0, 3.0]))
    backward(x + 0.0, Constant(weights), inputs=[x])
    assert_close(weights, torch.tensor([2.0, 3.0]))
    assert_close(x.grad, torch.tensor([4.0, 6.0]))


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", ["Mean", "SolveAggregator", "ColumnMedian"])
def test_non_leaf_input_retaining_grad(name: str, chunk_size: int | None) -> None:
    p = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    hidden = p * 2
    hidden.retain_grad()
    y = torch.stack([hidden.sum(), (hidden**2).sum(), hidden[0] * hidden[1]])
    jacobian = torch.tensor([[1.0, 1.0, 1.0], [4.0, 8.0, 12.0], [4.0, 2.0, 0.0]])
    aggregator = AGGREGATOR_FACTORIES[name]()
    backward(y, aggregator, inputs=[hidden], parallel_chunk_size=chunk_size)
    assert hidden.grad is not None
    assert_close(hidden.grad, aggregator(jacobian), rtol=1e-5, atol=1e-6)
    assert p.grad is None


def test_non_leaf_input_retaining_grad_accumulates_in_place() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    hidden = p * 2
    hidden.retain_grad()
    existing = torch.tensor([10.0, 20.0])
    hidden.grad = existing
    y = torch.stack([hidden.sum(), hidden[0] * hidden[1]])
    backward(y, Sum(), inputs=[hidden], parallel_chunk_size=1)
    assert hidden.grad is existing
    assert_close(hidden.grad, torch.tensor([10.0 + 1.0 + 4.0, 20.0 + 1.0 + 2.0]))


def test_inputs_empty_does_nothing() -> None:
    jacobian, x = _linear_map()
    aggregator, recorder = recorded(Mean())
    y = jacobian @ x
    backward(y, aggregator, inputs=[])
    assert recorder.matrices == []
    assert x.grad is None
    y.sum().backward()  # The graph was not freed.
    assert_close(x.grad, jacobian.sum(dim=0))


def test_inputs_deduplicated_and_any_iterable() -> None:
    jacobian, x = _linear_map()
    aggregator, recorder = recorded(SolveAggregator())
    backward(jacobian @ x, aggregator, inputs=(t for t in [x, x]))
    assert recorder.matrices[0].shape == (N_ROWS, 7)
    assert x.grad is not None
    assert_close(x.grad, aggregator(jacobian), rtol=1e-5, atol=1e-6)


def test_single_tensor_as_inputs() -> None:
    jacobian, x = _linear_map()
    backward(jacobian @ x, Sum(), inputs=x)
    assert_close(x.grad, jacobian.sum(dim=0))


@pytest.mark.parametrize("name", ["Mean", "SolveAggregator", "ColumnMedian"])
def test_graph_freed_only_after_last_chunk(name: str) -> None:
    jacobian, x = _linear_map()
    y = torch.tanh(jacobian @ x)  # Saves tensors for backward, so freeing is observable.
    backward(y, AGGREGATOR_FACTORIES[name](), parallel_chunk_size=1)
    assert x.grad is not None
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        backward(y, AGGREGATOR_FACTORIES[name](), parallel_chunk_size=1)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", ["Mean", "SolveAggregator", "ColumnMedian"])
def test_retain_graph_allows_second_call(name: str, chunk_size: int | None) -> None:
    jacobian, x = _linear_map()
    y = torch.tanh(jacobian @ x)
    aggregator = AGGREGATOR_FACTORIES[name]()
    backward(y, aggregator, retain_graph=True, parallel_chunk_size=chunk_size)
    assert x.grad is not None
    first = x.grad.clone()
    backward(y, aggregator, parallel_chunk_size=chunk_size)
    assert_close(x.grad, 2 * first)


def test_deep_graph() -> None:
    x = torch.tensor([1.0, -1.0], requires_grad=True)
    hidden = x
    for _ in range(10_000):
        hidden = hidden * 1.0
    y = torch.stack([hidden.sum(), 2 * hidden[0], hidden[1]])
    jacobian = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
    for aggregator in [Mean(), SolveAggregator(), ColumnMedian()]:
        x.grad = None
        backward(y, aggregator, retain_graph=True, parallel_chunk_size=2)
        assert_close(x.grad, aggregator(jacobian))


# Validation


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_bad_parallel_chunk_size(chunk_size: int) -> None:
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError) as info:
        backward([x * 1, x * 1] if chunk_size else [], Mean(), parallel_chunk_size=chunk_size)
    assert str(info.value) == (
        f"`parallel_chunk_size` should be `None` or greater than `0`. (got {chunk_size})"
    )


def test_duplicate_tensors() -> None:
    y = torch.ones(2, requires_grad=True) * 2
    with pytest.raises(ValueError, match=r"^`tensors` should contain unique elements\.$"):
        backward([y, y], Mean())


def test_empty_tensors() -> None:
    with pytest.raises(ValueError, match=r"^`tensors` cannot be empty$"):
        backward([], Mean())


def test_tensors_without_grad_fn() -> None:
    leaf = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"^All `tensors` should have a `grad_fn`\.$"):
        backward([leaf * 2, leaf], Mean())
    with pytest.raises(ValueError, match=r"^All `tensors` should have a `grad_fn`\.$"):
        backward(torch.ones(2), Mean())


def test_tensors_of_wrong_type() -> None:
    y = torch.ones(2, requires_grad=True) * 2
    with pytest.raises(TypeError, match="`tensors` should be a Tensor or a sequence"):
        backward(iter([y]), Mean())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`tensors` should contain only Tensors"):
        backward([y, 1.0], Mean())  # type: ignore[list-item]
    with pytest.raises(TypeError, match="`inputs` should contain only Tensors"):
        backward(y, Mean(), inputs=["x"])  # type: ignore[list-item]


def test_input_not_requiring_grad() -> None:
    x = torch.ones(2, requires_grad=True)
    frozen = torch.ones(2)
    for aggregator in [Mean(), SolveAggregator(), ColumnMedian()]:
        with pytest.raises(
            RuntimeError, match="One of the differentiated Tensors does not require"
        ):
            backward(x * 2, aggregator, inputs=[x, frozen], retain_graph=True)


def test_tensor_not_requiring_grad_with_explicit_inputs() -> None:
    x = torch.ones(2, requires_grad=True)
    for aggregator in [Mean(), SolveAggregator(), ColumnMedian()]:
        with pytest.raises(
            RuntimeError, match="element 1 of tensors does not require grad and does not have"
        ):
            backward([x * 2, torch.ones(2)], aggregator, inputs=[x], retain_graph=True)


@pytest.mark.parametrize("name", ["Mean", "SolveAggregator", "ColumnMedian"])
def test_non_leaf_input_not_retaining_grad(name: str) -> None:
    x = torch.ones(2, requires_grad=True)
    hidden = x * 3
    y = torch.stack([hidden.sum(), hidden.prod()])
    aggregator, recorder = recorded(AGGREGATOR_FACTORIES[name]())
    with pytest.raises(ValueError) as info:
        backward(y, aggregator, inputs=[x, hidden])
    assert str(info.value) == (
        "Cannot populate the .grad field of a Tensor that does not satisfy:"
        "`tensor.requires_grad and (tensor.is_leaf or tensor.retains_grad)`."
    )
    assert len(recorder.matrices) == 1  # Checked when accumulating, after aggregation.
    assert x.grad is not None  # Inputs before the faulty one are already written.


def test_aggregator_returning_wrong_shape() -> None:
    class Broken(Aggregator):
        def forward(self, matrix: Tensor, /) -> Tensor:
            return matrix

    jacobian, x = _linear_map()
    with pytest.raises(ValueError, match="should return a vector of length 7"):
        backward(jacobian @ x, Broken())


def test_constant_with_wrong_number_of_weights() -> None:
    jacobian, x = _linear_map()
    with pytest.raises(ValueError, match="rows"):
        backward(jacobian @ x, Constant(torch.ones(3)))


def test_aggregator_class_instead_of_instance() -> None:
    jacobian, x = _linear_map()
    with pytest.raises(TypeError, match=r"`aggregator` should be an aggregator instance"):
        backward(jacobian @ x, Mean)  # type: ignore[arg-type]


def test_parallel_chunk_size_of_wrong_type() -> None:
    jacobian, x = _linear_map()
    with pytest.raises(TypeError, match="`parallel_chunk_size` should be `None` or an int"):
        backward(jacobian @ x, Mean(), parallel_chunk_size=2.0)  # type: ignore[arg-type]


def _embedding_losses() -> tuple[nn.Embedding, Tensor]:
    embedding = nn.Embedding(10, 3, sparse=True)
    losses = embedding(torch.tensor([1, 2, 1])).sum(dim=1) * torch.tensor([1.0, 2.0, 3.0])
    return embedding, losses


@pytest.mark.parametrize("name", ["Mean", "SolveAggregator", "ColumnMedian"])
def test_sparse_gradients_one_row_at_a_time(name: str) -> None:
    embedding, losses = _embedding_losses()
    jacobian = torch.zeros(3, 10, 3)
    jacobian[0, 1], jacobian[1, 2], jacobian[2, 1] = 1.0, 2.0, 3.0
    aggregator = AGGREGATOR_FACTORIES[name]()
    backward(losses, aggregator, parallel_chunk_size=1)
    assert embedding.weight.grad is not None
    expected = aggregator(jacobian.reshape(3, 30)).reshape(10, 3)
    assert_close(embedding.weight.grad.to_dense(), expected)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_sparse_gradients_under_vmap_suggest_one_row_at_a_time() -> None:
    _, losses = _embedding_losses()
    with pytest.raises(RuntimeError, match="parallel_chunk_size=1"):
        backward(losses, ColumnMedian())


def test_output_as_input() -> None:
    p = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = p * 2
    y.retain_grad()
    for chunk_size in CHUNK_SIZES:
        aggregator, recorder = recorded(Sum())
        y.grad = None
        backward(y, aggregator, inputs=[y], parallel_chunk_size=chunk_size, retain_graph=True)
        assert_close(recorder.matrices[0], torch.eye(3))
        assert_close(y.grad, torch.ones(3))


@pytest.mark.parametrize("name", ["SolveAggregator", "ColumnMedian"])
def test_vmap_only_for_chunks_of_several_rows(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    vmap = torch.vmap

    def counting_vmap(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return vmap(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "vmap", counting_vmap)
    jacobian, x = _linear_map()
    aggregator = AGGREGATOR_FACTORIES[name]()
    backward(jacobian @ x, aggregator, parallel_chunk_size=1)
    backward((jacobian @ x).sum(), aggregator)  # A single row.
    assert calls == []
    backward(jacobian @ x, aggregator, parallel_chunk_size=2)  # Chunks of 2, 2 and 1 rows.
    assert len(calls) == 2
