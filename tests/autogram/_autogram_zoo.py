"""A zoo of model "settings" for the engine, and the slow, obviously-correct reference.

Each setting builds the engine's modules and a forward function returning the tensor to
differentiate. The reference differentiates every entry of that tensor with plain autograd, on
the same graph, w.r.t. every trainable parameter of the engine's modules, and lays the Gramian of
that Jacobian out as ``[m_1, ..., m_k, m_k, ..., m_1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Case:
    """What a setting builds.

    :param modules: The modules to give to the engine.
    :param forward: Runs a forward pass (with fresh inputs) and returns the tensor to differentiate.
    :param batch_dim: The batch dimension of that tensor, or ``None`` if samples interact.
    """

    modules: Sequence[nn.Module]
    forward: Callable[[], Tensor]
    batch_dim: int | None


@dataclass
class Setting:
    name: str
    build: Callable[[], Case]
    dtype: torch.dtype = torch.float32
    # The module type whose rule the engine needs; without it, the engine must refuse.
    needs_rule_for: type[nn.Module] | None = None
    slow: bool = False
    # Whether the per-sample structure holds (the case then has an int ``batch_dim``).
    batched: bool = True

    def __str__(self) -> str:
        return self.name


def trainable_parameters(modules: Sequence[nn.Module]) -> list[Tensor]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def reference_gramian(output: Tensor, params: Sequence[Tensor]) -> Tensor:
    """The generalized Gramian of the Jacobian of ``output`` w.r.t. ``params``, entry by entry."""
    flat = output.reshape(-1)
    rows = []
    for index in range(flat.numel()):
        grads = torch.autograd.grad(
            flat[index], params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        rows.append(torch.cat([grad.reshape(-1) for grad in grads]))
    jacobian = torch.stack(rows)
    gramian = jacobian @ jacobian.T
    shape = tuple(output.shape)
    ndim = len(shape)
    order = (*range(ndim), *reversed(range(ndim, 2 * ndim)))
    return gramian.reshape(shape + shape).permute(order)


# --------------------------------------------------------------------------------------------------
# Modules used by the settings.


class Scaled(nn.Module):
    """A direct parameter and a child: fallback for ``scale``, the Linear rule for the child."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3))
        self.child = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.child(x) * self.scale


class Shifted(nn.Module):
    """Returns its child's output as is: both calls end at the same autograd node."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(4))
        self.child = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.child(x + self.shift)


class PassesOwnParameter(nn.Module):
    """Passes its own parameter to a function of a child call."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.child = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.child(F.linear(x, self.weight))


class PytreeModule(nn.Module):
    """Dict and non-tensor arguments, keyword arguments, and a pytree output with non-tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 3)
        self.second = nn.Linear(4, 3)

    def forward(self, inputs: dict[str, Tensor], mode: str, *, scale: float = 1.0) -> Any:
        assert mode == "sum"
        a = self.first(inputs["a"]) * scale
        b = self.second(inputs["b"])
        return {"sum": a + b, "parts": [a, (b, "text")], "nothing": None}


class ReturnsNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.cache: Tensor | None = None

    def forward(self, x: Tensor) -> None:
        self.cache = self.lin(x)


class Dropped(nn.Module):
    """Dropout inside a module that owns its parameters: exact, since nothing is re-run."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x @ self.weight.T, p=0.5, training=True)


class OverridingLinear(nn.Linear):
    """A Linear subclass computing something else: the Linear rule must not be used."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input.sin(), self.weight * 2.0, self.bias)


class SideEffect(nn.Module):
    """Counts its calls: a side effect that must not be repeated by the engine."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.weight = nn.Parameter(torch.randn(3))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin(x) * self.weight * self.calls


class ReturnsTwice(nn.Module):
    """Returns the same tensor twice, and its input unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        y = torch.tanh(x @ self.weight.T)
        return y, {"again": y}, x


class TiedAutoencoder(nn.Module):
    """An embedding and an output projection sharing one weight (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.middle = nn.Linear(4, 4)
        self.projection = nn.Linear(4, 7, bias=False)
        self.projection.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.projection(torch.tanh(self.middle(self.embedding(tokens))))


# --------------------------------------------------------------------------------------------------
# Settings. Inputs are drawn inside ``forward`` so that each call runs a fresh forward pass.


def _mlp(inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=inplace), nn.Linear(4, 3))


def _vector() -> Case:
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))
    return Case([model], lambda: model(torch.randn(6, 5)).squeeze(1), 0)


def _matrix() -> Case:
    model = _mlp()
    return Case([model], lambda: model(torch.randn(6, 5)), 0)


