"""Gramian rule of ``nn.Embedding``.

The Jacobian row ``(k, i)`` of the weight ``[V, d]`` is ``Σ_t e_{id_it} ⊗ D_kit``: a lookup's
gradient lands on the rows of the tokens the sample contains. Hence

``G[(k,i),(l,j)] = Σ_{t,s} [id_it = id_js] (D_kit · D_ljs)``,

computed without ever forming a ``[B, V, d]`` per-sample gradient, by the cheapest of

* the *ghost* form: the token-equality mask times the products of output gradients
  (``O(R²·T²·d)``, no host synchronisation), best for short sequences;
* the *pair* form: each token's product with itself (one reduction, onto the sample diagonal),
  and one product per pair of distinct tokens of the batch sharing an id, found by sorting the
  repeated ids only (``O(K²·d·Σ_v c_v²)`` over the ids ``v`` found ``c_v ≥ 2`` times), or, when
  ids repeat a lot, one entry per distinct (token, sample) and one product per pair of entries
  sharing a token (``O(K²·d·Σ_v m_v²)``, ``m_v ≤ B`` the number of samples containing ``v``): it
  uses the token sparsity and synchronises with the host once (the number of pairs decides the
  shapes);
* the *vocabulary* form: dense per-row gradients ``[R, V, d]`` and their Gram, for vocabularies
  smaller than the batch's tokens (no host synchronisation).

``padding_idx`` tokens get no gradient, ``scale_grad_by_freq`` divides each token's gradient by
its count in the call (as autograd does), and ``max_norm`` only rescales the weight in place before
the lookup, which does not change the gradient. With ``sparse=True``, weighted gradients are
sparse tensors, like the gradients autograd gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._base import Call, GramianRule
from ._common import (
    check_params,
    check_weights,
    combine_per_sample,
    common_batch_size,
    first_argument,
    seed_count,
    sum_over_pairs,
)
from ._registry import register_rule

# Bounds the memory of one chunk of pair products (elements of the gathered gradients).
_ELEMENTS_PER_CHUNK = 1 << 24
# The fixed price of the pair form (sorting, a host synchronisation), in multiply-adds.
_PAIRS_OVERHEAD = 1 << 16


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
    # `Embedding.forward` takes one argument: binding the signature is for keyword calls only.
    ids = call.args[0] if len(call.args) == 1 and not call.kwargs else first_argument(module, call)
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
    return sum_over_pairs(lookups, _ghost_pair)


def _vocabulary_gramian(module: nn.Embedding, lookups: Sequence[_Lookup]) -> Tensor:
    """The Gram of per-row gradients over the whole vocabulary (small vocabularies only)."""
    rows = _scatter_rows(lookups, [lookup.ids for lookup in lookups], module.num_embeddings)
    flat = rows.reshape(rows.shape[0], -1)
    return flat @ flat.T


def _entry_pairs_gramian(module: nn.Embedding, lookups: Sequence[_Lookup]) -> Tensor:
    """``Σ_v S_v S_vᵀ`` over the pairs of samples that share a token ``v``.

    ``S_v[(k, i)]`` is the gradient that sample ``i`` sends to row ``v`` under seed ``k``: one
    *entry* per distinct (token, sample). Entries are found by sorting, then every pair of entries
    of the same token contributes one product: ``Σ_v m_v²`` products of size ``K²·d``, ``m_v``
    being the number of samples containing ``v``. Tokens in at least a quarter of the samples
    are handled densely instead (one matrix product for all of them).
    """
    seeds, batch, _, dim = lookups[0].grads.shape
    rows = seeds * batch
    device = lookups[0].ids.device
    ids = torch.cat([lookup.ids.flatten() for lookup in lookups])
    samples = torch.cat(
        [
            torch.arange(batch, device=device).repeat_interleave(lookup.ids.shape[1])
            for lookup in lookups
        ]
    )
    grads = torch.cat([_weighted_grads(lookup).reshape(seeds, -1, dim) for lookup in lookups], 1)
    count = ids.numel()
    slot = torch.arange(count, device=device)
    keys = ids * batch + samples
    if module.padding_idx is not None:
        # Padding tokens get no gradient: distinct negative keys keep them out of every pair.
        keys = torch.where(ids == module.padding_idx, -1 - slot, keys)
    sorted_keys, order = torch.sort(keys)
    new_entry = torch.ones(count, dtype=torch.bool, device=device)
    new_entry[1:] = sorted_keys[1:] != sorted_keys[:-1]
    entry_of_sorted = new_entry.cumsum(0) - 1
    entry_of_token = torch.empty_like(entry_of_sorted).scatter_(0, order, entry_of_sorted)
    entries = grads.new_zeros(seeds, count, dim).index_add_(1, entry_of_token, grads)
    # Slots past the last entry stay empty (key -1); like padding, each forms its own group.
    entry_keys = torch.full_like(keys, -1).scatter_(0, entry_of_sorted, sorted_keys)
    valid = entry_keys >= 0
    entry_tokens = torch.where(valid, entry_keys // batch, -1 - slot)
    entry_samples = torch.where(valid, entry_keys % batch, 0)
    # Entries are sorted by (token, sample): those of a token are contiguous.
    new_group = torch.ones(count, dtype=torch.bool, device=device)
    new_group[1:] = entry_tokens[1:] != entry_tokens[:-1]
    group = new_group.cumsum(0) - 1
    sizes = torch.zeros_like(group).index_add_(0, group, torch.ones_like(group))[group]
    starts = torch.where(new_group, slot, 0).cummax(0).values
    # Tokens present in many samples (frequent words, in text) would make many pairs: their
    # entries go instead into a dense [R, F, d] matrix whose Gram is one matrix product.
    frequent = valid & (sizes >= 2) & (4 * sizes >= batch)
    paired_sizes = torch.where(frequent, 0, sizes)
    frequent_rank = (new_group & frequent).cumsum(0) - 1
    # Host synchronisation (one): the numbers of pairs and of frequent tokens decide the shapes.
    pair_count, frequent_count = torch.stack(
        [paired_sizes.sum(), (new_group & frequent).sum()]
    ).tolist()
    gramian = grads.new_zeros(rows * rows)
    if pair_count:
        first = torch.repeat_interleave(slot, paired_sizes, output_size=pair_count)
        offsets = torch.arange(pair_count, device=device) - torch.repeat_interleave(
            paired_sizes.cumsum(0) - paired_sizes, paired_sizes, output_size=pair_count
        )
        second = starts[first] + offsets
        seed_rows = torch.arange(seeds, device=device) * batch
        chunk = max(1, _ELEMENTS_PER_CHUNK // (seeds * dim))
        for begin in range(0, pair_count, chunk):
            left, right = first[begin : begin + chunk], second[begin : begin + chunk]
            products = torch.einsum("kpd,lpd->pkl", entries[:, left], entries[:, right])
            left_rows = seed_rows + entry_samples[left].unsqueeze(1)
            right_rows = seed_rows + entry_samples[right].unsqueeze(1)
            index = left_rows.unsqueeze(2) * rows + right_rows.unsqueeze(1)
            gramian.index_add_(0, index.flatten(), products.flatten())
    gramian = gramian.view(rows, rows)
    if frequent_count:
        # Entries of rare tokens go to a discarded last column.
        dense_slots = batch * frequent_count
        column = torch.where(frequent, entry_samples * frequent_count + frequent_rank, dense_slots)
        dense = grads.new_zeros(seeds, dense_slots + 1, dim).index_add_(1, column, entries)
        flat = dense[:, :dense_slots].reshape(rows, frequent_count * dim)
        gramian = gramian + flat @ flat.T
    return gramian.view(rows, rows)


def _pairs_gramian(module: nn.Embedding, lookups: Sequence[_Lookup]) -> Tensor:
    """The pair form: one product per pair of tokens of the batch sharing an id.

    Each token pairs with itself: those products are the squared norms of the samples' output
    gradients, on the Gramian's sample diagonal. The other pairs are found by sorting the ids
    found more than once (most tokens, for a large vocabulary, are found once): each token pairs
    with the tokens before it in its group of equal ids, ``Σ_v c_v (c_v - 1) / 2``
    products of size ``K²·d`` over the ids ``v`` (``c_v`` occurrences), each added at its place and
    at the transposed one. On an accelerator, one host synchronisation (the numbers of repeated
    tokens and of pairs decide the shapes; see :func:`_counts_before_positions`). When
    the pairs would not fit one chunk (ids repeated very often, as frequent words in text), the
    entry form (:func:`_entry_pairs_gramian`) groups a sample's occurrences of an id first and
    handles frequent ids densely.
    """
    seeds, batch, _, dim = lookups[0].grads.shape
    rows = seeds * batch
    device = lookups[0].ids.device
    weighted = [_weighted_grads(lookup) for lookup in lookups]
    length: int | None = None  # tokens per sample, when one call gives all the tokens
    samples: Tensor | None = None
    if len(lookups) == 1:
        ids = lookups[0].ids.reshape(-1)
        grads = weighted[0].reshape(seeds, -1, dim)
        length = lookups[0].ids.shape[1]
    else:
        ids = torch.cat([lookup.ids.reshape(-1) for lookup in lookups])
        grads = torch.cat([grad.reshape(seeds, -1, dim) for grad in weighted], 1)
        samples = torch.cat(
            [
                torch.arange(batch, device=device).repeat_interleave(lookup.ids.shape[1])
                for lookup in lookups
            ]
        )
    # Tokens found once only pair with themselves: only the repeated ones are sorted.
    # `index_add_` rather than `bincount`, which reads the largest id on the host on CUDA.
    counts = torch.zeros(module.num_embeddings, dtype=torch.long, device=device)
    counts.index_add_(0, ids, torch.ones_like(ids))
    if module.padding_idx is not None:
        counts[module.padding_idx] = 0  # no gradient: kept out of the pairs
    token_counts = counts.index_select(0, ids)
    repeated = token_counts > 1
    pair_count: int | None = None
    if _counts_before_positions(device):
        # Host synchronisation (one): the numbers of repeated tokens and of pairs decide the
        # shapes. Each repeated token ends `count - 1` ordered pairs, half of them with a token
        # before it.
        repeated_count, ordered_pair_count = torch.stack(
            [repeated.sum(), (token_counts - 1).clamp(min=0).sum()]
        ).tolist()
        pair_count = ordered_pair_count // 2
        if pair_count * seeds * dim > _ELEMENTS_PER_CHUNK:
            return _entry_pairs_gramian(module, lookups)
        positions = torch.nonzero_static(repeated, size=repeated_count).squeeze(1)
    else:
        positions = repeated.nonzero().squeeze(1)
        repeated_count = positions.shape[0]
    if not repeated_count:
        return _self_pairs(weighted, seeds, batch)
    sorted_ids, order = torch.sort(ids.index_select(0, positions))
    order = positions.index_select(0, order)
    # Where each group of equal ids starts, by a running maximum (`unique_consecutive` would read
    # the number of groups on the host).
    sorted_positions = torch.arange(repeated_count, device=device)
    new_group = torch.ones(repeated_count, dtype=torch.bool, device=device)
    new_group[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_starts = torch.where(new_group, sorted_positions, 0).cummax(0).values
    # The number of tokens before each (sorted) token in its group: the pairs it ends.
    rank = sorted_positions - group_starts
    pair_ends = rank.cumsum(0)
    if pair_count is None:
        pair_count = int(pair_ends[-1])
        if pair_count * seeds * dim > _ELEMENTS_PER_CHUNK:
            return _entry_pairs_gramian(module, lookups)
    gramian = _self_pairs(weighted, seeds, batch)
    right = torch.repeat_interleave(rank, output_size=pair_count)
    # Pair `q` of the token at sorted position `r` is with the token at `r - 1 - (q - first_q)`.
    anchors = pair_ends + group_starts - 1
    left = anchors.index_select(0, right) - torch.arange(pair_count, device=device)
    left_tokens, right_tokens = order.index_select(0, left), order.index_select(0, right)
    if samples is None:
        assert length is not None
        left_samples = torch.div(left_tokens, length, rounding_mode="floor")
        right_samples = torch.div(right_tokens, length, rounding_mode="floor")
    else:
        left_samples = samples.index_select(0, left_tokens)
        right_samples = samples.index_select(0, right_tokens)
    flat = gramian.view(-1)
    if seeds == 1:
        products = torch.linalg.vecdot(
            grads[0].index_select(0, left_tokens), grads[0].index_select(0, right_tokens)
        )
        flat.index_add_(0, left_samples * rows + right_samples, products)
        flat.index_add_(0, right_samples * rows + left_samples, products)
        return gramian
    products = torch.einsum(
        "kpd,lpd->pkl", grads.index_select(1, left_tokens), grads.index_select(1, right_tokens)
    )
    seed_rows = torch.arange(seeds, device=device) * batch
    left_rows = (seed_rows + left_samples.unsqueeze(1)).unsqueeze(2)
    right_rows = (seed_rows + right_samples.unsqueeze(1)).unsqueeze(1)
    flat.index_add_(0, (left_rows * rows + right_rows).flatten(), products.flatten())
    flat.index_add_(0, (right_rows * rows + left_rows).flatten(), products.flatten())
    return gramian


def _counts_before_positions(device: torch.device) -> bool:
    """Whether to read the numbers of repeated tokens and of pairs before finding the tokens.

    On an accelerator, each read of a tensor's value (or of a data-dependent shape, as that of
    ``nonzero``) is a host synchronisation: both numbers are read at once, first. On the CPU,
    reading costs nothing more than the reduction, and ``nonzero`` (one pass) is cheaper than
    the two reductions and ``nonzero_static`` together.
    """
    return device.type != "cpu"


def _self_pairs(weighted: Sequence[Tensor], seeds: int, batch: int) -> Tensor:
    """The products of every token with itself, on the sample diagonal: ``[R, R]``.

    :param weighted: For each call, its weighted output gradients ``[K, B, T, d]``.
    """
    rows = seeds * batch
    own: Tensor | None = None
    for grads in weighted:
        per_sample = grads.reshape(seeds, batch, -1)
        if seeds == 1:
            # One pass, without the temporary of `(x * x).sum(-1)` (the size of the gradients).
            term = torch.linalg.vector_norm(per_sample[0], dim=1).square()
        else:
            term = torch.einsum("kix,lix->kli", per_sample, per_sample)
        own = term if own is None else own + term
    assert own is not None
    if seeds == 1:
        return torch.diag(own)
    gramian = own.new_zeros(rows, rows)
    gramian.view(seeds, batch, seeds, batch).diagonal(dim1=1, dim2=3).copy_(own)
    return gramian


def _ghost_cost(lookups: Sequence[_Lookup]) -> int:
    seeds, batch, _, dim = lookups[0].grads.shape
    rows = seeds * batch
    total = sum(lookup.ids.shape[1] for lookup in lookups)
    return rows * rows * total * total * (dim + 1)


def _vocabulary_cost(module: nn.Embedding, lookups: Sequence[_Lookup]) -> int:
    seeds, batch, _, dim = lookups[0].grads.shape
    rows = seeds * batch
    tokens = sum(lookup.ids.numel() for lookup in lookups)
    return seeds * tokens * dim + rows * rows * module.num_embeddings * dim


def _pairs_cost(lookups: Sequence[_Lookup]) -> int:
    """An upper bound: at most ``B`` entries share a token, so at most ``B`` pairs an entry."""
    seeds, batch, _, dim = lookups[0].grads.shape
    tokens = sum(lookup.ids.numel() for lookup in lookups)
    return _PAIRS_OVERHEAD + 4 * seeds * tokens * dim + tokens * batch * seeds * seeds * dim


class EmbeddingRule(GramianRule):
    """Rows, Gramian and weighted gradients of an embedding's ``weight``."""

    def needs_graph(self, module: nn.Module) -> bool:
        return False

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
        return _gramian(embedding, _lookups(embedding, calls, batched))

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
        return {"weight": _weighted_gradient(embedding, lookups, batched, weights)}

    def gramian_then_weighted_gradients(
        self, module: nn.Module, calls: Sequence[Call], params: Sequence[str], batched: bool
    ) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
        embedding = _as_embedding(module)
        check_params(params, ["weight"], module)
        # The lookups (ids, output gradients, token weights) serve both: read the calls once.
        lookups = _lookups(embedding, calls, batched)
        gramian = _gramian(embedding, lookups)

        def weighted(weights: Tensor) -> dict[str, Tensor]:
            gradient = _weighted_gradient(embedding, lookups, batched, weights)
            lookups.clear()
            return {"weight": gradient}

        return gramian, weighted


