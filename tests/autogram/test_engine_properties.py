"""Random shapes, batch positions and reuse patterns, against the reference (Hypothesis)."""

from __future__ import annotations

import itertools

import torch
from _autogram_zoo import reference_gramian
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torchjd.autogram import Engine


@settings(max_examples=20, deadline=None)
@given(
    batch_size=st.integers(1, 4),
    positions=st.integers(1, 3),
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    batch_position=st.integers(0, 2),
    batched=st.booleans(),
    reuse_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_random_mlps(
    batch_size: int,
    positions: int,
    widths: list[int],
    batch_position: int,
    batched: bool,
    reuse_last: bool,
    dtype: torch.dtype,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    model = nn.Sequential(*layers).to(dtype)
    last = nn.Linear(widths[-1], widths[-1]).to(dtype)
    engine = Engine(model, last, batch_dim=batch_position if batched else None)
    hidden = model(torch.randn(batch_size, positions, widths[0], dtype=dtype))
    out = last(hidden)
    if reuse_last:
        out = last(torch.sin(out)) + out
    output = out.movedim(0, batch_position)
    gramian = engine.compute_gramian(output)
    params = [*model.parameters(), *last.parameters()]
    expected = reference_gramian(output, params)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(gramian, expected, rtol=10 * tolerance, atol=tolerance * scale)
