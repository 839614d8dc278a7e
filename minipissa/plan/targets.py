"""Which modules to adapt: name / suffix / regex patterns, "all-linear", exclusions, per-module values.

A pattern matches a module whose full dotted name equals it or ends with ``"." + pattern``; a
string starting with ``re:`` or a compiled regex must ``fullmatch`` the full name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from torch import nn
from torch.nn.utils import parametrize

from ..core.weights import is_conv1d
from ..nn.layer import PiSSALinear
from ..nn.nf4_linear import NF4Linear
from .replaceable import refusal

Pattern = str | re.Pattern[str]
Targets = Pattern | Sequence[Pattern]
ALL_LINEAR = "all-linear"
SUPPORTED = "nn.Linear and transformers-style Conv1D"
#: Leaf names of output layers, which "all-linear" leaves alone: language-model and classification heads.
HEAD_NAMES = ("lm_head", "classifier", "score")
V = TypeVar("V")


def matches(name: str, pattern: Pattern) -> bool:
    """Whether a module's full dotted ``name`` matches one target ``pattern``."""
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def is_supported(module: nn.Module) -> bool:
    """A Linear (bitsandbytes' Linear4bit among them) or a Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_target(module: nn.Module) -> bool:
    """What apply() adapts: :func:`is_supported`, or a 4-bit NF4Linear (its dequantized weight: quantized_base.py)."""
    return is_supported(module) or isinstance(module, NF4Linear)


def check_pattern(pattern: object, what: str) -> Pattern:
    """``pattern`` if it is a pattern (a str, or a compiled regex; a 're:' string must compile), else an error
    naming ``what`` it is (e.g. "`targets` pattern")."""
    if not isinstance(pattern, (str, re.Pattern)):
        raise TypeError(
            f"minipissa: {what} must be a module name, a 're:' regex or a compiled regex; got {pattern!r:.80}"
        )
    if isinstance(pattern, str) and pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"minipissa: {what} {pattern!r} is not a valid regex: {e}") from None
    return pattern


def _as_list(patterns: Targets | None, what: str) -> list[Pattern]:
    """The patterns as a list, each checked (:func:`check_pattern`)."""
    if patterns is None:
        return []
    found = [patterns] if isinstance(patterns, (str, re.Pattern)) else patterns
    if not isinstance(found, Sequence) or not all(isinstance(p, (str, re.Pattern)) for p in found):
        raise TypeError(
            f"minipissa: `{what}` must be a module name, a 're:' regex, a compiled regex, or a list of them; "
            f"got {patterns!r:.80}"
        )
    return [check_pattern(p, f"`{what}` pattern") for p in found]


def output_heads(model: nn.Module) -> set[str]:
    """Names of the output layer(s): named ``lm_head``, ``classifier`` or ``score``, returned by
    ``get_output_embeddings()``, sharing a weight with an ``nn.Embedding`` (tied embeddings), or the last
    layer of a model that is an ``nn.Sequential``."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    last = [str(len(model) - 1)] if isinstance(model, nn.Sequential) and len(model) else []
    return {
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in HEAD_NAMES
        or (head is not None and module is head)
        or id(dict(module.named_parameters(recurse=False)).get("weight")) in embedding_weights  # a parametrized
        # weight is computed when read (and spectral_norm's changes its state): never read here
    } | set(last)


