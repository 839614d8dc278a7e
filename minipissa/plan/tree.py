"""The model tree: one module to adapt (:class:`Plan`), the one builder of its layer, and the tree helpers
that apply(), load() and sharded init share: the model inside torch's wrappers, list the PiSSA layers, put a layer
in place, freeze all but A/B."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from typing import Any, cast

from torch import Tensor, nn

from ..core.errors import StateError, as_module
from ..core.nf4 import NF4Weight
from ..core.weights import weight_matrix
from ..nn.layer import PiSSALinear
from . import trained
from .settings import Settings


@dataclasses.dataclass(frozen=True, init=False)
class Plan(Settings):
    """One module to adapt and its settings: resolved from apply()'s options, or a file's record (load)."""

    name: str = dataclasses.field(kw_only=True)
    module: nn.Module = dataclasses.field(kw_only=True)

    def __init__(self, name: str, module: nn.Module, settings: Settings) -> None:
        """``settings``: resolved from apply()'s options, or a file's record (a record is a :class:`Settings`)."""
        for f in dataclasses.fields(Settings):
            object.__setattr__(self, f.name, getattr(settings, f.name))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "module", module)

    @property
    def weight(self) -> Tensor:
        """The module's stored weight, (out, in) or (in, out) when ``fan_in_fan_out``; read when needed, so
        that a replaced module's weight can be freed at once."""
        return cast(Tensor, self.module.weight)

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the weight matrix."""
        out_features, in_features = weight_matrix(self.weight, self.fan_in_fan_out).shape
        return out_features, in_features


def build_layer(
    plan: Plan,
    a0: Tensor,
    b0: Tensor,
    info: dict[str, Any],
    *,
    weight_is_residual: bool = False,
    residual: NF4Weight | Tensor | None = None,
    initial: tuple[Tensor, Tensor] | None = None,
) -> PiSSALinear:
    """The PiSSALinear for ``plan`` from its initial factors A0 (r, in), B0 (out, r); it takes the module's
    tensors over. ``weight_is_residual``: the module's weight already holds W_res (a residual file, or
    sharded init, which wrote it into the shards): the layer keeps that very Parameter. ``residual``: W_res
    made already: in 4 bits (QPiSSA: qpissa.py), for a quantizing plan, or dense (the streamed road made it).
    ``initial``: A0 and B0 copied to host memory already (:func:`~minipissa.core.host.host_copies`)."""
    if bool(plan.quantize) != isinstance(residual, NF4Weight):
        raise ValueError(f"build_layer: module '{plan.name}': quantize={plan.quantize!r} needs its NF4 residual")
    base = plan.module
    weight, bias = base.weight, base.bias
    layer = PiSSALinear(
        base, a0, b0, alpha=plan.alpha, rslora=plan.rslora, dropout=plan.dropout, fan_in_fan_out=plan.fan_in_fan_out,
        adapter_dtype=plan.adapter_dtype, info=info, base_is_residual=weight_is_residual, residual=residual,
        initial=initial,
    )  # fmt: skip
    if weight_is_residual:  # the same Parameter objects: a wrapper (FSDP2) may hold them
        layer.weight, layer.bias = cast(nn.Parameter, weight), cast(nn.Parameter | None, bias)
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
    return layer


def unwrap(model: nn.Module, what: str, *, adds_parameters: bool = False) -> nn.Module:
    """The model inside the wrappers torch puts around one, however nested: ``torch.compile``'s OptimizedModule
    (``._orig_mod``), DistributedDataParallel and DataParallel (``.module``); ``model`` itself if it is none of these
    (FSDP2's ``fully_shard`` changes the class in place and adds no name). Every public function taking a model starts
    here, so that the names it reads and writes (files, patterns, :func:`pissa_layers`) are the bare model's.

    ``adds_parameters``: the call ``what`` puts new parameters (A, B) into the model. Refused under DDP, whose reducer
    took the parameter list when it was built: the new ones would never be all-reduced, each rank training its own
    adapter. (DataParallel replicates ``.module`` at every forward, and compiled code re-traces a changed module.)
    """
    inner = model
    while True:
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            if adds_parameters:
                raise StateError(
                    f"minipissa.{what}: the model is wrapped in DistributedDataParallel, which keeps the parameter "
                    "list it was built with: the adapters' A and B would not be synchronised across ranks. Call it "
                    f"on the bare model before wrapping: model = DistributedDataParallel(minipissa.{what}(model, ...))"
                )
            inner = cast(nn.Module, inner.module)
        elif isinstance(inner, nn.DataParallel):
            inner = cast(nn.Module, inner.module)
        elif _is_compiled(inner):
            inner = cast(nn.Module, inner._orig_mod)
        else:
            return inner


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is torch.compile's wrapper, torch._dynamo.eval_frame.OptimizedModule (checked on torch 2.11
    and 2.13): found by isinstance where torch has it (torch.compile loads that module; importing it here would make
    every import of minipissa pay for torch's compiler), else by its class name, so that a torch which moved the
    class still unwraps; either way its ``_orig_mod``, the documented way back to the compiled module, must be a
    module."""
    if not isinstance(getattr(module, "_orig_mod", None), nn.Module):
        return False
    known = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    if isinstance(known, type) and isinstance(module, known):
        return True
    return any(cls.__name__ == "OptimizedModule" for cls in type(module).__mro__)


def pissa_layers(model: nn.Module) -> Iterator[tuple[str, PiSSALinear]]:
    """(full name, layer) for every PiSSALinear in ``model`` (inside torch's wrappers: :func:`unwrap`)."""
    for name, module in unwrap(as_module(model, "pissa_layers"), "pissa_layers").named_modules():
        if isinstance(module, PiSSALinear):
            yield name, module


def adapted_layers(model: nn.Module, what: str) -> list[tuple[str, PiSSALinear]]:
    """The model's PiSSA layers, for the operation ``what``; a StateError if it has none."""
    layers = list(pissa_layers(as_module(model, what)))
    if not layers:
        raise StateError(
            f"minipissa.{what}: the model has no PiSSA layers; call minipissa.apply() or minipissa.load() first"
        )
    return layers


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each module (by id) in ``model``, shared modules under all of theirs: one walk of the tree,
    for :func:`replace_module` calls in a loop (a walk per call is quadratic in the model's size)."""
    aliases: dict[int, list[str]] = {}
    for alias, module in model.named_modules(remove_duplicate=False):
        if alias:
            aliases.setdefault(id(module), []).append(alias)
    return aliases


def replace_module(model: nn.Module, name: str, new: nn.Module, aliases: dict[int, list[str]] | None = None) -> None:
    """Put ``new`` where the submodule ``name`` is, and wherever else that same module is registered (a module
    shared under two names stays shared). ``aliases``: :func:`module_aliases` of the model, taken before a loop of
    replacements (a replaced module's names then still point at it, which is what this needs)."""
    old = model.get_submodule(name)
    for alias in (module_aliases(model) if aliases is None else aliases).get(id(old), [name]):
        parent, _, child = alias.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


def train_adapters_only(model: nn.Module, what: str = "apply") -> None:
    """Only the A and B of every PiSSA layer, and the modules trained in full (trained.py), require gradients."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in pissa_layers(model):
        if not layer.absent:  # the model's active adapter is on this layer (several adapters: nn/adapters.py)
            layer.A.requires_grad_(True)
            layer.B.requires_grad_(True)
    modules = dict(model.named_modules())
    for name in trained.names(model, what):
        if name in modules:  # one deleted since has nothing to train (save refuses to lose it: io/trained_modules.pack)
            modules[name].requires_grad_(True)
