"""The registry of per-layer Gramian rules, keyed by module type."""

from __future__ import annotations

from torch import nn

from ._base import GramianRule

_RULES: dict[type[nn.Module], GramianRule] = {}


def register_rule(module_type: type[nn.Module], rule: GramianRule) -> None:
    """Use ``rule`` for every module whose type is ``module_type`` or a subclass of it."""
    _RULES[module_type] = rule


def find_rule(module: nn.Module) -> GramianRule | None:
    """Return the rule of the closest registered class in ``type(module)``'s MRO, if any."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None
