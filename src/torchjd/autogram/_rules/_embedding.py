"""Gramian rule of ``nn.Embedding``.

The Jacobian row ``(k, i)`` of the weight ``[V, d]`` is ``Σ_t e_{id_it} ⊗ D_kit``: a lookup's
gradient lands on the rows of the tokens the sample contains. Hence

``G[(k,i),(l,j)] = Σ_{t,s} [id_it = id_js] (D_kit · D_ljs)``,

computed without ever forming a ``[B, V, d]`` per-sample gradient, by the cheaper of

* the *ghost* form: the token-equality mask times the products of output gradients
  (``O(R²·T²·d)``, no host synchronisation), best for short sequences;
* the *compact* form: per-sample gradients restricted to the distinct tokens present
  (``[R, U, d]``, ``U ≤ min(V, number of tokens)``) and their Gram (``O(R²·U·d)``). Finding the
  distinct tokens (``torch.unique``) synchronises with the host once; it is skipped, and the
  vocabulary used as is, when ``V`` is not larger than the number of tokens.

``padding_idx`` tokens get no gradient, ``scale_grad_by_freq`` divides each token's gradient by
its count in the call (as autograd does), and ``max_norm`` only rescales the weight in place before
the lookup, which does not change the gradient. With ``sparse=True``, weighted gradients are
sparse tensors, like the gradients autograd gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._base import Call, GramianRule
from ._common import (
    check_params,
    check_weights,
    common_batch_size,
    first_argument,
    leading_axes,
    seed_count,
    weighted_calls,
)
from ._registry import register_rule


@dataclass(eq=False)
class _Lookup:
    """One call: token ids ``[B, T]``, output gradients ``[K, B, T, d]`` and token weights.

    In summed mode ``B`` is 1: a row sums over the samples, so all the tokens form one sample.

    ``token_weights`` (``[B, T]``, or ``None`` for all ones) is 0 on padding tokens and
    ``1 / count`` with ``scale_grad_by_freq``.
    """

    ids: Tensor
    grads: Tensor
    token_weights: Tensor | None


def _lookup_of(module: nn.Embedding, call: Call, batched: bool) -> _Lookup | None:
    grad = call.grad_outputs[0] if call.grad_outputs else None
    if grad is None:
        return None
    ids = first_argument(module, call)
    seeds, width = grad.shape[0], module.embedding_dim
    if batched:
        if ids.ndim == 0:
            raise ValueError(
                "Expected the input of Embedding to be batched on dim 0 when `batch_dim` is not "
                "None; found a 0-dimensional input."
            )
        batch = ids.shape[0]
    else:
        batch = 1
    flat_ids = ids.reshape(batch, -1).long()
    grads = grad.reshape(seeds, batch, -1, width)
    token_weights: Tensor | None = None
    if module.padding_idx is not None:
        token_weights = (flat_ids != module.padding_idx).to(grad.dtype)
    if module.scale_grad_by_freq:
        counts = torch.zeros(module.num_embeddings, dtype=grad.dtype, device=grad.device)
        counts.index_add_(
            0, flat_ids.flatten(), torch.ones_like(flat_ids, dtype=grad.dtype).flatten()
        )
        scale = counts[flat_ids].reciprocal()
        token_weights = scale if token_weights is None else token_weights * scale
    return _Lookup(flat_ids, grads, token_weights)


def _weighted_grads(lookup: _Lookup) -> Tensor:
    if lookup.token_weights is None:
        return lookup.grads
    return lookup.grads * lookup.token_weights.unsqueeze(-1)


def _scatter_rows(lookups: Sequence[_Lookup], slots: Sequence[Tensor], width: int) -> Tensor:
    """Per-row gradients over ``width`` slots: ``[R, width, d]``, token ``(i, t)`` in its slot."""
    seeds, batch, _, dim = lookups[0].grads.shape
    rows = seeds * batch  # in summed mode, `batch` is 1: all the tokens form one sample
    result = lookups[0].grads.new_zeros(rows * width, dim)
    for lookup, slot in zip(lookups, slots):
        row_index = torch.arange(seeds * batch, device=slot.device).view(seeds, batch, 1)
        index = row_index * width + slot.unsqueeze(0)
        result.index_add_(0, index.flatten(), _weighted_grads(lookup).reshape(-1, dim))
    return result.view(rows, width, dim)


def _ghost_pair(first: _Lookup, second: _Lookup) -> Tensor:
    seeds, batch = first.grads.shape[:2]
    same = (first.ids[:, :, None, None] == second.ids[None, None, :, :]).to(first.grads.dtype)
    if first.token_weights is not None:
        same = same * first.token_weights[:, :, None, None]
    if second.token_weights is not None:
        same = same * second.token_weights[None, None, :, :]
    products = torch.einsum("kitd,ljsd->kitljs", first.grads, second.grads)
    gramian = torch.einsum("itjs,kitljs->kilj", same, products)
    return gramian.reshape(seeds * batch, seeds * batch)


def _ghost_gramian(lookups: Sequence[_Lookup]) -> Tensor:
    result: Tensor | None = None
    for u, first in enumerate(lookups):
        part = _ghost_pair(first, first)
        for second in lookups[u + 1 :]:
            cross = _ghost_pair(first, second)
            part = part + cross + cross.T
        result = part if result is None else result + part
    assert result is not None
    return result


def _compact_gramian(module: nn.Embedding, lookups: Sequence[_Lookup]) -> Tensor:
    tokens = sum(lookup.ids.numel() for lookup in lookups)
    if module.num_embeddings <= tokens:
        width = module.num_embeddings
        slots = [lookup.ids for lookup in lookups]
    else:
        # Host synchronisation: the number of distinct tokens decides the shape.
        distinct, inverse = torch.unique(
            torch.cat([lookup.ids.flatten() for lookup in lookups]), return_inverse=True
        )
        width = distinct.numel()
        slots = list(torch.split(inverse, [lookup.ids.numel() for lookup in lookups]))
        slots = [slot.view_as(lookup.ids) for slot, lookup in zip(slots, lookups)]
    rows = _scatter_rows(lookups, slots, width)
    flat = rows.reshape(rows.shape[0], -1)
    return flat @ flat.T


def _ghost_cost(lookups: Sequence[_Lookup]) -> int:
    seeds, batch, _, dim = lookups[0].grads.shape
    rows = seeds * batch
    total = sum(lookup.ids.shape[1] for lookup in lookups)
    return rows * rows * total * total * (dim + 1)


def _compact_cost(module: nn.Embedding, lookups: Sequence[_Lookup]) -> int:
    seeds, batch, _, dim = lookups[0].grads.shape
    rows = seeds * batch
    tokens = sum(lookup.ids.numel() for lookup in lookups)
    return seeds * tokens * dim + rows * rows * min(module.num_embeddings, tokens) * dim


class EmbeddingRule(GramianRule):
    """Rows, Gramian and weighted gradients of an embedding's ``weight``."""

    def per_row_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> dict[str, Tensor]:
        embedding = _as_embedding(module)
        check_params(params, ["weight"], module)
        lookups = _lookups(embedding, calls, batched)
        slots = [lookup.ids for lookup in lookups]
        rows = _scatter_rows(lookups, slots, embedding.num_embeddings)
        return {"weight": rows}

    def gramian(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> Tensor:
        embedding = _as_embedding(module)
        check_params(params, ["weight"], module)
        lookups = _lookups(embedding, calls, batched)
        if _ghost_cost(lookups) < _compact_cost(embedding, lookups):
            return _ghost_gramian(lookups)
        return _compact_gramian(embedding, lookups)

    def weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        weights: Tensor,
    ) -> dict[str, Tensor]:
        embedding = _as_embedding(module)
        check_params(params, ["weight"], module)
        lookups = _lookups(embedding, calls, batched)
        seeds, batch = lookups[0].grads.shape[:2]
        check_weights(weights, seeds, batch, batched)
        combined = _lookups(embedding, weighted_calls(calls, weights, batched, leading_axes), False)
        if embedding.sparse:
            indices = torch.cat([lookup.ids.flatten() for lookup in combined]).unsqueeze(0)
            values = torch.cat(
                [
                    _weighted_grads(lookup).reshape(-1, embedding.embedding_dim)
                    for lookup in combined
                ]
            )
            shape = (embedding.num_embeddings, embedding.embedding_dim)
            # The indices are valid ids: the forward lookup succeeded with them.
            sparse = torch.sparse_coo_tensor(indices, values, shape, check_invariants=False)
            return {"weight": sparse}
        slots = [lookup.ids for lookup in combined]
        rows = _scatter_rows(combined, slots, embedding.num_embeddings)
        return {"weight": rows[0]}


def _as_embedding(module: nn.Module) -> nn.Embedding:
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"Expected an Embedding; found {type(module).__name__}.")
    return module


def _lookups(module: nn.Embedding, calls: Sequence[Call], batched: bool) -> list[_Lookup]:
    seed_count(calls)
    lookups = [
        lookup for call in calls if (lookup := _lookup_of(module, call, batched)) is not None
    ]
    if batched:
        common_batch_size([lookup.ids.shape[0] for lookup in lookups], module)
    return lookups


register_rule(nn.Embedding, EmbeddingRule())
