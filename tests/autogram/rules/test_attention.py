from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _rule_reference import Use, assert_rule_matches, record_calls, reference_rows, trainable
from torch import Tensor, nn

from torchjd.autogram._rules import Call, find_rule
from torchjd.autogram._rules._attention import MultiheadAttentionRule

F64 = torch.float64


def _slicer(heads: int) -> Callable[[Call, int], tuple[tuple[Any, ...], dict[str, Any]]]:
    """One sample of a batch-first call; a 3-D ``attn_mask`` holds ``heads`` rows per sample."""

    def slice_sample(call: Call, sample: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args = tuple(arg[sample : sample + 1] for arg in call.args)
        kwargs = dict(call.kwargs)
        if kwargs.get("key_padding_mask") is not None:
            kwargs["key_padding_mask"] = kwargs["key_padding_mask"][sample : sample + 1]
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.ndim == 3:
            kwargs["attn_mask"] = mask[sample * heads : (sample + 1) * heads]
        return args, kwargs

    return slice_sample


def _causal(length: int, source: int) -> Tensor:
    return torch.ones(length, source, dtype=torch.bool).triu(1)


def _case(index: int, batch: int, generator: torch.Generator) -> tuple[nn.Module, list[Use]]:
    """A module and its uses; the inputs depend on the configuration."""
    torch.manual_seed(index)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=F64)

    if index == 0:  # self-attention, weights returned (and differentiated)
        module = nn.MultiheadAttention(8, 2, batch_first=True)
        x = randn(batch, 5, 8).requires_grad_()  # as if an earlier layer had made it
        uses = [Use((x, x, x))]
    elif index == 1:  # cross-attention with kdim/vdim, no weights
        module = nn.MultiheadAttention(8, 4, kdim=5, vdim=3, batch_first=True)
        uses = [Use((randn(batch, 4, 8), randn(batch, 6, 5), randn(batch, 6, 3)),
                    {"need_weights": False})]  # fmt: skip
    elif index == 2:  # bias_k/bias_v, no bias, key is value, boolean key padding mask
        module = nn.MultiheadAttention(6, 2, bias=False, add_bias_kv=True, batch_first=True)
        kv = randn(batch, 5, 6)
        padding = torch.zeros(batch, 5, dtype=torch.bool)
        padding[:, -2:] = True
        uses = [Use((randn(batch, 3, 6), kv, kv), {"key_padding_mask": padding})]
    elif index == 3:  # zero attention, float masks, per-head weights
        module = nn.MultiheadAttention(8, 2, add_bias_kv=True, add_zero_attn=True,
                                       batch_first=True)  # fmt: skip
        x = randn(batch, 4, 8)
        kwargs = {
            "attn_mask": randn(4, 4),
            "key_padding_mask": randn(batch, 4),
            "average_attn_weights": False,
        }
        uses = [Use((x, x, x), kwargs)]
    elif index == 4:  # causal hint, used twice (module reuse) with different lengths
        module = nn.MultiheadAttention(4, 1, batch_first=True)
        first, second = randn(batch, 4, 4), randn(batch, 3, 4)
        uses = [
            Use((first, first, first),
                {"attn_mask": _causal(4, 4), "is_causal": True, "need_weights": False}),
            Use((second, second, second), {"attn_mask": _causal(3, 3)}),
        ]  # fmt: skip
    else:  # a per-sample, per-head boolean mask; out_proj frozen
        module = nn.MultiheadAttention(6, 3, batch_first=True)
        module.out_proj.requires_grad_(False)
        x = randn(batch, 4, 6)
        mask = torch.rand(batch * 3, 4, 4, generator=generator) < 0.3
        mask[:, :, 0] = False  # every query attends to something
        uses = [Use((x, x, x), {"attn_mask": mask, "need_weights": False})]
    return module.double(), uses


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("batched", [True, False])
def test_matches_reference(index: int, batched: bool) -> None:
    generator = torch.Generator().manual_seed(index)
    batch, seeds = (3, 2) if index % 2 else (2, 1)
    module, uses = _case(index, batch, generator)
    calls = record_calls(module, uses, seeds, generator)
    rule = find_rule(module)
    assert isinstance(rule, MultiheadAttentionRule)
    params = trainable(module, rule)

    expected = reference_rows(module, calls, params, batched, _slicer(module.num_heads))
    assert_rule_matches(rule, module, calls, params, batched, expected, generator, 1e-8, 1e-9)