def _inplace_relu() -> Case:
    model = _mlp(inplace=True)
    return Case([model], lambda: model(torch.randn(6, 5)).sum(dim=1), 0)


def _sequence_inplace() -> Case:
    model = _mlp(inplace=True)
    return Case([model], lambda: model(torch.randn(4, 5, 5)).sum(dim=(1, 2)), 0)


def _sequence_per_position() -> Case:
    model = nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 2))
    return Case([model], lambda: model(torch.randn(3, 4, 5))[..., 0], 0)


def _rank3_output() -> Case:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))
    return Case([model], lambda: model(torch.randn(4, 5)).reshape(4, 2, 3), 0)


def _batch_dim_1() -> Case:
    model = _mlp()
    return Case([model], lambda: model(torch.randn(5, 5)).T, 1)


def _batch_dim_negative() -> Case:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))
    return Case([model], lambda: model(torch.randn(4, 5)).reshape(4, 2, 3).permute(1, 2, 0), -1)


def _batch_dim_middle() -> Case:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))
    return Case([model], lambda: model(torch.randn(4, 5)).reshape(4, 2, 3).transpose(0, 1), 1)


def _reuse() -> Case:
    lin = nn.Linear(4, 4)

    def forward() -> Tensor:
        x = torch.randn(5, 4)
        return lin(torch.tanh(lin(x))).sum(dim=1)

    return Case([lin], forward, 0)


def _reuse_on_sequences() -> Case:
    lin = nn.Linear(4, 4)

    def forward() -> Tensor:
        return lin(torch.tanh(lin(torch.randn(3, 2, 4)))).sum(dim=(1, 2)) + lin(
            torch.randn(3, 4)
        ).sum(dim=1)

    return Case([lin], forward, 0)


def _unused_call() -> Case:
    model = _mlp()

    def forward() -> Tensor:
        model(torch.randn(6, 5))  # a call whose output never reaches the loss
        hidden = model[0](torch.randn(6, 5))
        model[2](torch.relu(hidden))  # unused as well
        return model[2](torch.relu(hidden)).sum(dim=1)

    return Case([model], forward, 0)


def _shared_module_in_sequential() -> Case:
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 2))
    return Case([model], lambda: model(torch.randn(5, 4)), 0)


def _tied_linears() -> Case:
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second)
    return Case([model], lambda: model(torch.randn(5, 4)).sum(dim=1), 0)


def _tied_embedding() -> Case:
    model = TiedAutoencoder()
    return Case([model], lambda: model(torch.randint(0, 7, (4, 3))).sum(dim=(1, 2)), 0)


def _frozen_weight() -> Case:
    model = _mlp()
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return Case([model], lambda: model(torch.randn(6, 5)), 0)


def _frozen_submodule() -> Case:
    model = _mlp()
    model[0].requires_grad_(False)
    return Case([model], lambda: model(torch.randn(6, 5)).sum(dim=1), 0)


def _partial() -> Case:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    return Case([model[2:]], lambda: model(torch.randn(6, 5)).squeeze(1), 0)


def _several_modules() -> Case:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    return Case([model[0], model[4]], lambda: model(torch.randn(6, 5)), 0)


def _nested_sequentials() -> Case:
    model = nn.Sequential(
        nn.Sequential(nn.Linear(5, 4), nn.Sequential(nn.Tanh(), nn.Linear(4, 4))),
        nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(4, 2))),
    )
    return Case([model], lambda: model(torch.randn(6, 5)), 0)


def _parent_with_direct_parameter() -> Case:
    model = nn.Sequential(Scaled(), nn.Tanh(), nn.Linear(3, 2))
    return Case([model], lambda: model(torch.randn(5, 4)).sum(dim=1), 0)


def _parent_returns_child_output() -> Case:
    model = nn.Sequential(nn.Linear(4, 4), Shifted(), nn.Tanh(), nn.Linear(3, 2))
    return Case([model], lambda: model(torch.randn(5, 4)).sum(dim=1), 0)


def _free_parameter_in_root() -> Case:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _mlp()
            self.temperature = nn.Parameter(torch.tensor(1.5))

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x) / self.temperature

    model = Root()
    return Case([model], lambda: model(torch.randn(6, 5)).sum(dim=1), 0)


def _passes_own_parameter() -> Case:
    model = PassesOwnParameter()
    return Case([model], lambda: model(torch.randn(5, 4)).sum(dim=1), 0)


def _pytree() -> Case:
    model = PytreeModule()

    def forward() -> Tensor:
        out = model({"a": torch.randn(5, 4), "b": torch.randn(5, 4)}, "sum", scale=2.0)
        return out["sum"].sum(dim=1) + out["parts"][1][0][:, 0]

    return Case([model], forward, 0)


