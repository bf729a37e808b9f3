import importlib
import subprocess
import sys
import warnings

import pytest

import torchjd
from torchjd import autojac


def test_version_and_subpackages() -> None:
    assert torchjd.__version__ == "0.8.0"
    for name in ("aggregation", "autojac", "autogram"):
        assert hasattr(torchjd, name)


@pytest.mark.parametrize("name", ["backward", "mtl_backward"])
def test_deprecated_top_level_functions_warn_on_every_access(name: str) -> None:
    for _ in range(2):
        with pytest.warns(DeprecationWarning, match=f"Importing `{name}` from `torchjd`"):
            function = getattr(torchjd, name)
        assert function is getattr(autojac, name)


def test_deprecated_from_import_warns() -> None:
    with pytest.warns(DeprecationWarning):
        from torchjd import backward  # noqa: F401


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match=r"^module torchjd has no attribute nope$"):
        _ = torchjd.nope  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        exec("from torchjd import nope")


@pytest.mark.parametrize("package", ["torchjd.aggregation", "torchjd.autojac", "torchjd.autogram"])
def test_all_names_exist(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_import_needs_only_torch() -> None:
    code = (
        "import sys\n"
        "import torchjd\n"
        "heavy = {'scipy', 'cvxpy', 'quadprog', 'qpsolvers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    with warnings.catch_warnings():
        subprocess.run([sys.executable, "-c", code], check=True)
