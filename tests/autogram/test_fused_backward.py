"""``Engine.backward``: the fused step fills ``.grad`` as ``output.backward(weights)`` would."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import pytest
import torch
from _autogram_zoo import SETTINGS, Setting, reference_gramian, trainable_parameters
from torch import Tensor, nn

from torchjd.aggregation import (
    ConstantWeighting,
    Flattening,
    GeneralizedWeighting,
    MeanWeighting,
    Weighting,
)
from torchjd.aggregation._utils import PSDMatrix
from torchjd.autogram import Engine
from torchjd.autogram._rules import _common, _ghost, _linear, find_rule


class _RowSums(Weighting[PSDMatrix]):
    """Weights that depend on every entry of the Gramian, so that a wrong Gramian shows."""

    def forward(self, gramian: PSDMatrix, /) -> Tensor:
        return gramian.sum(dim=1) / (gramian.diagonal().sum() + 1.0)


class _Recording(GeneralizedWeighting):
    """Records the generalized Gramian it receives, then weighs it with ``inner``."""

    def __init__(self, inner: Weighting[PSDMatrix]) -> None:
        super().__init__()
        self.inner = Flattening(inner)
        self.gramians: list[Tensor] = []

    def forward(self, generalized_gramian: Tensor, /) -> Tensor:
        self.gramians.append(generalized_gramian)
        return self.inner(generalized_gramian)


def _leaves(output: Tensor) -> list[Tensor]:
    """Every tensor whose ``.grad`` a backward from ``output`` fills."""
    leaves: dict[int, Tensor] = {}
    stack = [output.grad_fn]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            leaves[id(node.variable)] = node.variable  # type: ignore[attr-defined]
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(leaves.values())


def _snapshot(tensors: Sequence[Tensor]) -> list[Tensor | None]:
    return [None if t.grad is None else t.grad.clone() for t in tensors]


def _clear(tensors: Sequence[Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


def _assert_grads_close(
    actual: Sequence[Tensor | None],
    expected: Sequence[Tensor | None],
    tolerance: float | None = None,
) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert got.dtype == want.dtype and got.shape == want.shape
            scale = max(1.0, want.abs().max().item())
            if tolerance is None:
                tolerance = 1e-10 if want.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got, want, rtol=10 * tolerance, atol=tolerance * scale)


def _cases() -> list[object]:
    params = []
    for setting in SETTINGS:
        marks = [pytest.mark.slow] if setting.slow else []
        modes = ["batched", "summed"] if setting.batched else ["summed"]
        for mode in modes:
            params.append(pytest.param(setting, mode, id=f"{setting.name}-{mode}", marks=marks))
    return params


def _has_rule(modules: Sequence[nn.Module], module_type: type[nn.Module]) -> bool:
    instance = next(m for root in modules for m in root.modules() if isinstance(m, module_type))
    return find_rule(instance) is not None


# In float32, the gradients through the GroupNorm of 2-element groups of this setting are so
# ill-conditioned that two exact computations in different orders differ by ~1e-3 (relative); its
# float64 run matches to 1e-10.
_FLOAT32_TOLERANCE = {"layer_and_group_norm": 1e-2}


@pytest.mark.parametrize(
    ("inner", "dtype"),
    [(MeanWeighting, torch.float32), (_RowSums, torch.float64)],
    ids=["mean-float32", "row_sums-float64"],
)
@pytest.mark.parametrize(("setting", "mode"), _cases())
def test_matches_weighted_autograd_backward_on_zoo(
    setting: Setting, mode: str, inner: type[Weighting[PSDMatrix]], dtype: torch.dtype
) -> None:
    """Gramian, weights and every ``.grad`` (covered or not) equal those of plain autograd."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        case = setting.build()
        batch_dim = case.batch_dim if mode == "batched" else None
        engine = Engine(*case.modules, batch_dim=batch_dim)
        output = case.forward()
    finally:
        torch.set_default_dtype(default_dtype)
    weighting = _Recording(inner())
    leaves = _leaves(output)
    _clear(leaves)
    if setting.needs_rule_for is not None and not _has_rule(case.modules, setting.needs_rule_for):
        with pytest.raises(ValueError, match="used inside a call"):
            engine.backward(output, weighting)
        return
    # What `output.backward(weights)` gives, computed first: the fused step frees the graph.
    expected_gramian = reference_gramian(output, trainable_parameters(case.modules))
    expected_weights = weighting.inner(expected_gramian)
    expected_grads = torch.autograd.grad(
        output, leaves, grad_outputs=expected_weights, retain_graph=True
    )

    weights = engine.backward(output, weighting)
    (gramian,) = weighting.gramians
    scale = max(1.0, expected_gramian.abs().max().item())
    tolerance = 1e-10 if output.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(
        gramian, expected_gramian, rtol=10 * tolerance, atol=tolerance * scale
    )
    assert weights.shape == output.shape
    torch.testing.assert_close(weights, expected_weights, rtol=1e-4, atol=1e-6)
    if output.dtype == torch.float64:
        tolerance = 1e-10
    else:
        tolerance = _FLOAT32_TOLERANCE.get(setting.name, 1e-5)
    _assert_grads_close(_snapshot(leaves), list(expected_grads), tolerance)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_vector_output_with_plain_weighting(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    engine = Engine(model, batch_dim=batch_dim)
    x, y = torch.randn(7, 5), torch.randn(7)
    weighting = ConstantWeighting(torch.rand(7))
    losses = (model(x).squeeze(1) - y) ** 2
    weights = engine.backward(losses, weighting)
    fused = _snapshot(list(model.parameters()))
    torch.testing.assert_close(weights, weighting.weights)
    model.zero_grad(set_to_none=True)
    ((model(x).squeeze(1) - y) ** 2).backward(weights)
    _assert_grads_close(fused, _snapshot(list(model.parameters())))


def test_matrix_output_with_generalized_weighting_matches_the_loop() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    engine = Engine(trunk, batch_dim=0)
    x = torch.randn(5, 6)
    weighting = Flattening(_RowSums())
    losses = trunk(x) ** 2  # [B, 3]
    weights = engine.backward(losses, weighting)
    assert weights.shape == (5, 3)
    fused = _snapshot(list(trunk.parameters()))
    trunk.zero_grad(set_to_none=True)
    losses = trunk(x) ** 2
    loop_weights = weighting(engine.compute_gramian(losses))
    losses.backward(loop_weights)
    torch.testing.assert_close(weights, loop_weights)
    _assert_grads_close(fused, _snapshot(list(trunk.parameters())))


def test_accumulates_into_existing_grads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    engine = Engine(model[2:], batch_dim=0)  # model[0] is outside: partial JD
    x = torch.randn(6, 5)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    weights = engine.backward(model(x).squeeze(1), _RowSums())
    accumulated = _snapshot(list(model.parameters()))
    model.zero_grad(set_to_none=True)
    model(x).squeeze(1).backward(weights)
    expected = [None if g is None else g + 1.0 for g in _snapshot(list(model.parameters()))]
    _assert_grads_close(accumulated, expected)


def test_frozen_parameters_and_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    engine = Engine(model, batch_dim=0)
    x = torch.randn(6, 5, requires_grad=True)  # a leaf that `backward` fills too
    weights = engine.backward(model(x).sum(dim=1), _RowSums())
    assert model[0].weight.grad is None
    fused = _snapshot([x, *model.parameters()])
    _clear([x, *model.parameters()])
    model(x).sum(dim=1).backward(weights)
    _assert_grads_close(fused, _snapshot([x, *model.parameters()]))


def test_parameter_hooks_run() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    engine = Engine(model, batch_dim=0)
    seen: list[str] = []
    model[0].weight.register_hook(lambda grad: grad * 2.0)
    model[2].bias.register_post_accumulate_grad_hook(lambda param: seen.append("post"))
    x = torch.randn(6, 5)
    weights = engine.backward(model(x).squeeze(1), MeanWeighting())
    fused = _snapshot(list(model.parameters()))
    assert seen == ["post"]
    model.zero_grad(set_to_none=True)
    model(x).squeeze(1).backward(weights)
    _assert_grads_close(fused, _snapshot(list(model.parameters())))


@pytest.mark.parametrize(
    ("form", "kept_rows_factor"), [("ghost", 1.5), ("per_sample", 0.0), ("per_sample", 1e9)]
)
@pytest.mark.parametrize("batch_dim", [0, None])
def test_both_forms_of_the_linear_and_conv_rules(
    form: str, kept_rows_factor: float, batch_dim: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forcing each exact form of the rules gives the same gradients as autograd (the per-sample
    form with the rows kept for the weighted gradients or not)."""
    monkeypatch.setattr(_common, "KEPT_ROWS_FACTOR", kept_rows_factor)
    zero = lambda *args: 0  # noqa: E731
    huge = lambda *args: 1 << 62  # noqa: E731
    monkeypatch.setattr(_linear, "_ghost_cost", zero if form == "ghost" else huge)
    monkeypatch.setattr(_linear, "_per_sample_cost", huge if form == "ghost" else zero)
    monkeypatch.setattr(_ghost, "ghost_cost", zero if form == "ghost" else huge)
    monkeypatch.setattr(_ghost, "per_sample_cost", huge if form == "ghost" else zero)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(start_dim=1),
        nn.Unflatten(1, (4, 6)),
        nn.Linear(6, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    )
    engine = Engine(model, batch_dim=batch_dim)
    x = torch.randn(4, 3, 6)

    def forward() -> Tensor:
        out = model(x)  # [4, 4, 2]
        return out.sum(dim=1) ** 2  # [4, 2]

    weighting = Flattening(_RowSums())
    output = forward()
    weights = engine.backward(output, weighting, retain_graph=True)
    fused = _snapshot(list(model.parameters()))
    expected_gramian = reference_gramian(output, list(model.parameters()))
    torch.testing.assert_close(weights, weighting(expected_gramian))
    model.zero_grad(set_to_none=True)
    output.backward(weights)
    _assert_grads_close(fused, _snapshot(list(model.parameters())))


def test_reused_and_tied_parameters() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    engine = Engine(first, second, batch_dim=0)
    x = torch.randn(5, 3, 4)

    def forward() -> Tensor:
        hidden = torch.tanh(first(x))
        return (second(hidden) + first(hidden)).sum(dim=(1, 2))

    weights = engine.backward(forward(), _RowSums())
    params = [first.weight, first.bias, second.bias]
    fused = _snapshot(params)
    _clear(params)
    forward().backward(weights)
    _assert_grads_close(fused, _snapshot(params))


def test_retain_graph() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(6, 5)).squeeze(1)
    engine.backward(output, MeanWeighting(), retain_graph=True)
    output.sum().backward()  # the graph is still there
    output = model(torch.randn(6, 5)).squeeze(1)
    engine.backward(output, MeanWeighting())
    with pytest.raises(RuntimeError, match="second time"):
        output.sum().backward()


def test_partial_engine_frees_the_graph() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    engine = Engine(model[2], batch_dim=0)
    output = model(torch.randn(6, 5)).squeeze(1)
    engine.backward(output, MeanWeighting())
    assert model[0].weight.grad is not None
    with pytest.raises(RuntimeError, match="second time"):
        output.sum().backward()


def test_output_is_consumed_then_next_forward_works() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(6, 5)).squeeze(1)
    engine.backward(output, MeanWeighting(), retain_graph=True)
    with pytest.raises(RuntimeError, match="already"):
        engine.backward(output, MeanWeighting())
    with pytest.raises(RuntimeError, match="already"):
        engine.compute_gramian(output)
    output = model(torch.randn(6, 5)).squeeze(1)
    assert engine.compute_gramian(output).shape == (6, 6)


def test_weighting_must_fit_the_output() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    engine = Engine(model, batch_dim=0)
    with pytest.raises(TypeError, match="Flattening"):
        engine.backward(model(torch.randn(6, 5)), MeanWeighting())
    with pytest.raises(TypeError, match="weighting"):
        engine.backward(model(torch.randn(6, 5)).sum(dim=1), lambda g: g.sum(dim=1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retain_graph"):
        engine.backward(model(torch.randn(6, 5)).sum(dim=1), MeanWeighting(), retain_graph=1)  # type: ignore[arg-type]
    # The refusals above happen before anything is recorded or differentiated.
    for param in model.parameters():
        assert param.grad is None
    output = model(torch.randn(6, 5)).sum(dim=1)
    assert engine.backward(output, MeanWeighting()).shape == (6,)


def test_weights_of_the_wrong_shape() -> None:
    class Wrong(Weighting[PSDMatrix]):
        def forward(self, gramian: PSDMatrix, /) -> Tensor:
            return gramian.new_ones(gramian.shape[0] + 1)

    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    engine = Engine(model, batch_dim=0)
    with pytest.raises(ValueError, match="one weight per entry"):
        engine.backward(model(torch.randn(6, 5)).squeeze(1), Wrong())
    for param in model.parameters():
        assert param.grad is None
    output = model(torch.randn(6, 5)).squeeze(1)
    assert engine.backward(output, MeanWeighting()).shape == (6,)


def test_scalar_output_with_flattening() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    engine = Engine(model, batch_dim=None)
    x = torch.randn(6, 5)
    weights = engine.backward(model(x).square().mean(), Flattening(MeanWeighting()))
    assert weights.shape == ()
    fused = _snapshot(list(model.parameters()))
    model.zero_grad(set_to_none=True)
    (model(x).square().mean() * weights).backward()
    _assert_grads_close(fused, _snapshot(list(model.parameters())))


def test_sparse_embedding_gradients() -> None:
    """``Embedding(sparse=True)`` gets a sparse ``.grad`` as from autograd, also when adding."""
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 3, sparse=True)
    head = nn.Linear(3, 1)
    engine = Engine(embedding, head, batch_dim=0)
    tokens = torch.randint(0, 10, (5, 4))

    def forward() -> Tensor:
        return head(embedding(tokens).mean(dim=1)).squeeze(1) ** 2

    weights = engine.backward(forward(), _RowSums())
    engine.backward(forward(), ConstantWeighting(weights))  # accumulates
    assert embedding.weight.grad is not None and embedding.weight.grad.is_sparse
    fused = [embedding.weight.grad.to_dense(), head.weight.grad, head.bias.grad]
    _clear([embedding.weight, head.weight, head.bias])
    forward().backward(weights)
    forward().backward(weights)
    assert embedding.weight.grad is not None and embedding.weight.grad.is_sparse
    expected = [embedding.weight.grad.to_dense(), head.weight.grad, head.bias.grad]
    _assert_grads_close(fused, expected)


class _Attention(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def _graph_free_models() -> list[object]:
    # Factories: the models are built after the test seeds the generator (built at collection,
    # their weights would change from run to run).
    def conv() -> nn.Module:
        return nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(9, 1))

    def norm() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.Linear(4, 1))

    def embedding() -> nn.Module:
        return nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 1))

    def attention() -> nn.Module:
        return nn.Sequential(_Attention(0.0), nn.Flatten(), nn.Linear(12, 1))

    return [
        pytest.param(conv, lambda: torch.randn(5, 2, 5), id="conv"),
        pytest.param(norm, lambda: torch.randn(5, 4), id="norm"),
        pytest.param(embedding, lambda: torch.randint(0, 7, (5, 3)), id="embedding"),
        pytest.param(attention, lambda: torch.randn(5, 3, 4), id="attention"),
    ]


@pytest.mark.parametrize(("make_model", "make_input"), _graph_free_models())
def test_rules_reading_only_inputs_let_the_graph_be_freed(
    make_model: Callable[[], nn.Module], make_input: Callable[[], Tensor]
) -> None:
    """Conv, norm, embedding and attention (without dropout) rules need no recorded graph."""
    torch.manual_seed(0)
    # Double precision: GroupNorm over groups of 2 channels amplifies rounding errors.
    model = make_model().double()
    engine = Engine(model, batch_dim=0)
    inputs = make_input()
    output = model(inputs.double() if inputs.is_floating_point() else inputs).squeeze(1)
    params = list(model.parameters())
    expected_weights = torch.rand(5, dtype=torch.float64)
    expected = torch.autograd.grad(output, params, expected_weights, retain_graph=True)
    engine.backward(output, ConstantWeighting(expected_weights))
    _assert_grads_close(_snapshot(params), list(expected))
    with pytest.raises(RuntimeError, match="second time"):
        output.sum().backward()


def test_attention_with_dropout_keeps_the_graph_it_needs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Attention(0.5), nn.Flatten(), nn.Linear(12, 1))
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(5, 3, 4)).squeeze(1)
    params = list(model.parameters())
    weights = torch.rand(5)
    expected = torch.autograd.grad(output, params, weights, retain_graph=True)
    engine.backward(output, ConstantWeighting(weights))
    _assert_grads_close(_snapshot(params), list(expected))


def test_view_outputs_are_freed_before_the_weighted_step() -> None:
    """``F.linear`` on a 3-d input returns a view; once the graph is freed, nothing but the engine
    would keep it (ReLU saves its own result), and the engine lets it go before the weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Flatten(), nn.Linear(18, 1))
    engine = Engine(model, batch_dim=0)
    refs: list[weakref.ref[Tensor]] = []
    model[0].register_forward_hook(lambda _m, _i, out: refs.append(weakref.ref(out)))

    class Probe(Weighting[Tensor]):
        def forward(self, stat: Tensor, /) -> Tensor:
            alive.append(refs[0]() is not None)
            return torch.ones(stat.shape[0])

    alive: list[bool] = []
    inputs = torch.randn(5, 3, 4)
    output = model(inputs).squeeze(1)
    assert refs[0]() is not None and refs[0]()._is_view()  # type: ignore[union-attr]
    params = list(model.parameters())
    expected = torch.autograd.grad(output, params, torch.ones(5), retain_graph=True)
    engine.backward(output, Probe())
    assert alive == [False]
    _assert_grads_close(_snapshot(params), list(expected))


def test_outputs_alive_at_the_backward_pass_are_freed_before_the_weighted_step() -> None:
    """A norm's output is the next layer's input: alive when the backward pass starts, it must not
    be held by the norm's released call until the step ends (the Linear keeps its rows here)."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(4)
    model = nn.Sequential(norm, nn.Linear(4, 3))
    engine = Engine(model, batch_dim=0)
    inputs = torch.randn(2, 5, 4)
    hidden = norm(inputs)
    ref = weakref.ref(hidden)
    output = model[1](hidden).sum(dim=(1, 2))
    del hidden

    class Probe(Weighting[Tensor]):
        def forward(self, gramian: Tensor, /) -> Tensor:
            alive.append(ref() is not None)
            return torch.ones(gramian.shape[0])

    alive: list[bool] = []
    params = list(model.parameters())
    expected = torch.autograd.grad(output, params, torch.ones(2), retain_graph=True)
    assert ref() is not None
    engine.backward(output, Probe())
    assert alive == [False]
    _assert_grads_close(_snapshot(params), list(expected))