@pytest.mark.parametrize("unbatched", [True, False])
def test_batch_first_false_and_unbatched_in_summed_mode(unbatched: bool) -> None:
    torch.manual_seed(0)
    module = nn.MultiheadAttention(6, 2, kdim=4, vdim=4, add_bias_kv=True).double()
    generator = torch.Generator().manual_seed(1)
    batch_shape = () if unbatched else (3,)
    query = torch.randn(5, *batch_shape, 6, generator=generator, dtype=F64)
    key = torch.randn(4, *batch_shape, 4, generator=generator, dtype=F64)
    padding = torch.tensor([False, False, True, False]).expand(*batch_shape, 4)
    calls = record_calls(module, [Use((query, key, key), {"key_padding_mask": padding})], 2,
                         generator)  # fmt: skip
    rule = MultiheadAttentionRule()
    params = trainable(module, rule)
    expected = reference_rows(module, calls, params, False)
    assert_rule_matches(rule, module, calls, params, False, expected, generator, 1e-8, 1e-9)
    with pytest.raises(ValueError, match="batch_first=True"):
        rule.check(module, batched=True)
    with pytest.raises(ValueError, match="batch_first=True"):
        rule.gramian(module, calls, params, batched=True)


def test_covers_out_proj_parameters() -> None:
    module = nn.MultiheadAttention(4, 2, add_bias_kv=True)
    covered = MultiheadAttentionRule().covered_parameters(module)
    assert set(covered) == {
        "in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj.weight", "out_proj.bias"
    }  # fmt: skip
    assert covered["out_proj.weight"] is module.out_proj.weight


@pytest.mark.parametrize("form", ["ghost", "per_sample"])
def test_float32_self_attention_with_each_form(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each form, also for the stacked q, k, v projections of self-attention (the per-sample
    form sums the projections' Grams, the ghost form concatenates their gradients)."""
    import torchjd.autogram._rules._attention as attention
    from torchjd.autogram._rules._ghost import ghost_gramian, per_sample_gramian

    ghost = form == "ghost"
    monkeypatch.setattr(attention, "weight_gramian", ghost_gramian if ghost else per_sample_gramian)
    monkeypatch.setattr(attention, "ghost_cost", lambda terms, batched: 0 if ghost else 1)
    monkeypatch.setattr(attention, "per_sample_cost", lambda terms, batched: 1 if ghost else 0)
    torch.manual_seed(0)
    module = nn.MultiheadAttention(8, 2, batch_first=True)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, generator=generator)
    y = torch.randn(3, 2, 8, generator=generator)
    uses = [Use((x, x, x)), Use((y, x, x), {"need_weights": False})]
    calls = record_calls(module, uses, 2, generator)
    params = trainable(module, MultiheadAttentionRule())
    for batched in (True, False):
        expected = reference_rows(module, calls, params, batched, _slicer(2))
        assert_rule_matches(
            MultiheadAttentionRule(), module, calls, params, batched, expected, generator, 1e-4,
            1e-5,
        )  # fmt: skip


def _reseed(*_: Any) -> None:
    torch.manual_seed(123)


@pytest.mark.parametrize("batched", [True, False])
def test_dropout_in_training_mode_uses_the_recorded_graph(batched: bool) -> None:
    torch.manual_seed(0)
    module = nn.MultiheadAttention(6, 2, dropout=0.5, batch_first=True).double()
    # The same dropout masks at every forward, so that the reference can re-run the module.
    module.register_forward_pre_hook(_reseed)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 6, generator=generator, dtype=F64)
    calls = record_calls(module, [Use((x, x, x))], 2, generator)
    rule = find_rule(module)
    assert isinstance(rule, MultiheadAttentionRule)
    params = trainable(module, rule)
    # A row re-runs the whole batch (same masks) and keeps one sample's output gradients.
    expected = reference_rows(module, calls, params, batched, rerun_per_sample=False)
    assert_rule_matches(rule, module, calls, params, batched, expected, generator, 1e-8, 1e-9)


