"""The registry of per-layer Gramian rules, keyed by module type."""

from __future__ import annotations

from torch import nn

from ._base import GramianRule

_RULES: dict[type[nn.Module], GramianRule] = {}


def register_rule(module_type: type[nn.Module], rule: GramianRule) -> None:
    """Use ``rule`` for every module whose type is ``module_type`` or a subclass of it."""
    _RULES[module_type] = rule


def find_rule(module: nn.Module) -> GramianRule | None:
    """Return the rule of the closest registered class in ``type(module)``'s MRO, if any.

    A subclass that overrides ``forward`` below the registered class computes something else
    than what the rule assumes, so it gets no rule (the engine's exact fallback applies).
    """
    forward_owner = _forward_owner(type(module))
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            if not _is_library_class(forward_owner) and forward_owner is not cls:
                return None
            return rule
    return None


def _forward_owner(module_type: type[nn.Module]) -> type:
    for cls in module_type.__mro__:
        if "forward" in vars(cls):
            return cls
    return nn.Module


def _is_library_class(cls: type) -> bool:
    # Registered base classes (e.g. torch's _ConvNd) leave `forward` to torch's own subclasses.
    return cls.__module__.split(".")[0] == "torch"
