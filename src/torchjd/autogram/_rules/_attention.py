"""Gramian rule of ``nn.MultiheadAttention``.

Multi-head attention is four linear maps around a parameter-free core:
``q, k, v = query W_qᵀ + b_q, key W_kᵀ + b_k, value W_vᵀ + b_v``, then
``o = attention(q, k, v)`` (heads, ``bias_k``/``bias_v``, zero attention, masks) and
``y = o W_oᵀ + b_o``. The rule recomputes the cheap internals ``q, k, v, o`` from the saved inputs
(never calling the module), back-propagates the output gradients through the core once per seed
to get ``∂/∂q, ∂/∂k, ∂/∂v``, and each projection is then a Linear map on a sequence: the ghost and
per-sample forms of :mod:`._ghost` give its Gramian. ``out_proj``'s parameters are covered too,
since the module uses them without calling ``out_proj``. The fused step back-propagates through
the core once: the weighted gradients combine, by the weights, the per-seed gradients that the
Gramian used (every gradient is linear in the output gradients).

In the engine, for self-attention with the packed projection (the common case, e.g.
``nn.TransformerEncoderLayer``), nothing is recomputed: before its backward pass the rule finds,
in the graph that the call recorded, the product of the packed ``q, k, v`` projection and that of
``out_proj``; the engine's backward pass then gives the gradients of the projected ``q, k, v``
directly (the core is back-propagated once, as in an ordinary step), and ``out_proj``'s input is
the one autograd saved.

With dropout in training mode the attention probabilities are random and cannot be recomputed:
the rule then takes vector-Jacobian products on the recorded graph instead (exact, slower).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node

from ._base import Call, GramianRule
from ._common import (
    bound_arguments,
    check_params,
    check_weights,
    combine_per_sample,
    common_batch_size,
    gram,
    gramian_and_weighted_rows,
    keeps_rows,
    leading_axes,
    seed_count,
    tensor_outputs,
)
from ._fallback import recorded_rows, recorded_weighted_gradients
from ._ghost import (
    SequenceTerm,
    bias_per_sample,
    ghost_cost,
    ghost_gramian,
    per_sample_cost,
    per_sample_gramian,
    weight_gramian,
    weight_per_sample,
)
from ._registry import register_rule

_PROJECTIONS = ("q", "k", "v")


@dataclass(eq=False)
class _AttentionUse:
    """One call, batch first: inputs, recomputed internals and gradients ``[K, B, ·, E]``."""

    inputs: dict[str, Tensor]  # "q", "k", "v": query, key, value ([B, L or S, E_in])
    input_grads: dict[str, Tensor]  # gradients of the projected q, k, v
    attended: Tensor | None  # o, the input of the output projection, [B, L, E]
    output_grads: Tensor | None  # gradients of y, [K, B, L, E]
    bias_kv_grads: dict[str, Tensor]  # "bias_k", "bias_v": [K, B, 1, E]
    same_inputs: tuple[bool, bool]  # (query is key, key is value)
    # The gradients of q, k and v side by side, [K, B, L, 3E], when they come that way.
    stacked_grads: Tensor | None = None
    # Whether the tensors are batch-first views of sequence-first ones (found in the graph).
    sequence_first: bool = False


def _canonical(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Boolean masks as additive float masks, as ``multi_head_attention_forward`` does."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _attend(
    module: nn.MultiheadAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_kv: tuple[Tensor, Tensor] | None,
    arguments: dict[str, Any],
    batch_first_masks: tuple[Tensor | None, Tensor | None],
) -> tuple[Tensor, Tensor | None]:
    """The attention core of ``multi_head_attention_forward`` (dropout off), batch first.

    Returns ``o`` (``[B, L, E]``, heads concatenated) and the attention weights when requested.
    """
    batch, target, embed = q.shape
    heads = module.num_heads
    head_dim = embed // heads
    attn_mask, key_padding_mask = batch_first_masks
    need_weights = bool(arguments["need_weights"])
    # Like torch: a causal hint replaces the mask only when nothing else needs an explicit mask.
    causal = bool(arguments["is_causal"]) and key_padding_mask is None and not need_weights
    if causal:
        attn_mask = None
    if bias_kv is not None:
        k = torch.cat([k, bias_kv[0]], dim=1)
        v = torch.cat([v, bias_kv[1]], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q_heads = q.view(batch, target, heads, head_dim).transpose(1, 2)
    k_heads = k.view(batch, k.shape[1], heads, head_dim).transpose(1, 2)
    v_heads = v.view(batch, v.shape[1], heads, head_dim).transpose(1, 2)
    if module.add_zero_attn:
        zeros = k_heads.new_zeros(batch, heads, 1, head_dim)
        k_heads = torch.cat([k_heads, zeros], dim=2)
        v_heads = torch.cat([v_heads, zeros], dim=2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    source = k_heads.shape[2]
    mask: Tensor | None = None
    if attn_mask is not None:
        # [L, S] is shared by every sample and head; [B * H, L, S] is per sample and head.
        shared = attn_mask.ndim == 2
        mask = attn_mask.view(1 if shared else batch, 1 if shared else heads, target, source)
    if key_padding_mask is not None:
        padding = key_padding_mask.view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    if need_weights:
        scores = (q_heads * math.sqrt(1.0 / head_dim)) @ k_heads.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        probabilities = torch.softmax(scores, dim=-1)
        attended = probabilities @ v_heads
        weights = probabilities.mean(dim=1) if arguments["average_attn_weights"] else probabilities
    else:
        attended = F.scaled_dot_product_attention(
            q_heads, k_heads, v_heads, attn_mask=mask, is_causal=causal
        )
        weights = None
    return attended.transpose(1, 2).reshape(batch, target, embed), weights


def _projection_weights(module: nn.MultiheadAttention) -> dict[str, Tensor]:
    if module.in_proj_weight is not None:
        return dict(zip(_PROJECTIONS, module.in_proj_weight.chunk(3)))
    return {"q": module.q_proj_weight, "k": module.k_proj_weight, "v": module.v_proj_weight}


def _use_of(module: nn.MultiheadAttention, call: Call, batched: bool) -> _AttentionUse | None:
    pairs = tensor_outputs(call)
    output_grads = pairs[0][1]
    weights_grads = pairs[1][1] if len(pairs) > 1 else None
    if output_grads is None and weights_grads is None:
        return None
    arguments = bound_arguments(module, call)
    query, key, value = arguments["query"], arguments["key"], arguments["value"]
    same_inputs = (query is key, key is value)
    key_padding_mask = _canonical(arguments["key_padding_mask"], query.dtype)
    attn_mask = _canonical(arguments["attn_mask"], query.dtype)
    if query.ndim == 2:
        if batched:
            raise ValueError(
                "Expected the query of MultiheadAttention to be batched on dim 0 when "
                f"`batch_dim` is not None; found an unbatched query of shape {tuple(query.shape)}."
            )
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        output_grads = None if output_grads is None else output_grads.unsqueeze(1)
        weights_grads = None if weights_grads is None else weights_grads.unsqueeze(1)
    elif not module.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        output_grads = None if output_grads is None else output_grads.transpose(1, 2)
    batch = query.shape[0]
    inputs = {"q": query, "k": key, "v": value}
    from_graph = _use_from_graph(module, call, inputs, output_grads)
    if from_graph is not None:
        return from_graph
    weights = _projection_weights(module)
    biases = (
        dict(zip(_PROJECTIONS, module.in_proj_bias.detach().chunk(3)))
        if module.in_proj_bias is not None
        else dict.fromkeys(_PROJECTIONS)
    )
    with torch.enable_grad():
        # Leaves: the backward below stops at q, k, v and never enters the caller's graph.
        projected = {
            name: F.linear(
                inputs[name].detach(), weights[name].detach(), biases[name]
            ).requires_grad_()
            for name in _PROJECTIONS
        }
        bias_kv: dict[str, Tensor] = {}
        if module.bias_k is not None and module.bias_v is not None:
            # One copy per sample, so that their gradients stay per sample.
            for name, bias in (("bias_k", module.bias_k), ("bias_v", module.bias_v)):
                bias_kv[name] = bias.detach().expand(batch, 1, -1).clone().requires_grad_()
        attended, attention_weights = _attend(
            module,
            projected["q"],
            projected["k"],
            projected["v"],
            (bias_kv["bias_k"], bias_kv["bias_v"]) if bias_kv else None,
            arguments,
            (attn_mask, key_padding_mask),
        )
        targets: list[Tensor] = []
        target_grads: list[Tensor] = []
        if output_grads is not None:
            targets.append(attended)
            target_grads.append(output_grads @ module.out_proj.weight.detach())
        if weights_grads is not None and attention_weights is not None:
            targets.append(attention_weights)
            target_grads.append(weights_grads)
        sources = [projected[name] for name in _PROJECTIONS] + list(bias_kv.values())
        seeds = target_grads[0].shape[0]
        per_seed = [
            torch.autograd.grad(
                targets,
                sources,
                grad_outputs=[grad[seed] for grad in target_grads],
                retain_graph=seed < seeds - 1,
                allow_unused=True,
                materialize_grads=True,
            )
            for seed in range(seeds)
        ]
    # One seed: a view, not a copy, of the gradients.
    source_grads = [
        column[0].unsqueeze(0) if seeds == 1 else torch.stack(column) for column in zip(*per_seed)
    ]
    return _AttentionUse(
        inputs=inputs,
        input_grads=dict(zip(_PROJECTIONS, source_grads[:3])),
        attended=attended.detach() if output_grads is not None else None,
        output_grads=output_grads,
        bias_kv_grads=dict(zip(bias_kv, source_grads[3:])),
        same_inputs=same_inputs,
    )


# Most nodes visited in the graph of one call when looking for its projections.
_MAX_NODES = 256


def _read_graph(module: nn.MultiheadAttention, call: Call) -> None:
    """Find the packed ``q, k, v`` projection and ``out_proj`` in the graph of ``call``.

    Self-attention with the packed projection and without ``bias_k``/``bias_v`` only (their rows
    would need the gradients of the concatenation): ``multi_head_attention_forward`` then projects
    its sequence-first input with one product by ``in_proj_weight`` and the attention output with
    one product by ``out_proj.weight``. Sets the gradient edge of the first product's result and
    the input that autograd saved for the second; leaves the call untouched if the graph does not
    have exactly one of each.
    """
    if module.in_proj_weight is None or module.bias_k is not None or _random(module):
        return
    arguments = bound_arguments(module, call)
    if not (arguments["query"] is arguments["key"] is arguments["value"]):
        return
    found: dict[str, list[Node]] = {"in_proj": [], "out_proj": []}
    weights = {"in_proj": module.in_proj_weight, "out_proj": module.out_proj.weight}
    stack = [edge.node for edge in call.output_edges if edge is not None]
    seen: set[Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > _MAX_NODES:
            return
        name = _product_by(node, weights)
        if name is not None:
            found[name].append(node)
            if name == "in_proj":
                continue  # its input comes from before the call
        stack.extend(child for child, _ in node.next_functions if child is not None)
    if len(found["in_proj"]) != 1 or len(found["out_proj"]) != 1:
        return
    attended = _saved_input(found["out_proj"][0])
    if attended is None:
        return
    call.internal_edges["in_proj"] = GradientEdge(found["in_proj"][0], 0)
    call.saved["attended"] = attended


def _saved_input(node: Node) -> Tensor | None:
    """The matrix ``x`` that a node of ``x @ weightᵀ`` saved (its rows are the positions).

    ``None`` when the graph was already freed (a call recorded during a forward pass that
    something else differentiated, which the engine's backward pass will not reach).
    """
    for name in ("_saved_mat1", "_saved_self"):
        try:
            saved = getattr(node, name, None)
        except RuntimeError:
            return None
        if isinstance(saved, Tensor):
            return saved
    return None


def _product_by(node: Node, weights: dict[str, Tensor]) -> str | None:
    """The name of the weight that ``node`` multiplies by (``x @ weightᵀ``), if any."""
    if node.name() not in ("AddmmBackward0", "MmBackward0"):
        return None
    for child, _ in node.next_functions:
        if child is None or child.name() != "TBackward0":
            continue
        leaf = child.next_functions[0][0]
        variable = getattr(leaf, "variable", None)
        for name, weight in weights.items():
            if variable is weight:
                return name
    return None


def _use_from_graph(
    module: nn.MultiheadAttention,
    call: Call,
    inputs: dict[str, Tensor],
    output_grads: Tensor | None,
) -> _AttentionUse | None:
    """The use from what the engine's backward pass found inside the call, if it did."""
    grads = call.internal_grads.get("in_proj")
    attended = call.saved.get("attended")
    if grads is None or attended is None:
        return None
    batch, target, embed = inputs["q"].shape
    seeds, positions = grads.shape[0], target * batch
    # Sequence-first rows: position t of sample i is row t * B + i.
    if grads.shape != (seeds, positions, 3 * embed) or attended.shape != (positions, embed):
        return None
    # Batch-first views of the sequence-first tensors: no copy.
    stacked = grads.view(seeds, target, batch, 3 * embed).transpose(1, 2)
    return _AttentionUse(
        inputs=inputs,
        input_grads=dict(zip(_PROJECTIONS, stacked.split(embed, dim=-1))),
        attended=(
            None if output_grads is None else attended.view(target, batch, embed).transpose(0, 1)
        ),
        output_grads=output_grads,
        bias_kv_grads={},
        same_inputs=(True, True),
        stacked_grads=stacked,
        sequence_first=True,
    )


def _as_grouped(grads: Tensor) -> Tensor:
    """Gradients ``[K, B, T, b]`` in the layout of :mod:`._ghost`, ``[K, B, 1, b, T]`` (a view)."""
    return grads.transpose(2, 3).unsqueeze(2)


def _term(inputs: Tensor, grads: Tensor) -> SequenceTerm:
    """A projection as a sequence term: inputs ``[B, T, a]``, gradients ``[K, B, T, b]``."""
    return SequenceTerm(inputs.transpose(1, 2).unsqueeze(1), _as_grouped(grads))


def _projection_terms(uses: Sequence[_AttentionUse], names: Sequence[str]) -> list[SequenceTerm]:
    """Terms of the projections ``names`` stacked along their output features.

    Valid when the projections read the same input (self-attention): their weights are then
    stacked rows of one matrix applied to that input, one term instead of several.
    """
    terms = []
    for use in uses:
        grads = [use.input_grads[name] for name in names]
        if len(grads) == 1:
            stacked = grads[0]
        elif tuple(names) == _PROJECTIONS and use.stacked_grads is not None:
            stacked = use.stacked_grads
        else:
            stacked = torch.cat(grads, dim=-1)
        terms.append(_term(use.inputs[names[0]], stacked))
    return terms


def _groups_sharing_inputs(uses: Sequence[_AttentionUse]) -> list[tuple[str, ...]]:
    """The projections grouped by shared input tensor, for every call."""
    if all(use.same_inputs == (True, True) for use in uses):
        return [("q", "k", "v")]
    if all(use.same_inputs[1] for use in uses):
        return [("q",), ("k", "v")]
    return [("q",), ("k",), ("v",)]


def _group_gramian(uses: Sequence[_AttentionUse], names: Sequence[str], batched: bool) -> Tensor:
    """The Gramian of the projections ``names`` reading the same input.

    Their weights are stacked rows of one matrix: the ghost form concatenates their gradients
    (the products of the inputs are shared); the per-sample form needs no copy, the Gram of
    rows concatenated along the output features being the sum of the projections' Grams.
    """
    if len(names) == 1:
        return weight_gramian(_projection_terms(uses, names), batched)
    # Shapes only, for the costs: zero-stride expansions of the stacked gradients (no memory).
    stacked_shapes = [
        SequenceTerm(
            term.inputs,
            term.grads.new_empty(()).expand(
                *term.grads.shape[:3], term.grads.shape[3] * len(names), term.grads.shape[4]
            ),
        )
        for term in _projection_terms(uses, names[:1])
    ]
    if ghost_cost(stacked_shapes, batched) < per_sample_cost(stacked_shapes, batched):
        return ghost_gramian(_projection_terms(uses, names), batched)
    parts = [per_sample_gramian(_projection_terms(uses, (name,)), batched) for name in names]
    return sum(parts[1:], parts[0])


def _out_terms(uses: Sequence[_AttentionUse]) -> list[SequenceTerm]:
    return [
        _term(use.attended, use.output_grads)
        for use in uses
        if use.attended is not None and use.output_grads is not None
    ]


class MultiheadAttentionRule(GramianRule):
    """Rows, Gramian and weighted gradients of every parameter of a ``MultiheadAttention``."""

    def check(self, module: nn.Module, batched: bool) -> None:
        if batched and isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            raise ValueError(
                "Found a module of type MultiheadAttention with `batch_first=False`, whose inputs "
                "and outputs have their samples on dim 1, which is incompatible with `batch_dim` "
                "not None. Create it with `batch_first=True` or use `batch_dim=None`."
            )

    def covered_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        covered = dict(module.named_parameters(recurse=False))
        out_proj = module.get_submodule("out_proj")
        for name, parameter in out_proj.named_parameters(recurse=False):
            covered[f"out_proj.{name}"] = parameter
        return covered

    def needs_graph(self, module: nn.Module) -> bool:
        # Only the random attention probabilities of dropout need the recorded graph.
        return not isinstance(module, nn.MultiheadAttention) or _random(module)

    def read_graph(self, module: nn.Module, call: Call) -> None:
        if isinstance(module, nn.MultiheadAttention):
            _read_graph(module, call)

    def per_row_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> dict[str, Tensor]:
        attention = self._prepare(module, params, batched)
        if _random(attention):
            return recorded_rows(module, calls, params, batched, leading_axes)
        return _rows_from_uses(attention, _uses(attention, calls, batched), params, batched)

    def gramian(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> Tensor:
        attention = self._prepare(module, params, batched)
        if _random(attention):
            rows = recorded_rows(module, calls, params, batched, leading_axes)
            return gram(list(rows.values()))
        return _gramian_from_uses(attention, _uses(attention, calls, batched), params, batched)

    def gramian_then_weighted_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
        attention = self._prepare(module, params, batched)
        if _random(attention):
            return super().gramian_then_weighted_gradients(module, calls, params, batched)
        # The attention core is back-propagated once: the weighted gradient combines its results.
        uses = _uses(attention, calls, batched)
        # As in an ordinary backward pass, parameters that the output does not reach (out_proj's,
        # when only the attention weights are used) get no gradient; their rows are zero.
        reached = [
            name
            for name in params
            if not name.startswith("out_proj.") or any(use.output_grads is not None for use in uses)
        ]
        if reached and _keeps_rows(uses, reached, batched):
            return gramian_and_weighted_rows(
                attention, _consumed_rows(attention, uses, calls, reached, batched)
            )
        gramian = _gramian_from_uses(attention, uses, params, batched)

        def weighted(weights: Tensor) -> dict[str, Tensor]:
            result = _weighted_from_uses(attention, uses, reached, batched, weights)
            uses.clear()
            return result

        return gramian, weighted

    def weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        weights: Tensor,
    ) -> dict[str, Tensor]:
        attention = self._prepare(module, params, batched)
        if _random(attention):
            return recorded_weighted_gradients(
                module, calls, params, batched, weights, leading_axes
            )
        uses = _uses(attention, calls, batched)
        return _weighted_from_uses(attention, uses, params, batched, weights)

    def _prepare(
        self, module: nn.Module, params: Sequence[str], batched: bool
    ) -> nn.MultiheadAttention:
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"Expected a MultiheadAttention; found {type(module).__name__}.")
        self.check(module, batched)
        check_params(params, list(self.covered_parameters(module)), module)
        return module