def read_by_owner(model: nn.Module) -> set[str]:
    """Linear layers whose parent reads ``.weight`` itself instead of calling them: ``nn.MultiheadAttention``'s
    ``out_proj`` (``F.multi_head_attention_forward``). An adapter there would never run."""
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def find_targets(
    model: nn.Module, targets: Targets, exclude: Targets | None = None, *, adapted: bool = False
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to adapt, in model order (``adapted``: PiSSA layers too, to add an adapter to).

    Raises:
        ValueError: a pattern (of ``targets`` or ``exclude``) matches no module (lists candidate names), or a
            matched module already is a PiSSALinear, or is one its parent bypasses (MultiheadAttention).
        TypeError: a matched module is of a type minipissa cannot adapt, or a pattern is not a pattern.
    """
    patterns, excluded = _as_list(targets, "targets"), _as_list(exclude, "exclude")
    if not patterns:
        raise ValueError("minipissa: `targets` is empty; name modules, e.g. ['q_proj', 'v_proj'], or 'all-linear'")
    named = _candidate_modules(model)
    all_linear = ALL_LINEAR in patterns
    patterns = [p for p in patterns if p != ALL_LINEAR]
    heads = output_heads(model) if all_linear else set()
    bypassed = read_by_owner(model)

    found: list[tuple[str, nn.Module]] = []
    hits = {id(p): 0 for p in patterns + excluded}
    for name, module in named:
        hit = [p for p in patterns if matches(name, p)]
        out = [p for p in excluded if matches(name, p)]
        for p in hit + out:
            hits[id(p)] += 1
        if out:
            continue
        linear = is_target(module) or (adapted and isinstance(module, PiSSALinear))
        if all_linear and linear and name not in heads and name not in bypassed:
            hit.append(ALL_LINEAR)
        if hit:
            if not (adapted and isinstance(module, PiSSALinear)):
                _check_target(name, module, hit[0], name in bypassed)
            found.append((name, module))

    unmatched = [p for p in patterns if hits[id(p)] == 0]
    if unmatched:
        raise ValueError(
            f"minipissa: target(s) {unmatched} match no module; candidates: {_candidates(named)}. "
            "A target matches a full name or a '.'-separated suffix of it; use 're:...' for a regex."
        )
    unused = [p for p in excluded if hits[id(p)] == 0]
    if unused:
        raise ValueError(f"minipissa: exclude pattern(s) {unused} match no module (a typo?); candidates: "
                         f"{_candidates(named)}")  # fmt: skip
    if not found and not any(hits[id(p)] for p in excluded):  # only 'all-linear' was asked, and found nothing
        raise ValueError(
            f"minipissa: 'all-linear' found no {SUPPORTED} to adapt outside the output head(s) {sorted(heads)}; "
            f"name the modules to adapt instead; candidates: {_candidates(named)}"
        )
    if not found:
        raise ValueError(f"minipissa: no module left to adapt after `exclude`; candidates: {_candidates(named)}")
    return found


def _check_target(name: str, module: nn.Module, pattern: Pattern, bypassed: bool) -> None:
    """A named error if the module ``pattern`` matched cannot be adapted."""
    if isinstance(module, PiSSALinear):
        raise ValueError(
            f"minipissa: module '{name}' already is a PiSSALinear; apply() runs once per module and adapter: pass "
            "name='...' to add another adapter beside it"
        )
    if not is_target(module):
        raise TypeError(
            f"minipissa: module '{name}' matched target {pattern!r} but is a {type(module).__name__}; "
            f"supported are {SUPPORTED}. Use a more specific pattern or `exclude`."
        )
    problem = refusal(name, module)
    if problem:
        raise ValueError(problem)
    if bypassed:
        raise ValueError(
            f"minipissa: module '{name}' is the out_proj of an nn.MultiheadAttention, which reads its weight "
            "directly and never calls it, so an adapter there would never run. `exclude` it (all-linear "
            "skips it), or adapt a model whose attention calls its projections (e.g. Hugging Face models)"
        )


def _candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a pattern may match: all but the root, a PiSSA layer's own children, and the modules
    of torch's parametrizations (they compute a tensor of their parent, which is refused itself, with what to do)."""
    inside = {f"{n}." for n, m in model.named_modules() if isinstance(m, PiSSALinear)} | {
        f"{n}.parametrizations." if n else "parametrizations."
        for n, m in model.named_modules()
        if parametrize.is_parametrized(m)
    }
    return [(n, m) for n, m in model.named_modules() if n and not any(n.startswith(p) for p in inside)]


def shared_tensors(model: nn.Module, found: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Why each target whose weight or bias another module also holds (tied weights) cannot be adapted: PiSSA
    would replace the tensor for this module only, untying them."""
    holders: dict[int, set[str]] = {}
    names: dict[int, set[str]] = {}  # one walk of the tree: a walk per target is quadratic (seconds for a 7B model)
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), set()).add(name)
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(name)
    problems = []
    for name, module in found:
        aliases = names[id(module)]
        for kind in ("weight", "bias"):
            tensor = getattr(module, kind, None)
            others = sorted(holders.get(id(tensor), set()) - aliases) if tensor is not None else []
            if others:
                problems.append(f"'{name}' shares its {kind} with '{others[0]}'")
    return problems


def _candidates(named: list[tuple[str, nn.Module]], limit: int = 8) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in named if is_target(m)})
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
