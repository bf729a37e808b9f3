"""The Gramian rule of ``nn.Linear``: closed forms from the saved input and the output gradients.

For a call with input ``X`` (``[B, T, a]`` once the leading dimensions between the batch and the
features are flattened into ``T`` positions) and output gradients ``D`` (``[K, B, T, b]``), row
``r = k * B + i`` of the Jacobian is ``D[k, i]ᵀ X[i]`` for the weight and ``Σ_t D[k, i, t]`` for the
bias. A module called several times has rows summed over its calls, so its Gramian has cross terms.
The weight block is computed by the cheaper exact form, chosen from the shapes:

* *ghost*: ``G[r, s] = ⟨X_i X_jᵀ, D_r D_sᵀ⟩`` (``(X Xᵀ) ∘ (D Dᵀ)`` for one vector per sample),
  ``O(T²·(B²·a + R²·b))``, never materialising a per-sample gradient;
* *per-sample*: materialise the ``[R, b, a]`` rows and take their Gram, ``O(R·T·a·b + R²·a·b)``.

In summed mode (``batch_dim=None``) each row sums over the samples: the same formulas with one
"sample" whose positions are all the ``(i, t)``.

A subclass of ``nn.Linear`` that overrides ``forward`` may compute anything: this rule then covers
nothing, and the engine uses the exact generic fallback for its parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._base import Call, GramianRule
from ._common import keeps_rows, sum_over_pairs, weighted_rows
from ._registry import register_rule

# Bounds the elements of one chunk of the ghost form's [rows, R, T, T'] intermediate.
_GHOST_ELEMENTS_PER_CHUNK = 1 << 24


@dataclass(frozen=True)
class _Term:
    """One call: input ``[B, T, a]`` and output gradients ``[K, B, T, b]``, in compute dtype."""

    inputs: Tensor
    grads: Tensor

    @property
    def positions(self) -> int:
        return self.inputs.shape[1]


class LinearRule(GramianRule):
    """Exact Jacobian rows, Gramian and weighted gradients of ``nn.Linear``'s weight and bias."""

    def covered_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        if type(module).forward is not nn.Linear.forward:
            return {}
        covered = {}
        for name in ("weight", "bias"):
            value = module._parameters.get(name)
            if isinstance(value, nn.Parameter):
                covered[name] = value
        return covered

    def needs_graph(self, module: nn.Module) -> bool:
        return False

    def per_row_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> dict[str, Tensor]:
        _check_params(params)
        terms = _terms(module, calls, batched)
        result = {}
        if "weight" in params:
            rows = _weight_rows(terms)
            result["weight"] = _cast(rows, _dtype_of(module, "weight"))
        if "bias" in params:
            result["bias"] = _cast(_bias_rows(terms), _dtype_of(module, "bias"))
        return {name: result[name] for name in params}

    def gramian(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> Tensor:
        _check_params(params)
        terms = _terms(module, calls, batched)
        gramian, _ = _gramian(terms, "weight" in params, "bias" in params, keep_rows=False)
        return gramian

    def weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        weights: Tensor,
    ) -> dict[str, Tensor]:
        _check_params(params)
        return _weighted_gradients(module, _terms(module, calls, batched), params, weights)

    def gramian_then_weighted_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
        return self._fused(module, calls, params, batched, None)

    def add_gramian_then_weighted_gradients(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        gramian: Tensor,
    ) -> Callable[[Tensor], dict[str, Tensor]]:
        # The one-vector forms add their products into `gramian` by blocks: no [R, R] block.
        _, weighted = self._fused(module, calls, params, batched, gramian)
        return weighted

    def _fused(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        params: Sequence[str],
        batched: bool,
        into: Tensor | None,
    ) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
        _check_params(params)
        terms = _terms(module, calls, batched)
        gramian, kept = _gramian(
            terms, "weight" in params, "bias" in params, keep_rows=True, into=into
        )
        if kept is not None:
            # The per-sample form materialised the rows: the weighted sums are small products,
            # and the inputs and output gradients are not needed any more.
            terms.clear()
            return gramian, weighted_rows(module, kept)

        def weighted(weights: Tensor) -> dict[str, Tensor]:
            # Each call's output gradients are freed as soon as they are combined.
            held = list(terms)
            terms.clear()
            return _weighted_gradients(module, held, params, weights, consume=True)

        return gramian, weighted


