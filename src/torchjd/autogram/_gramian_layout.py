"""From the differentiated tensor to seeds of the backward pass, and from rows back to its shape.

The engine's Jacobian has one row per entry of ``output``. With ``batch_dim`` set, the batch
dimension is moved last and the other dimensions are flattened into ``K`` seeds: row ``k * B + i``
belongs to sample ``i`` under seed ``k``, where seed ``k`` is ``e_k ⊗ 1_B`` (one backward pass gives
every sample's gradient at once, by batch independence). With ``batch_dim=None`` every entry is its
own seed (``K = output.numel()``, ``B = 1``). The ``[R, R]`` Gramian is finally laid out as the
generalized Gramian ``[m_1, ..., m_k, m_k, ..., m_1]`` of ``output``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Seeding:
    """How the rows of the Jacobian map to the entries of ``output``.

    :param seeds: ``None`` for a single seed of ones (``K = 1``), else ``[K, *output.shape]``.
    :param num_seeds: ``K``.
    :param batch_size: ``B`` (``1`` when ``batch_dim`` is ``None``).
    :param batch_dim: The non-negative batch dimension of ``output``, or ``None``.
    :param shape: The shape of ``output``.
    """

    seeds: Tensor | None
    num_seeds: int
    batch_size: int
    batch_dim: int | None
    shape: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return self.num_seeds * self.batch_size


def normalize_batch_dim(output: Tensor, batch_dim: int | None) -> int | None:
    """Return ``batch_dim`` as a non-negative index of ``output``'s dimensions.

    :raises IndexError: If ``output`` has no dimension ``batch_dim``.
    """
    if batch_dim is None:
        return None
    if output.ndim == 0:
        raise IndexError(
            f"Expected `output` to have a batch dimension {batch_dim} since `batch_dim` is not "
            "None; found a 0-dimensional tensor. Use `batch_dim=None` for a scalar output."
        )
    if not -output.ndim <= batch_dim < output.ndim:
        raise IndexError(
            f"Expected `batch_dim` to be in the range [{-output.ndim}, {output.ndim - 1}] for "
            f"an output of shape {tuple(output.shape)}; found {batch_dim}."
        )
    return batch_dim % output.ndim


def make_seeding(output: Tensor, batch_dim: int | None) -> Seeding:
    """Build the seeds of the engine's backward pass for ``output``.

    :param batch_dim: Already normalized by :func:`normalize_batch_dim`.
    """
    shape = tuple(output.shape)
    if batch_dim is None:
        num_seeds, batch_size = output.numel(), 1
        other_shape = shape
    else:
        batch_size = shape[batch_dim]
        other_shape = shape[:batch_dim] + shape[batch_dim + 1 :]
        num_seeds = math.prod(other_shape)
    if num_seeds == 1:
        return Seeding(None, 1, batch_size, batch_dim, shape)
    eye = torch.eye(num_seeds, dtype=output.dtype, device=output.device)
    if batch_dim is None:
        seeds = eye.reshape(num_seeds, *shape)
    else:
        seeds = (
            eye.reshape(num_seeds, *other_shape, 1)
            .expand(num_seeds, *other_shape, batch_size)
            .movedim(-1, 1 + batch_dim)
            .contiguous()
        )
    return Seeding(seeds, num_seeds, batch_size, batch_dim, shape)


def to_generalized_gramian(gramian: Tensor, seeding: Seeding) -> Tensor:
    """Lay out the ``[R, R]`` Gramian as ``[m_1, ..., m_k, m_k, ..., m_1]``."""
    shape = seeding.shape
    ndim = len(shape)
    if seeding.batch_dim is None:
        rows_shape = shape
    else:
        batch_dim = seeding.batch_dim
        rows_shape = shape[:batch_dim] + shape[batch_dim + 1 :] + (shape[batch_dim],)
    result = gramian.reshape(rows_shape + rows_shape)
    if seeding.batch_dim is not None and seeding.batch_dim != ndim - 1:
        result = result.movedim(
            (ndim - 1, 2 * ndim - 1), (seeding.batch_dim, ndim + seeding.batch_dim)
        )
    if ndim > 1:
        result = result.permute(*range(ndim), *reversed(range(ndim, 2 * ndim))).contiguous()
    return result


def to_row_weights(weights: Tensor, seeding: Seeding) -> Tensor:
    """Lay out weights of ``output``'s shape as one weight per row of the Jacobian, ``[R]``."""
    if seeding.batch_dim is not None:
        weights = weights.movedim(seeding.batch_dim, -1)
    return weights.reshape(-1)
