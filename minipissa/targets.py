"""Which modules to adapt: name / suffix / regex patterns, "all-linear", exclusions, per-module values.

A pattern matches a module whose full dotted name equals it or ends with ``"." + pattern``; a
string starting with ``re:`` or a compiled regex must ``fullmatch`` the full name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from torch import nn

from .layer import PiSSALinear, is_conv1d

Pattern = str | re.Pattern[str]
Targets = Pattern | Sequence[Pattern]
ALL_LINEAR = "all-linear"
SUPPORTED = "nn.Linear and transformers-style Conv1D"
V = TypeVar("V")


def matches(name: str, pattern: Pattern) -> bool:
    """Whether a module's full dotted ``name`` matches one target ``pattern``."""
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _as_list(patterns: Targets | None) -> list[Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        return [patterns]
    return list(patterns)


def output_heads(model: nn.Module) -> set[str]:
    """Names of the output head(s): named ``lm_head``, returned by ``get_output_embeddings()``, or
    sharing its weight with an ``nn.Embedding`` (tied input/output embeddings)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "lm_head"
        or (head is not None and module is head)
        or id(getattr(module, "weight", None)) in embedding_weights
    }


def find_targets(model: nn.Module, targets: Targets, exclude: Targets | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to adapt, in model order.

    Raises:
        ValueError: a pattern matches no module (lists candidate names), or a matched module
            already is a PiSSALinear.
        TypeError: a matched module is of a type minipissa cannot adapt.
    """
    patterns, excluded = _as_list(targets), _as_list(exclude)
    if not patterns:
        raise ValueError("minipissa: `targets` is empty; name modules, e.g. ['q_proj', 'v_proj'], or 'all-linear'")
    inside_pissa = {f"{n}." for n, m in model.named_modules() if isinstance(m, PiSSALinear)}
    named = [(n, m) for n, m in model.named_modules() if n and not any(n.startswith(p) for p in inside_pissa)]
    all_linear = ALL_LINEAR in patterns
    patterns = [p for p in patterns if p != ALL_LINEAR]
    heads = output_heads(model) if all_linear else set()

    found: list[tuple[str, nn.Module]] = []
    hits = {id(p): 0 for p in patterns}
    for name, module in named:
        hit = [p for p in patterns if matches(name, p)]
        for p in hit:
            hits[id(p)] += 1
        if any(matches(name, p) for p in excluded):
            continue
        if all_linear and is_supported(module) and name not in heads:
            hit.append(ALL_LINEAR)
        if not hit:
            continue
        if isinstance(module, PiSSALinear):
            raise ValueError(f"minipissa: module '{name}' already is a PiSSALinear; apply() runs once per module")
        if not is_supported(module):
            raise TypeError(
                f"minipissa: module '{name}' matched target {hit[0]!r} but is a {type(module).__name__}; "
                f"supported are {SUPPORTED}. Use a more specific pattern or `exclude`."
            )
        found.append((name, module))

    unmatched = [p for p in patterns if hits[id(p)] == 0]
    if unmatched:
        raise ValueError(
            f"minipissa: target(s) {unmatched} match no module; candidates: {_candidates(named)}. "
            "A target matches a full name or a '.'-separated suffix of it; use 're:...' for a regex."
        )
    if not found:
        raise ValueError(f"minipissa: no module left to adapt after `exclude`; candidates: {_candidates(named)}")
    return found


def _candidates(named: list[tuple[str, nn.Module]], limit: int = 8) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in named if is_supported(m)})
    shown = ", ".join(suffixes[:limit]) + (", ..." if len(suffixes) > limit else "")
    return shown or f"none ({SUPPORTED} only)"


def value_for(name: str, spec: V | Mapping[str, V], what: str, default: V | None = None) -> V:
    """Per-module value of ``spec``: the value itself, or the first matching pattern of a mapping,
    whose key ``"*"`` is the default for every other module."""
    if not isinstance(spec, Mapping):
        return spec
    for pattern, value in spec.items():
        if pattern != "*" and matches(name, pattern):
            return value
    if "*" in spec:
        return spec["*"]
    if default is not None:
        return default
    raise ValueError(f"minipissa: no {what} for module '{name}' in {dict(spec)}; add a matching pattern or '*'")