register_rule(nn.Linear, LinearRule())


def _check_params(params: Sequence[str]) -> None:
    if not params:
        raise ValueError("`params` should name at least one parameter.")
    unknown = [name for name in params if name not in ("weight", "bias")]
    if unknown:
        raise ValueError(f"Expected `params` among ['weight', 'bias']; found {unknown}.")


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    # `Tensor.to` costs a dispatch even when it has nothing to do.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _tensor_attribute(module: nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    assert isinstance(value, Tensor)
    return value


def _dtype_of(module: nn.Module, name: str) -> torch.dtype:
    return _tensor_attribute(module, name).dtype


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _terms(module: nn.Module, calls: Sequence[Call], batched: bool) -> list[_Term]:
    in_features = _tensor_attribute(module, "weight").shape[1]
    terms = []
    for call in calls:
        grad = call.grad_outputs[0] if call.grad_outputs else None
        if grad is None:
            continue
        inputs = call.args[0] if call.args else call.kwargs["input"]
        if inputs.shape[-1:] != (in_features,) or grad.shape[1:-1] != inputs.shape[:-1]:
            raise ValueError(
                f"Expected a Linear call with input [..., {in_features}] and output gradients "
                f"[K, ..., out_features] with matching leading dims; found input "
                f"{tuple(inputs.shape)} and output gradients {tuple(grad.shape)}."
            )
        num_seeds, out_features = grad.shape[0], grad.shape[-1]
        if batched:
            if inputs.ndim < 2:
                raise ValueError(
                    "Expected the input of a Linear layer to have a batch dimension (dim 0) when "
                    f"`batch_dim` is not None; found an input of shape {tuple(inputs.shape)}."
                )
            batch_size = inputs.shape[0]
        else:
            batch_size = 1
        dtype = _compute_dtype(inputs, grad)
        terms.append(
            _Term(
                inputs=_cast(inputs.reshape(batch_size, -1, in_features), dtype),
                grads=_cast(grad.reshape(num_seeds, batch_size, -1, out_features), dtype),
            )
        )
    if not terms:
        raise ValueError("Expected at least one call with an output gradient; found none.")
    return terms


def _check_weights(terms: Sequence[_Term], weights: Tensor) -> None:
    num_seeds, batch_size = terms[0].grads.shape[:2]
    if weights.shape != (num_seeds * batch_size,):
        raise ValueError(
            f"Expected `weights` to have shape ({num_seeds * batch_size},), one weight per "
            f"Jacobian row; found {tuple(weights.shape)}."
        )


def _weighted_gradients(
    module: nn.Module,
    terms: list[_Term],
    params: Sequence[str],
    weights: Tensor,
    consume: bool = False,
) -> dict[str, Tensor]:
    """``Σ_r weights[r] row_r``: the output gradients combined by the weights, then one GEMM.

    :param consume: Whether to empty ``terms`` on the way, each term being dropped (with its
        output gradients) as soon as they are combined.
    """
    _check_weights(terms, weights)
    weight_total: Tensor | None = None
    bias_total: Tensor | None = None
    for index in range(len(terms)):
        term = terms[0] if consume else terms[index]
        if consume:
            del terms[0]
        num_seeds, batch_size = term.grads.shape[:2]
        per_row = _cast(weights, term.grads.dtype).view(num_seeds, batch_size)
        combined = _combine_seeds(term.grads, per_row)
        inputs = term.inputs
        del term
        if "weight" in params:
            flat_grads = combined.flatten(end_dim=1).T
            flat_inputs = inputs.flatten(end_dim=1)
            if weight_total is None:
                weight_total = flat_grads @ flat_inputs
            else:
                weight_total.addmm_(flat_grads, flat_inputs)
        if "bias" in params:
            part = combined.sum(dim=(0, 1))
            bias_total = part if bias_total is None else bias_total + part
    result = {}
    if weight_total is not None:
        result["weight"] = _cast(weight_total, _dtype_of(module, "weight"))
    if bias_total is not None:
        result["bias"] = _cast(bias_total, _dtype_of(module, "bias"))
    return {name: result[name] for name in params}