def _rows_from_uses(
    module: nn.MultiheadAttention,
    uses: Sequence[_AttentionUse],
    params: Sequence[str],
    batched: bool,
) -> dict[str, Tensor]:
    seeds, batch = _shape(uses)
    rows_count = seeds * batch if batched else seeds
    result: dict[str, Tensor] = {}
    for name in params:
        parameter = module.get_parameter(name)
        stacked = all(use.stacked_grads is not None for use in uses)
        if name == "in_proj_weight" and stacked:
            rows = weight_per_sample(_projection_terms(uses, _PROJECTIONS), batched).squeeze(1)
        elif name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            names = _PROJECTIONS if name == "in_proj_weight" else (name[0],)
            blocks = [
                weight_per_sample(_projection_terms(uses, (projection,)), batched)
                for projection in names
            ]
            rows = torch.cat([block.squeeze(1) for block in blocks], dim=1)
        elif name == "in_proj_bias" and stacked:
            grads = [
                _as_grouped(use.stacked_grads) for use in uses if use.stacked_grads is not None
            ]
            rows = bias_per_sample(grads, batched)
        elif name == "in_proj_bias":
            blocks = [
                bias_per_sample([_as_grouped(use.input_grads[p]) for use in uses], batched)
                for p in _PROJECTIONS
            ]
            rows = torch.cat(blocks, dim=-1)
        elif name in ("bias_k", "bias_v"):
            grads = [use.bias_kv_grads[name] for use in uses]
            rows = bias_per_sample([_as_grouped(g) for g in grads], batched)
        elif name == "out_proj.weight":
            terms = _out_terms(uses)
            rows = (
                weight_per_sample(terms, batched).squeeze(1)
                if terms
                else parameter.new_zeros(rows_count, *parameter.shape)
            )
        else:  # out_proj.bias
            grads = [use.output_grads for use in uses if use.output_grads is not None]
            rows = (
                bias_per_sample([_as_grouped(g) for g in grads], batched)
                if grads
                else parameter.new_zeros(rows_count, *parameter.shape)
            )
        result[name] = rows.reshape(rows_count, *parameter.shape)
    return result


