"""Argument checks shared by :func:`backward` and :func:`mtl_backward`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor


def check_parallel_chunk_size(parallel_chunk_size: int | None) -> None:
    if parallel_chunk_size is not None and not isinstance(parallel_chunk_size, int):
        raise TypeError(
            "`parallel_chunk_size` should be `None` or an int. Found "
            f"`{type(parallel_chunk_size).__name__}`."
        )
    if parallel_chunk_size is not None and parallel_chunk_size <= 0:
        raise ValueError(
            "`parallel_chunk_size` should be `None` or greater than `0`. "
            f"(got {parallel_chunk_size})"
        )


def check_aggregator(aggregator: object) -> None:
    if isinstance(aggregator, type):
        raise TypeError(
            f"`aggregator` should be an aggregator instance (e.g. `{aggregator.__name__}()`), "
            f"not the class `{aggregator.__name__}`."
        )
    if not callable(aggregator):
        raise TypeError(
            f"`aggregator` should be an Aggregator. Found `{type(aggregator).__name__}`."
        )


def _check_all_tensors(items: Sequence[object], name: str) -> None:
    for item in items:
        if not isinstance(item, Tensor):
            raise TypeError(
                f"`{name}` should contain only Tensors. Found an element of type "
                f"`{type(item).__name__}`."
            )


def as_unique_tensors(value: Sequence[Tensor] | Tensor, name: str) -> list[Tensor]:
    """Return ``value`` as a list (a lone tensor becomes a one-element list); duplicates are an
    error, because each element stands for its own rows of the Jacobian."""
    if isinstance(value, Tensor):
        return [value]
    if not hasattr(value, "__len__"):
        raise TypeError(
            f"`{name}` should be a Tensor or a sequence of Tensors (a list or a tuple). Found "
            f"`{type(value).__name__}`."
        )
    items = list(value)
    _check_all_tensors(items, name)
    # Tensors hash by identity, so this detects the same tensor given twice.
    if len(dict.fromkeys(items)) != len(items):
        raise ValueError(f"`{name}` should contain unique elements.")
    return items


def as_ordered_set(value: Iterable[Tensor], name: str) -> list[Tensor]:
    """Return the tensors of ``value`` without duplicates, in order of first occurrence (like the
    ``inputs`` of :func:`torch.autograd.backward`)."""
    if isinstance(value, Tensor):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise TypeError(
                f"`{name}` should be an iterable of Tensors. Found `{type(value).__name__}`."
            ) from None
    _check_all_tensors(items, name)
    return list(dict.fromkeys(items))
