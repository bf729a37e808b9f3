"""Every example in a docstring of the package runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest
import torch

import torchjd


def _module_names() -> list[str]:
    names = ["torchjd"]
    for info in pkgutil.walk_packages(torchjd.__path__, prefix="torchjd."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module_name", _module_names())
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    torch.manual_seed(0)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