def _combine_seeds(grads: Tensor, per_row: Tensor) -> Tensor:
    """``Σ_k per_row[k, i] grads[k, i]``, ``[B, T, b]``.

    A few seeds are summed one by one: ``einsum`` would run one tiny product per sample.
    """
    num_seeds, batch_size = per_row.shape
    if num_seeds > 16:
        return torch.einsum("ki,kitb->itb", per_row, grads)
    combined = grads[0] * per_row[0].view(batch_size, 1, 1)
    for seed in range(1, num_seeds):
        combined.addcmul_(grads[seed], per_row[seed].view(batch_size, 1, 1))
    return combined


def _gramian(
    terms: Sequence[_Term],
    with_weight: bool,
    with_bias: bool,
    keep_rows: bool,
    into: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor | list[Tensor]] | None]:
    """The Gramian by the cheaper exact form, and the rows ``[R, b·a]`` (in parts, see
    :func:`_weight_row_parts`; and ``[R, b]`` for the bias), by parameter name, if the per-sample
    form materialised them.

    The rows are only returned when ``keep_rows`` and when :func:`keeps_rows` says so (for the
    fused step, which then reuses them and drops the terms).

    :param into: A Gramian ``[R, R]`` to add the result to, in place (and return), if any.
    """
    if with_weight and len(terms) == 1 and terms[0].positions == 1:
        return _one_vector_gramian(terms[0], with_bias, into), None
    gramian: Tensor | None = None
    kept: dict[str, Tensor | list[Tensor]] | None = None
    if with_weight:
        if _ghost_cost(terms) <= _per_sample_cost(terms):
            gramian = _ghost_gramian(terms)
        else:
            parts = _weight_row_parts(terms)
            gramian = parts[0] @ parts[0].T
            for part in parts[1:]:
                gramian.addmm_(part, part.T)
            held = sum(term.inputs.numel() + term.grads.numel() for term in terms)
            rows_count = sum(part.numel() for part in parts)
            if keep_rows and keeps_rows(rows_count, held):
                kept = {"weight": parts}
            del parts
    if with_bias:
        bias_rows = _bias_rows(terms)
        if gramian is None:
            gramian = bias_rows @ bias_rows.T
        else:
            gramian.addmm_(bias_rows, bias_rows.T)
        if kept is not None:
            kept["bias"] = bias_rows
    assert gramian is not None
    if into is not None:
        gramian = into.add_(gramian)
    return gramian, kept


