"""Which rule computes the Jacobian columns of which parameter.

For each module of the given trees (top-down, each module once): if a rule is registered for its
type, the rule covers ``rule.covered_parameters(module)``; its remaining trainable direct
parameters are covered by the generic fallback; then its children are visited, skipping the
parameters already covered by an ancestor (e.g. ``MultiheadAttention`` covers ``out_proj.weight``
without calling ``out_proj``). A parameter covered by two unrelated modules (tied weights) is
*shared*: its rows are the sums of both modules' per-row gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._rules import GramianRule, find_rule
from ._rules._fallback import FALLBACK_RULE


@dataclass(eq=False)
class Assignment:
    """A rule with the parameters it covers in one module, by the names the rule knows."""

    rule: GramianRule
    params: dict[str, nn.Parameter]


@dataclass(eq=False)
class Coverage:
    """The assignments of every hooked module, and what the engine knows of its parameters.

    :param assignments: For each hooked module, its rules and their parameters.
    :param shared: The ids of the parameters covered by more than one assignment.
    :param names: Readable names of every parameter of the engine's modules (frozen ones too), by
        id; a parameter in here but used outside the calls that cover it is an uncovered use.
    """

    assignments: dict[nn.Module, list[Assignment]] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)
    names: dict[int, str] = field(default_factory=dict)

    def covered_ids(self, module: nn.Module) -> frozenset[int]:
        return frozenset(
            id(param)
            for assignment in self.assignments.get(module, ())
            for param in assignment.params.values()
        )


def plan_coverage(modules: Sequence[nn.Module], batched: bool) -> Coverage:
    """Assign every trainable parameter of ``modules`` to a rule.

    :raises ValueError: If a rule refuses one of the modules (see :meth:`GramianRule.check`), or,
        with ``batched``, for a batch norm that always normalises with batch statistics.
    """
    coverage = Coverage()
    for index, root in enumerate(modules):
        prefix = f"modules[{index}]." if len(modules) > 1 else ""
        for name, param in root.named_parameters():
            coverage.names.setdefault(id(param), prefix + name)
    visited: set[int] = set()
    for root in modules:
        _visit(root, frozenset(), batched, coverage, visited)
    counts: dict[int, int] = {}
    for assignments in coverage.assignments.values():
        for assignment in assignments:
            for param in assignment.params.values():
                counts[id(param)] = counts.get(id(param), 0) + 1
    coverage.shared = {param_id for param_id, count in counts.items() if count > 1}
    return coverage


def _visit(
    module: nn.Module,
    inherited: frozenset[int],
    batched: bool,
    coverage: Coverage,
    visited: set[int],
) -> None:
    if id(module) in visited:
        return
    visited.add(id(module))
    assignments: list[Assignment] = []
    owned: set[int] = set()
    rule = find_rule(module)
    if rule is not None:
        covered = {
            name: param
            for name, param in rule.covered_parameters(module).items()
            if param.requires_grad and id(param) not in inherited
        }
        if covered:
            rule.check(module, batched)
            assignments.append(Assignment(rule, covered))
            owned.update(id(param) for param in covered.values())
    direct = {
        name: param
        for name, param in module.named_parameters(recurse=False)
        if param.requires_grad and id(param) not in inherited and id(param) not in owned
    }
    if direct:
        assignments.append(Assignment(FALLBACK_RULE, direct))
        owned.update(id(param) for param in direct.values())
    if assignments:
        if batched and isinstance(module, _BatchNorm) and not module.track_running_stats:
            raise ValueError(
                f"Found a module of type {type(module)} with `track_running_stats=False`, which "
                "normalises each sample with the statistics of the whole batch: samples are not "
                "independent, so the engine cannot use per-sample structure with `batch_dim` "
                "set. Use a per-sample normalisation (e.g. GroupNorm, LayerNorm, InstanceNorm), "
                "or `batch_dim=None`."
            )
        coverage.assignments[module] = assignments
    children_inherited = inherited | owned
    for child in module.children():
        _visit(child, children_inherited, batched, coverage, visited)
