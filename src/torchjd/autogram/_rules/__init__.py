"""Per-layer Gramian rules. Importing this package registers every rule."""

from . import _attention, _conv, _embedding, _linear, _norm, _rnn
from ._base import Call, GramianRule
from ._registry import find_rule, register_rule

__all__ = ["Call", "GramianRule", "find_rule", "register_rule"]
del _attention, _conv, _embedding, _linear, _norm, _rnn