def _gramian_from_uses(
    module: nn.MultiheadAttention,
    uses: Sequence[_AttentionUse],
    params: Sequence[str],
    batched: bool,
) -> Tensor:
    parts: list[Tensor] = []
    small = [name for name in params if not name.endswith("_weight") and name != "out_proj.weight"]
    for name in params:
        if name == "in_proj_weight":
            for group in _groups_sharing_inputs(uses):
                parts.append(_group_gramian(uses, group, batched))
        elif name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            parts.append(weight_gramian(_projection_terms(uses, (name[0],)), batched))
        elif name == "out_proj.weight":
            terms = _out_terms(uses)
            if terms:
                parts.append(weight_gramian(terms, batched))
    if small:
        parts.append(gram(list(_rows_from_uses(module, uses, small, batched).values())))
    if not parts:
        seeds, batch = _shape(uses)
        count = seeds * batch if batched else seeds
        return uses[0].inputs["q"].new_zeros(count, count)
    return sum(parts[1:], parts[0])


def _weighted_from_uses(
    module: nn.MultiheadAttention,
    uses: Sequence[_AttentionUse],
    params: Sequence[str],
    batched: bool,
    weights: Tensor,
) -> dict[str, Tensor]:
    """``Σ_r weights[r] row_r``: every gradient is linear in the output gradients, so the uses'
    per-seed gradients are combined by the weights into one seed, whose summed-mode row it is."""
    seeds, batch = _shape(uses)
    check_weights(weights, seeds, batch, batched)
    if batched and all(use.sequence_first for use in uses):
        return _weighted_sequence_first(module, uses, params, weights.view(seeds, batch))
    combined = [_combined_use(use, weights, batched) for use in uses]
    rows = _rows_from_uses(module, combined, params, batched=False)
    return {name: row[0] for name, row in rows.items()}