def _gramian(module: nn.Embedding, lookups: Sequence[_Lookup]) -> Tensor:
    """The Gramian by the cheapest exact form."""
    costs = {
        "ghost": _ghost_cost(lookups),
        "vocabulary": _vocabulary_cost(module, lookups),
        "pairs": _pairs_cost(lookups),
    }
    form = min(costs, key=costs.__getitem__)
    if form == "ghost":
        return _ghost_gramian(lookups)
    if form == "vocabulary":
        return _vocabulary_gramian(module, lookups)
    return _pairs_gramian(module, lookups)


def _weighted_gradient(
    module: nn.Embedding, lookups: Sequence[_Lookup], batched: bool, weights: Tensor
) -> Tensor:
    """``Σ_r weights[r] * row_r``: each token's output gradient, combined over the seeds with
    the weights of its rows and scaled by its token weight, added to the row of its id (sparse
    with ``sparse=True``, like autograd's gradient)."""
    seeds, batch, _, dim = lookups[0].grads.shape
    check_weights(weights, seeds, batch, batched)
    per_sample = weights.to(dtype=lookups[0].grads.dtype).view(seeds, batch)
    indices = []
    values = []
    for lookup in lookups:
        if seeds == 1:
            # One multiplication: the row weights and the token weights together.
            factor = per_sample[0].unsqueeze(1)
            if lookup.token_weights is not None:
                factor = factor * lookup.token_weights
            combined = lookup.grads[0] * factor.unsqueeze(-1)
        else:
            combined = combine_per_sample(lookup.grads, per_sample)
            if lookup.token_weights is not None:
                combined = combined * lookup.token_weights.unsqueeze(-1)
        indices.append(lookup.ids.reshape(-1))
        values.append(combined.reshape(-1, dim))
    ids = indices[0] if len(indices) == 1 else torch.cat(indices)
    grads = values[0] if len(values) == 1 else torch.cat(values)
    shape = (module.num_embeddings, dim)
    if module.sparse:
        # The indices are valid ids: the forward lookup succeeded with them.
        return torch.sparse_coo_tensor(ids.unsqueeze(0), grads, shape, check_invariants=False)
    return grads.new_zeros(shape).index_add_(0, ids, grads)


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
