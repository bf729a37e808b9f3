"""Gramians of linear maps applied at many positions: the "ghost" and per-sample forms.

A *sequence term* is one use of a (grouped) linear map ``y[i, g, :, t] = W_g x[i, g, :, t] + b_g``
over positions ``t``: a Linear layer on sequences (``G = 1``), a convolution after unfolding
(``t`` = output positions, ``g`` = groups), an attention projection. With the inputs
``X = [B, G, a, T]`` and the output gradients ``D = [K, B, G, b, T]`` of every use, the Jacobian
row ``(k, i)`` of ``W_g`` is ``Σ_uses D[k, i, g] X[i, g]ᵀ`` (``[b, a]``), and

* the *per-sample* form materialises these rows (``O(R·T·a·b)``) and takes their Gram
  (``O(R²·a·b)``);
* the *ghost* form never does: ``G[(k,i),(l,j)] = Σ_g Σ_{t,s} (x_it · x_js)(d_kit · d_ljs)``
  costs ``O(B²·T²·a + R²·T²·b)``.

:func:`weight_gramian` picks the cheaper exact form from the shapes alone. Several uses of the
same map (module reuse) are handled as pairs of uses, so that the rows are sums over the uses,
without concatenating (copying) the saved inputs. In summed mode (``batch_dim=None``) a row sums
over the samples, which is the batched case with one sample whose positions are all the
``(i, t)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import sum_over_pairs


@dataclass(eq=False)
class SequenceTerm:
    """One use of a grouped linear map over positions.

    :param inputs: ``X = [B, G, a, T]`` (any strides; views of the saved input are fine).
    :param grads: ``D = [K, B, G, b, T]``, the gradients of the map's outputs.
    """

    inputs: Tensor
    grads: Tensor

    def __post_init__(self) -> None:
        x, d = self.inputs, self.grads
        if x.ndim != 4 or d.ndim != 5 or d.shape[1:3] != x.shape[:2] or d.shape[4] != x.shape[3]:
            raise ValueError(
                "Expected inputs [B, G, a, T] and grads [K, B, G, b, T] with matching B, G and T; "
                f"found {tuple(x.shape)} and {tuple(d.shape)}."
            )


def _flatten_samples(term: SequenceTerm) -> SequenceTerm:
    """The term seen as one sample whose positions are all ``(i, t)``: summed-mode rows."""
    x, d = term.inputs, term.grads
    batch, groups, a, positions = x.shape
    k, b = d.shape[0], d.shape[3]
    flat_x = x.permute(1, 2, 0, 3).reshape(1, groups, a, batch * positions)
    flat_d = d.permute(0, 2, 3, 1, 4).reshape(k, 1, groups, b, batch * positions)
    return SequenceTerm(flat_x, flat_d)


def weight_per_sample(terms: Sequence[SequenceTerm], batched: bool) -> Tensor:
    """The weight rows ``[R, G, b, a]``, summed over the terms."""
    result: Tensor | None = None
    for term in terms:
        if batched:
            part = _per_sample(term)
            part = part.reshape(part.shape[0] * part.shape[1], *part.shape[2:])
        else:
            part = _summed(term)
        result = part if result is None else result + part
    if result is None:
        raise ValueError("Expected at least one sequence term; found none.")
    return result


def _summed(term: SequenceTerm) -> Tensor:
    """``Σ_i D[k, i, g] X[i, g]ᵀ`` as ``[K, G, b, a]``: one product per group over all positions.

    Samples and positions are merged by reshapes, which copy nothing for gradients and inputs
    laid out sample by sample (``einsum`` picks layouts that copy both, 2× slower here).
    """
    x, d = term.inputs, term.grads
    seeds, batch, groups, b, positions = d.shape
    flat_grads = d.permute(2, 0, 3, 1, 4).reshape(groups, seeds * b, batch * positions)
    flat_inputs = x.permute(1, 0, 3, 2).reshape(groups, batch * positions, x.shape[2])
    products = flat_grads @ flat_inputs
    return products.view(groups, seeds, b, x.shape[2]).transpose(0, 1)


def _per_sample(term: SequenceTerm) -> Tensor:
    """``D[k, i, g] X[i, g]ᵀ`` as ``[K, B, G, b, a]``: seeds folded into one batched product."""
    x, d = term.inputs, term.grads
    seeds, batch, groups, b, positions = d.shape
    folded = d.permute(1, 2, 0, 3, 4).reshape(batch, groups, seeds * b, positions)
    products = folded @ x.transpose(-1, -2)
    return products.view(batch, groups, seeds, b, x.shape[2]).permute(2, 0, 1, 3, 4)


def bias_per_sample(grads: Sequence[Tensor], batched: bool) -> Tensor:
    """The bias rows ``[R, G, b]`` from output gradients ``[K, B, G, b, T]``."""
    result: Tensor | None = None
    for grad in grads:
        per_sample = grad.sum(dim=-1)
        if batched:
            part = per_sample.reshape(per_sample.shape[0] * per_sample.shape[1], *grad.shape[2:4])
        else:
            part = per_sample.sum(dim=1)
        result = part if result is None else result + part
    if result is None:
        raise ValueError("Expected at least one output gradient; found none.")
    return result


def _ghost_pair(first: SequenceTerm, second: SequenceTerm) -> Tensor:
    """``Σ_g Σ_{t,s} (x_it · x'_js)(d_kit · d'_ljs)`` as an ``[R, R]`` matrix."""
    k, batch = first.grads.shape[:2]
    inputs_product = torch.einsum("igat,jgas->gitjs", first.inputs, second.inputs)
    grads_product = torch.einsum("kigbt,ljgbs->gkitljs", first.grads, second.grads)
    gramian = torch.einsum("gitjs,gkitljs->kilj", inputs_product, grads_product)
    return gramian.reshape(k * batch, k * batch)


# Cost of moving one element through memory, in multiply-adds: products with a short inner
# dimension (few positions) are bound by memory traffic, not arithmetic.
_MEMORY_COST = 32


def ghost_cost(terms: Sequence[SequenceTerm], batched: bool) -> int:
    """Multiply-adds of the ghost form, memory traffic included (an estimate from shapes)."""
    cost = 0
    for u, first in enumerate(terms):
        for second in terms[u:]:
            batch, groups, a, t_first = first.inputs.shape
            k, b = first.grads.shape[0], first.grads.shape[3]
            t_second = second.inputs.shape[3]
            if not batched:
                t_first, t_second, batch = t_first * batch, t_second * batch, 1
            rows = k * batch
            products = groups * t_first * t_second * (batch * batch * a + rows * rows * (b + 1))
            cost += products + _MEMORY_COST * groups * rows * rows * t_first * t_second
    return cost


def per_sample_cost(terms: Sequence[SequenceTerm], batched: bool) -> int:
    """Multiply-adds of the per-sample form, memory traffic included (an estimate from shapes)."""
    if not terms:
        return 0
    batch, groups, a, _ = terms[0].inputs.shape
    k, b = terms[0].grads.shape[0], terms[0].grads.shape[3]
    rows = k * batch if batched else k
    materialise = sum(k * batch * groups * term.inputs.shape[3] * a * b for term in terms)
    return materialise + rows * rows * groups * a * b + _MEMORY_COST * rows * groups * a * b


def weight_gramian(terms: Sequence[SequenceTerm], batched: bool) -> Tensor:
    """The ``[R, R]`` Gramian of the weight rows, by the cheaper exact form."""
    if not terms:
        raise ValueError("Expected at least one sequence term; found none.")
    if ghost_cost(terms, batched) < per_sample_cost(terms, batched):
        return ghost_gramian(terms, batched)
    return per_sample_gramian(terms, batched)


def per_sample_gramian(terms: Sequence[SequenceTerm], batched: bool) -> Tensor:
    """The ``[R, R]`` Gramian of the weight rows by the per-sample form."""
    if not terms:
        raise ValueError("Expected at least one sequence term; found none.")
    # The rows are only needed for their Gram: materialised a block of output features at a time
    # (the Gram sums over the blocks), no block larger than the largest input, so that the
    # per-sample form holds no more than the layer's own tensors (e.g. attention's stacked q, k, v
    # projections: [B, 3E, E] rows at once would be 3× their input).
    seeds, batch, groups, width = terms[0].grads.shape[:4]
    rows_count = seeds * batch if batched else seeds
    per_feature = rows_count * groups * terms[0].inputs.shape[2]
    budget = max(term.inputs.numel() for term in terms)
    block = max(1, min(width, budget // per_feature))
    gramian: Tensor | None = None
    for start in range(0, width, block):
        block_terms = [
            SequenceTerm(term.inputs, term.grads[:, :, :, start : start + block]) for term in terms
        ]
        rows = weight_per_sample(block_terms, batched)
        flat = rows.reshape(rows.shape[0], -1)
        if gramian is None:
            gramian = flat @ flat.T
        else:
            gramian.addmm_(flat, flat.T)
    assert gramian is not None
    return gramian


def ghost_gramian(terms: Sequence[SequenceTerm], batched: bool) -> Tensor:
    """The ``[R, R]`` Gramian of the weight rows by the ghost form (cross terms included)."""
    if not batched:
        terms = [_flatten_samples(term) for term in terms]
    return sum_over_pairs(terms, _ghost_pair)