def _keeps_rows(uses: Sequence[_AttentionUse], params: Sequence[str], batched: bool) -> bool:
    """Whether the fused step should materialise and keep the rows of ``params``: when the
    per-sample form is the cheaper one and :func:`keeps_rows` says so (as in the Linear rule).

    For uses found in the graph (self-attention with packed projections) only.
    """
    if not uses or not all(use.sequence_first for use in uses):
        return False
    terms = _projection_terms(uses, _PROJECTIONS) if "in_proj_weight" in params else []
    out_terms = _out_terms(uses) if "out_proj.weight" in params else []
    for group in (terms, out_terms):
        if group and ghost_cost(group, batched) < per_sample_cost(group, batched):
            return False
    seeds, batch = _shape(uses)
    rows_count = seeds * batch if batched else seeds
    embed = uses[0].inputs["q"].shape[2]
    sizes = {
        "in_proj_weight": 3 * embed * embed,
        "in_proj_bias": 3 * embed,
        "out_proj.weight": embed * embed,
        "out_proj.bias": embed,
    }
    rows = rows_count * sum(sizes[name] for name in params)
    held = 0
    for use in uses:
        assert use.stacked_grads is not None
        held += use.inputs["q"].numel() + use.stacked_grads.numel()
        if use.output_grads is not None and use.attended is not None:
            held += use.output_grads.numel() + use.attended.numel()
    return keeps_rows(rows, held)


