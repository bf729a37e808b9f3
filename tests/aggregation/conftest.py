"""Fixtures shared by the aggregation tests."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a whole test module: solvers that make many tiny LAPACK calls wait,
    at each of them, for any thread that a busy machine put to sleep."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