def _weight_row_parts(terms: Sequence[_Term]) -> list[Tensor]:
    """The rows ``[R, b·a]`` in parts ``[R, b_j·a]`` of consecutive output features, none larger
    than the largest input or output gradients of the calls: a layer's rows may exceed both
    (``R·a·b`` against ``B·T·(a + b)``), and smaller allocations reuse the memory that the
    backward pass freed instead of mapping (and faulting in) fresh pages.
    """
    num_seeds, batch_size, _, out_features = terms[0].grads.shape
    in_features = terms[0].inputs.shape[2]
    budget = max(max(term.inputs.numel(), term.grads.numel()) for term in terms)
    block = max(1, min(out_features, budget // (num_seeds * batch_size * in_features)))
    parts = []
    for start in range(0, out_features, block):
        block_terms = [_Term(term.inputs, term.grads[..., start : start + block]) for term in terms]
        parts.append(_weight_rows(block_terms).flatten(start_dim=1))
    return parts


def _weight_rows(terms: Sequence[_Term]) -> Tensor:
    """``[R, b, a]``: the per-row weight gradients, summed over the calls."""
    total: Tensor | None = None
    for term in terms:
        part = torch.einsum("kitb,ita->kiba", term.grads, term.inputs).flatten(end_dim=1)
        total = part if total is None else total + part
    assert total is not None
    return total


def _bias_rows(terms: Sequence[_Term]) -> Tensor:
    """``[R, b]``: the per-row bias gradients, summed over the calls."""
    total: Tensor | None = None
    for term in terms:
        part = term.grads.sum(dim=2).flatten(end_dim=1)
        total = part if total is None else total + part
    assert total is not None
    return total


def _one_vector_gramian(term: _Term, with_bias: bool, into: Tensor | None = None) -> Tensor:
    """``(X Xᵀ + 1) ∘ (D Dᵀ)`` (``+ 1`` for the bias), the common case of one vector per sample.

    In place, so that only two ``[R, R]`` matrices exist at a time; for many rows and one seed,
    by blocks of rows, computing only the lower half (the Gramian is symmetric); for several
    seeds, by pairs of seeds (the same). With ``into`` (a Gramian to add the result to), the
    blocks are added there directly.
    """
    num_seeds, batch_size = term.grads.shape[:2]
    num_rows = num_seeds * batch_size
    inputs = term.inputs[:, 0]
    grads = term.grads.reshape(num_rows, -1)
    blocks_into = into if into is not None and into.dtype == grads.dtype else None
    if num_seeds == 1 and num_rows >= 2 * _SYMMETRIC_BLOCK:
        gramian = _symmetric_one_vector_gramian(inputs, grads, with_bias, blocks_into)
    elif num_seeds > 1:
        gramian = _seed_pairs_one_vector_gramian(
            inputs, term.grads[:, :, 0], with_bias, blocks_into
        )
    else:
        inputs_gramian = inputs @ inputs.T
        if with_bias:
            inputs_gramian += 1.0
        gramian = grads @ grads.T
        gramian.view(num_seeds, batch_size, num_seeds, batch_size).mul_(
            inputs_gramian.view(1, batch_size, 1, batch_size)
        )
    if into is not None and gramian is not into:
        gramian = into.add_(gramian)
    return gramian


# Rows per block of the symmetric computation: large enough for efficient matrix products.
_SYMMETRIC_BLOCK = 128


def _symmetric_one_vector_gramian(
    inputs: Tensor, grads: Tensor, with_bias: bool, into: Tensor | None
) -> Tensor:
    """``(X Xᵀ + 1) ∘ (D Dᵀ)`` by square tiles of the lower half (the upper half is their
    transpose), added to ``into`` if given.

    About ``(1 + block / n) / 2`` of the products of the direct form, and the temporaries are two
    ``[block, block]`` tiles (the fused step holds every layer's inputs and output gradients
    meanwhile: larger temporaries would raise its peak memory).
    """
    num_rows = inputs.shape[0]
    gramian = grads.new_empty(num_rows, num_rows) if into is None else into
    for start in range(0, num_rows, _SYMMETRIC_BLOCK):
        stop = min(num_rows, start + _SYMMETRIC_BLOCK)
        for column in range(0, start + 1, _SYMMETRIC_BLOCK):
            column_stop = min(stop, column + _SYMMETRIC_BLOCK)
            tile = inputs[start:stop] @ inputs[column:column_stop].T
            if with_bias:
                tile += 1.0
            tile *= grads[start:stop] @ grads[column:column_stop].T
            if into is None:
                gramian[start:stop, column:column_stop] = tile
            else:
                gramian[start:stop, column:column_stop] += tile
            if column == start:
                continue
            if into is None:
                gramian[column:column_stop, start:stop] = tile.T
            else:
                gramian[column:column_stop, start:stop] += tile.T
    return gramian


def _seed_pairs_one_vector_gramian(
    inputs: Tensor, grads: Tensor, with_bias: bool, into: Tensor | None
) -> Tensor:
    """``(X Xᵀ + 1) ∘ (D Dᵀ)`` for ``K`` seeds (``grads [K, B, b]``), the blocks of the pairs of
    seeds ``k ≥ l`` only (the others are their transposes): ``K (K + 1) / 2`` products of the
    output gradients instead of ``K²`` (one product per seed ``k``, against the seeds up to
    ``k``), and ``X Xᵀ`` once for every pair. Added to ``into`` if given.
    """
    num_seeds, batch_size, width = grads.shape
    inputs_gramian = inputs @ inputs.T
    if with_bias:
        inputs_gramian += 1.0
    num_rows = num_seeds * batch_size
    gramian = grads.new_empty(num_rows, num_rows) if into is None else into
    blocks = gramian.view(num_seeds, batch_size, num_seeds, batch_size)
    flat = grads.reshape(num_rows, width)
    for first in range(num_seeds):
        # [B, first + 1, B]: the blocks (first, second) for every second <= first.
        row = (grads[first] @ flat[: (first + 1) * batch_size].T).view(
            batch_size, first + 1, batch_size
        )
        row *= inputs_gramian.unsqueeze(1)
        if into is None:
            blocks[first, :, : first + 1] = row
            blocks[:first, :, first] = row[:, :first].permute(1, 2, 0)
        else:
            blocks[first, :, : first + 1] += row
            blocks[:first, :, first] += row[:, :first].permute(1, 2, 0)
    return gramian


def _ghost_cost(terms: Sequence[_Term]) -> int:
    num_seeds, batch_size, _, out_features = terms[0].grads.shape
    in_features = terms[0].inputs.shape[2]
    num_rows = num_seeds * batch_size
    positions = sum(term.positions for term in terms)
    return positions**2 * (batch_size**2 * in_features + num_rows**2 * (out_features + 1))


def _per_sample_cost(terms: Sequence[_Term]) -> int:
    num_seeds, batch_size, _, out_features = terms[0].grads.shape
    in_features = terms[0].inputs.shape[2]
    num_rows = num_seeds * batch_size
    positions = sum(term.positions for term in terms)
    return num_rows * in_features * out_features * (positions + num_rows)


def _ghost_gramian(terms: Sequence[_Term]) -> Tensor:
    """``Σ_{u,v} G^{uv}`` with ``G^{uv}[r, s] = ⟨X_u,i X_v,jᵀ, D_u,r D_v,sᵀ⟩``."""
    return sum_over_pairs(terms, _ghost_pair)


def _ghost_pair(first: _Term, second: _Term) -> Tensor:
    num_seeds, batch_size, first_positions, out_features = first.grads.shape
    second_positions = second.positions
    num_rows = num_seeds * batch_size
    inputs_products = torch.einsum("ita,jsa->ijts", first.inputs, second.inputs)
    first_grads = first.grads.reshape(num_rows, first_positions, out_features)
    second_grads = second.grads.reshape(num_rows, second_positions, out_features)
    chunk = max(1, _GHOST_ELEMENTS_PER_CHUNK // (num_rows * first_positions * second_positions))
    blocks = []
    for start in range(0, num_rows, chunk):
        stop = min(num_rows, start + chunk)
        rows = torch.arange(start, stop, device=first_grads.device)
        grads_products = torch.einsum("rtb,qsb->rqts", first_grads[start:stop], second_grads)
        grads_products = grads_products.reshape(
            stop - start, num_seeds, batch_size, first_positions, second_positions
        )
        inputs_of_rows = inputs_products[rows % batch_size].unsqueeze(1)
        block = (grads_products * inputs_of_rows).sum(dim=(-1, -2))
        blocks.append(block.reshape(stop - start, num_rows))
    return torch.cat(blocks)