def _consumed_rows(
    module: nn.MultiheadAttention,
    uses: list[_AttentionUse],
    calls: Sequence[Call],
    params: Sequence[str],
    batched: bool,
) -> dict[str, Tensor | list[Tensor]]:
    """The rows of ``params``, dropping the uses' tensors (and what the calls found in the graph)
    as soon as the rows that need them are made: the rows replace them."""
    for call in calls:
        call.internal_grads.clear()
        call.saved.clear()
    rows: dict[str, Tensor | list[Tensor]] = {}
    rows.update(
        _rows_from_uses(
            module, uses, [name for name in params if name.startswith("in_proj_b")], batched
        )
    )
    if "in_proj_weight" in params:
        # One part per projection: no allocation larger than the gradients of q, k and v.
        seeds, batch = _shape(uses)
        count = seeds * batch if batched else seeds
        rows["in_proj_weight"] = [
            weight_per_sample(_projection_terms(uses, (name,)), batched).reshape(count, -1)
            for name in _PROJECTIONS
        ]
    for use in uses:
        # A zero-stride stand-in keeps the shape of the gradients (for `_shape`), not their memory.
        shape = use.input_grads["q"].shape
        use.input_grads = {"q": use.input_grads["q"].new_empty(()).expand(shape)}
        use.inputs, use.stacked_grads = {}, None
    out = [name for name in params if name.startswith("out_")]
    rows.update(_rows_from_uses(module, uses, out, batched) if out else {})
    uses.clear()
    return {name: rows[name] for name in params}