def _returns_none() -> Case:
    model = ReturnsNone()

    def forward() -> Tensor:
        model(torch.randn(5, 4))
        assert model.cache is not None
        return model.cache.sum(dim=1)

    return Case([model], forward, 0)


def _returns_twice() -> Case:
    inner = nn.Linear(4, 4)
    model = ReturnsTwice()

    def forward() -> Tensor:
        y, again, x = model(inner(torch.randn(5, 4)))
        return (y * again["again"]).sum(dim=1) + x.sum(dim=1)

    return Case([inner, model], forward, 0)


def _dropout_with_parameters() -> Case:
    model = nn.Sequential(Dropped(), nn.Tanh(), nn.Linear(3, 2), nn.Dropout(0.5))
    return Case([model], lambda: model(torch.randn(6, 4)), 0)


def _overriding_linear() -> Case:
    model = nn.Sequential(OverridingLinear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    return Case([model], lambda: model(torch.randn(5, 4)), 0)


def _side_effect() -> Case:
    model = SideEffect()
    return Case([model], lambda: model(torch.randn(5, 4)).sum(dim=1), 0)


def _bilinear() -> Case:
    model = nn.Bilinear(3, 4, 2)
    return Case([model], lambda: model(torch.randn(5, 3), torch.randn(5, 4)), 0)


def _single_sample() -> Case:
    model = _mlp()
    return Case([model], lambda: model(torch.randn(1, 5)), 0)


def _float64_mlp() -> Case:
    model = nn.Sequential(nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 3)).double()
    return Case([model], lambda: model(torch.randn(6, 5, dtype=torch.float64)), 0)


def _float64_conv_and_sequences() -> Case:
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3),
        nn.Tanh(),
        nn.Flatten(start_dim=1),
        nn.Unflatten(1, (3, 3)),
        nn.Linear(3, 4),
        nn.ReLU(inplace=True),
        nn.Linear(4, 2),
    ).double()
    return Case([model], lambda: model(torch.randn(4, 2, 5, dtype=torch.float64)).sum(dim=1), 0)


def _mse_losses() -> Case:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    criterion = nn.MSELoss(reduction="none")
    return Case([model], lambda: criterion(model(torch.randn(8, 5)).squeeze(1), torch.randn(8)), 0)


def _scalar() -> Case:
    model = _mlp()
    return Case([model], lambda: model(torch.randn(6, 5)).pow(2).mean(), None)


def _iwmtl() -> Case:
    trunk = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])

    def forward() -> Tensor:
        features = trunk(torch.randn(6, 5))
        return torch.cat([head(features) for head in heads], dim=1) ** 2

    return Case([trunk], forward, 0)


def _conv2d() -> Case:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2, groups=1, dilation=1),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 2),
    )
    return Case([model], lambda: model(torch.randn(4, 2, 6, 6)), 0)


def _conv1d_grouped() -> Case:
    model = nn.Sequential(
        nn.Conv1d(4, 4, 3, groups=2, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1)
    )
    return Case([model], lambda: model(torch.randn(5, 4, 7)).squeeze(1), 0)


def _embedding() -> Case:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(self.embedding(tokens).mean(dim=1))

    model = Bag()
    return Case([model], lambda: model(torch.randint(0, 10, (5, 6))), 0)


def _layer_and_group_norm() -> Case:
    model = nn.Sequential(
        nn.Linear(6, 6),
        nn.LayerNorm(6),
        nn.Unflatten(1, (3, 2)),
        nn.GroupNorm(3, 3),
        nn.Flatten(),
        nn.Linear(6, 1),
    )
    return Case([model], lambda: model(torch.randn(5, 6)).squeeze(1), 0)


def _instance_norm() -> Case:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 1),
    )
    return Case([model], lambda: model(torch.randn(4, 2, 5, 5)).squeeze(1), 0)


def _batch_norm_eval() -> Case:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model.train()
    model(torch.randn(8, 5))  # populate the running statistics
    model.eval()
    return Case([model], lambda: model(torch.randn(6, 5)), 0)


def _batch_norm_train() -> Case:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    return Case([model], lambda: model(torch.randn(6, 5)), None)


def _batch_norm_before_covered() -> Case:
    # Samples interact before the engine's modules only: per-sample structure still holds.
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    return Case([model[1:]], lambda: model(torch.randn(6, 5)), 0)


def _mha() -> Case:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:
            out, _ = self.attention(x, x, x, need_weights=False)
            return self.head(out).sum(dim=(1, 2))

    model = Attention()
    return Case([model], lambda: model(torch.randn(3, 4, 4)), 0)