class _TwoSelfAttentions(nn.Module):
    """Self-attention used twice in a row (module reuse), the second time returning its weights."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=batch_first)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            shape = x.shape[:1]  # unbatched: [S]
        else:
            shape = x.shape[:2] if self.attention.batch_first else x.shape[1::-1]  # [B, S]
        padding = torch.zeros(shape, dtype=torch.bool)
        padding[..., -1] = True
        hidden, _ = self.attention(x, x, x, need_weights=False, key_padding_mask=padding)
        out, weights = self.attention(hidden, hidden, hidden, need_weights=True)
        mean_weights = weights.sum(dim=-1).sum(dim=-1, keepdim=True)
        return self.head(out).sum(dim=-2 if self.attention.batch_first else 0) * mean_weights


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


@pytest.mark.parametrize(
    "case",
    [
        "encoder",
        "encoder_causal",
        "encoder_checkpointed",
        "reused_with_weights",
        "weights_only",
        "seq_first_summed",
        "unbatched",
    ],
)
@pytest.mark.parametrize("keep_rows", [False, True])
def test_engine_reads_self_attention_from_the_graph(
    case: str, keep_rows: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine takes the gradients of the packed q, k, v projection from its own backward pass
    (the core is never recomputed) and gets the Gramian and the fused gradients right, whether the
    fused step keeps the rows or the inputs and gradients. Unbatched inputs are projected by three
    products (``multi_head_attention_forward`` unsqueezes q, k and v separately): the rule then
    recomputes the core."""
    import torchjd.autogram._rules._attention as attention
    import torchjd.autogram._rules._common as common
    from torchjd.aggregation import Flattening, UPGradWeighting
    from torchjd.autogram import Engine

    factor = float("inf") if keep_rows else 0.0
    monkeypatch.setattr(common, "KEPT_ROWS_FACTOR", factor)
    if keep_rows:  # rows are only materialised by the per-sample form
        monkeypatch.setattr(attention, "ghost_cost", lambda terms, batched: 1)
        monkeypatch.setattr(attention, "per_sample_cost", lambda terms, batched: 0)
    kept: list[bool] = []
    consumed_rows = attention._consumed_rows

    def spy(*args: Any) -> dict[str, Tensor]:
        kept.append(True)
        return consumed_rows(*args)

    monkeypatch.setattr(attention, "_consumed_rows", spy)

    def no_recomputation(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the attention core was recomputed")

    if case != "unbatched":
        monkeypatch.setattr(attention, "_attend", no_recomputation)
    torch.manual_seed(0)
    batch_dim: int | None = 0
    if case.startswith("encoder"):
        model = _encoder().double()
        x = torch.randn(3, 5, 8, dtype=F64)
        mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=F64)
        kwargs = {"mask": mask, "is_causal": True} if case == "encoder_causal" else {}

        def forward() -> Tensor:
            if case == "encoder_checkpointed":  # the saved tensors are recomputed when read
                output = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
            else:
                output = model(x, **kwargs)
            return output.sum(dim=1)  # [B, 8]: 8 seeds

    elif case == "reused_with_weights":
        model = _TwoSelfAttentions(batch_first=True).double()
        x = torch.randn(3, 4, 6, dtype=F64)

        def forward() -> Tensor:
            return model(x)  # [B, 2]

    elif case == "weights_only":  # out_proj's parameters do not reach the output
        model = nn.MultiheadAttention(6, 2, batch_first=True).double()
        x = torch.randn(3, 4, 6, dtype=F64)

        def forward() -> Tensor:
            _, weights = model(x, x, x)
            return (weights**2).sum(dim=2)  # [B, 4]

    else:
        model = _TwoSelfAttentions(batch_first=False).double()
        batch_dim = None
        x = torch.randn(4, 6, dtype=F64) if case == "unbatched" else torch.randn(4, 3, 6, dtype=F64)

        def forward() -> Tensor:
            return model(x)

    engine = Engine(model, batch_dim=batch_dim)
    params = [p for p in model.parameters() if p.requires_grad]
    output = forward()
    expected = _reference_gramian(output, params)
    assert torch.allclose(engine.compute_gramian(output), expected, rtol=1e-9, atol=1e-10)

    weighting = Flattening(UPGradWeighting())
    output = forward()
    weights = engine.backward(output, weighting)
    fused = [p.grad for p in params]
    for p in params:
        p.grad = None
    forward().backward(weights)
    for got, want in zip(fused, [p.grad for p in params]):
        assert (got is None) == (want is None)  # out_proj's, when only the weights are used
        if got is not None and want is not None:
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-10)
    assert bool(kept) == (keep_rows and case != "unbatched")


def _reference_gramian(output: Tensor, params: list[Tensor]) -> Tensor:
    flat = output.reshape(-1)
    rows = []
    for index in range(flat.numel()):
        grads = torch.autograd.grad(flat[index], params, retain_graph=True, allow_unused=True,
                                    materialize_grads=True)  # fmt: skip
        rows.append(torch.cat([grad.reshape(-1) for grad in grads]))
    jacobian = torch.stack(rows)
    gramian = jacobian @ jacobian.T
    shape = tuple(output.shape)
    order = (*range(len(shape)), *reversed(range(len(shape), 2 * len(shape))))
    return gramian.reshape(shape + shape).permute(order)


def test_engine_ignores_attention_calls_whose_graph_was_freed() -> None:
    """Calls recorded during a forward pass that an ordinary backward consumed are not reached by
    the engine's next backward pass: reading their graph must not fail."""
    from torchjd.aggregation import MeanWeighting
    from torchjd.autogram import Engine

    torch.manual_seed(0)
    model = _encoder().double()
    engine = Engine(model, batch_dim=0)
    x = torch.randn(3, 5, 8, dtype=F64)
    model(x).sum().backward()  # recorded by the engine's hooks, graph freed
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    output = model(x).sum(dim=(1, 2))
    expected = torch.autograd.grad(output, params, torch.full((3,), 1 / 3, dtype=F64),
                                   retain_graph=True)  # fmt: skip
    engine.backward(output, MeanWeighting())
    for p, want in zip(params, expected):
        assert p.grad is not None
        assert torch.allclose(p.grad, want, rtol=1e-9, atol=1e-10)