def _weighted_sequence_first(
    module: nn.MultiheadAttention,
    uses: Sequence[_AttentionUse],
    params: Sequence[str],
    per_sample: Tensor,
) -> dict[str, Tensor]:
    """The weighted gradients of uses found in the graph, in their sequence-first layout.

    Each projection is one product over all positions, ``(Σ_k w_k ∘ D_k)ᵀ X``, with the combined
    gradients written sequence-first, as the gradients of the projection and the saved input of
    ``out_proj`` are (the query, batch-first, is the one operand copied).
    """
    totals: dict[str, Tensor] = {}

    def add(name: str, value: Tensor) -> None:
        totals[name] = value if name not in totals else totals[name] + value

    for use in uses:
        assert use.stacked_grads is not None
        query = use.inputs["q"]
        if "in_proj_weight" in params or "in_proj_bias" in params:
            combined = _combined_sequence_first(use.stacked_grads, per_sample)
            if "in_proj_weight" in params:
                add(
                    "in_proj_weight", combined.T @ query.transpose(0, 1).reshape(-1, query.shape[2])
                )
            if "in_proj_bias" in params:
                add("in_proj_bias", combined.sum(dim=0))
        out_proj = "out_proj.weight" in params or "out_proj.bias" in params
        if out_proj and use.output_grads is not None and use.attended is not None:
            combined = _combined_sequence_first(use.output_grads, per_sample)
            attended = use.attended.transpose(0, 1).reshape(-1, use.attended.shape[2])
            if "out_proj.weight" in params:
                add("out_proj.weight", combined.T @ attended)
            if "out_proj.bias" in params:
                add("out_proj.bias", combined.sum(dim=0))
    result = {}
    for name in params:
        parameter = module.get_parameter(name)
        total = totals.get(name)
        result[name] = (
            torch.zeros_like(parameter) if total is None else total.to(dtype=parameter.dtype)
        )
    return result