def _transformer_layer() -> Case:
    model = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    return Case([model], lambda: model(torch.randn(3, 4, 4)).sum(dim=(1, 2)), 0)


def _rnn(kind: type[nn.RNNBase]) -> Callable[[], Case]:
    def build() -> Case:
        rnn = kind(3, 4, batch_first=True)
        head = nn.Linear(4, 1)

        def forward() -> Tensor:
            out, _ = rnn(torch.randn(3, 5, 3))
            return head(out).sum(dim=(1, 2))

        return Case([rnn, head], forward, 0)

    return build


def _lstm_classifier() -> Case:
    # The final hidden state has its samples on dim 1: the classifier reads the last layer's.
    lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)
    head = nn.Linear(4, 2)

    def forward() -> Tensor:
        _, (h_n, _) = lstm(torch.randn(3, 5, 3))
        return F.cross_entropy(head(h_n[-1]), torch.tensor([0, 1, 1]), reduction="none")

    return Case([lstm, head], forward, 0)


def _gru_both_outputs() -> Case:
    gru = nn.GRU(3, 4, batch_first=True, bidirectional=True)
    head = nn.Linear(8, 1)

    def forward() -> Tensor:
        out, h_n = gru(torch.randn(3, 5, 3))
        return head(out).sum(dim=(1, 2)) + (h_n**2).sum(dim=(0, 2))

    return Case([gru, head], forward, 0)


def _parametrized() -> Case:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    torch.nn.utils.parametrizations.weight_norm(model[2])
    return Case([model], lambda: model(torch.randn(5, 4)), None)


SETTINGS = [
    Setting("vector", _vector),
    Setting("matrix", _matrix),
    Setting("inplace_relu", _inplace_relu),
    Setting("sequence_inplace", _sequence_inplace),
    Setting("sequence_per_position", _sequence_per_position),
    Setting("rank3_output", _rank3_output),
    Setting("batch_dim_1", _batch_dim_1),
    Setting("batch_dim_negative", _batch_dim_negative),
    Setting("batch_dim_middle", _batch_dim_middle),
    Setting("reuse", _reuse),
    Setting("reuse_on_sequences", _reuse_on_sequences),
    Setting("unused_call", _unused_call),
    Setting("shared_module_in_sequential", _shared_module_in_sequential),
    Setting("tied_linears", _tied_linears),
    Setting("tied_embedding", _tied_embedding),
    Setting("frozen_weight", _frozen_weight),
    Setting("frozen_submodule", _frozen_submodule),
    Setting("partial", _partial),
    Setting("several_modules", _several_modules),
    Setting("nested_sequentials", _nested_sequentials),
    Setting("parent_with_direct_parameter", _parent_with_direct_parameter),
    Setting("parent_returns_child_output", _parent_returns_child_output),
    Setting("free_parameter_in_root", _free_parameter_in_root),
    Setting("passes_own_parameter", _passes_own_parameter),
    Setting("pytree", _pytree),
    Setting("returns_none", _returns_none),
    Setting("returns_twice", _returns_twice),
    Setting("dropout_with_parameters", _dropout_with_parameters),
    Setting("overriding_linear", _overriding_linear),
    Setting("side_effect", _side_effect),
    Setting("bilinear", _bilinear),
    Setting("single_sample", _single_sample),
    Setting("float64_mlp", _float64_mlp, dtype=torch.float64),
    Setting("float64_conv_and_sequences", _float64_conv_and_sequences, dtype=torch.float64),
    Setting("mse_losses", _mse_losses),
    Setting("scalar", _scalar, batched=False),
    Setting("iwmtl", _iwmtl),
    Setting("conv2d", _conv2d),
    Setting("conv1d_grouped", _conv1d_grouped),
    Setting("embedding", _embedding),
    Setting("layer_and_group_norm", _layer_and_group_norm),
    Setting("instance_norm", _instance_norm),
    Setting("batch_norm_eval", _batch_norm_eval),
    Setting("batch_norm_train", _batch_norm_train, batched=False),
    Setting("batch_norm_before_covered", _batch_norm_before_covered),
    Setting("mha", _mha, needs_rule_for=nn.MultiheadAttention),
    Setting("transformer_layer", _transformer_layer, needs_rule_for=nn.MultiheadAttention),
    Setting("rnn", _rnn(nn.RNN)),
    Setting("gru", _rnn(nn.GRU)),
    Setting("lstm", _rnn(nn.LSTM)),
    Setting("lstm_classifier", _lstm_classifier),
    Setting("gru_both_outputs", _gru_both_outputs),
    Setting("parametrized", _parametrized, batched=False),
]