def _combined_sequence_first(grads: Tensor, per_sample: Tensor) -> Tensor:
    """``Σ_k per_sample[k, i] grads[k, i, t]`` for ``grads [K, B, T, b]``, as ``[T * B, b]``."""
    seeds, batch, positions, width = grads.shape
    per_sample = per_sample.to(dtype=grads.dtype)
    combined = grads.new_empty(positions, batch, width)
    torch.mul(grads[0].transpose(0, 1), per_sample[0].view(1, batch, 1), out=combined)
    for seed in range(1, seeds):
        combined.addcmul_(grads[seed].transpose(0, 1), per_sample[seed].view(1, batch, 1))
    return combined.view(positions * batch, width)


def _combined_use(use: _AttentionUse, weights: Tensor, batched: bool) -> _AttentionUse:
    def combine(grads: Tensor) -> Tensor:
        weights_ = weights.to(dtype=grads.dtype)
        if batched:
            return combine_per_sample(grads, weights_.view(grads.shape[0], -1)).unsqueeze(0)
        return torch.tensordot(weights_, grads, dims=1).unsqueeze(0)

    stacked = None if use.stacked_grads is None else combine(use.stacked_grads)
    input_grads = (
        {name: combine(grads) for name, grads in use.input_grads.items()}
        if stacked is None
        else dict(zip(_PROJECTIONS, stacked.split(stacked.shape[-1] // 3, dim=-1)))
    )
    return _AttentionUse(
        inputs=use.inputs,
        input_grads=input_grads,
        attended=use.attended,
        output_grads=None if use.output_grads is None else combine(use.output_grads),
        bias_kv_grads={name: combine(grads) for name, grads in use.bias_kv_grads.items()},
        same_inputs=use.same_inputs,
        stacked_grads=stacked,
    )


def _random(module: nn.MultiheadAttention) -> bool:
    return module.training and module.dropout > 0.0


def _uses(
    module: nn.MultiheadAttention, calls: Sequence[Call], batched: bool
) -> list[_AttentionUse]:
    seed_count(calls)
    uses = [use for call in calls if (use := _use_of(module, call, batched)) is not None]
    if batched:
        common_batch_size([use.inputs["q"].shape[0] for use in uses], module)
    return uses


def _shape(uses: Sequence[_AttentionUse]) -> tuple[int, int]:
    """``(K, B)``, the seeds and the batch size of the uses."""
    grads = uses[0].input_grads.get("q", uses[0].output_grads)
    assert grads is not None
    return grads.shape[0], grads.shape[1]


register_rule(nn.MultiheadAttention, MultiheadAttentionRule())
