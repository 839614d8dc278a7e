"""Whether a module can be replaced by a PiSSALinear without losing anything, and why not.

A PiSSA layer computes W_res x + s·B·A x + bias from the module's stored tensors and nothing else: a weight
computed from other parameters (weight_norm, spectral_norm, any parametrization) would be frozen at its current
value and those parameters dropped; a subclass's own forward would not run; hooks registered on the module would
stay on the discarded module. Moving hooks over is not exact either: a hook would see the residual as ``.weight``
and other state-dict keys, and its handle would no longer remove it. So apply() and load() refuse such a module up
front (nothing changed), and say what to do; unload() refuses hooks on a PiSSA layer alike.
"""

from __future__ import annotations

from typing import cast

from torch import nn
from torch.nn.utils import parametrize

from .quantized_base import is_four_bit

#: The hook tables of an nn.Module (torch 2.x), with what they hold; a table a torch version lacks reads as empty.
HOOK_TABLES = {
    "_forward_pre_hooks": "forward pre-hooks",
    "_forward_hooks": "forward hooks",
    "_backward_pre_hooks": "backward pre-hooks",
    "_backward_hooks": "backward hooks",
    "_state_dict_pre_hooks": "state-dict pre-hooks",
    "_state_dict_hooks": "state-dict hooks",
    "_load_state_dict_pre_hooks": "load_state_dict pre-hooks",
    "_load_state_dict_post_hooks": "load_state_dict post-hooks",
}


#: Where torch's own hooks come from (see :func:`hooks_on`).
TORCH_OWN_HOOKS = ("torch.nn.utils.", "torch.distributed.fsdp.")


def hooks_on(module: nn.Module) -> list[str]:
    """The hooks registered on ``module`` itself, e.g. ``["forward hooks (log_output)"]``, but torch's own: those
    that torch.nn.utils leaves behind when a weight_norm or spectral_norm is removed (they only rename the keys of
    old checkpoints in load_state_dict, and come with no handle to remove them), and FSDP2's on the modules it
    manages (sharded init hands those modules over to the PiSSA layers: sharded/fsdp.py)."""
    found = []
    for table, what in HOOK_TABLES.items():
        unwrapped = [getattr(h, "hook", h) for h in (getattr(module, table, None) or {}).values()]  # _WrappedHook
        names = sorted(
            {
                getattr(fn, "__qualname__", type(fn).__name__)
                for fn in unwrapped
                if not getattr(fn, "__module__", "").startswith(TORCH_OWN_HOOKS)
            }
        )
        if names:
            found.append(f"{what} ({', '.join(names)})")
    return found


def replacement_losses(module: nn.Module) -> list[str]:
    """What putting a PiSSALinear in place of ``module`` would drop, each with what to do; empty when nothing."""
    lost = []
    if parametrize.is_parametrized(module):  # checked first: reading a parametrized weight may change it
        names = sorted(cast(nn.ModuleDict, module.parametrizations).keys())
        lost.append(
            f"parametrized tensors {names} (torch.nn.utils.parametrize: parametrizations.weight_norm, spectral_norm, "
            "orthogonal, ...): remove them first, torch.nn.utils.parametrize.remove_parametrizations(module, name)"
        )
    elif computed := _computed(module):
        lost.append(
            f"a {' and '.join(computed)} computed by a hook rather than stored (torch.nn.utils.weight_norm or "
            "spectral_norm): remove it first (torch.nn.utils.remove_weight_norm / remove_spectral_norm)"
        )
    if "forward" in vars(module):
        lost.append("a forward of its own (an instance attribute, set e.g. by accelerate's hooks): remove it")
    elif isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward and not is_four_bit(module):
        # (a 4-bit Linear's forward, dequantize then matmul, is what a PiSSA layer computes: quantized_base.py)
        lost.append(
            f"its own forward ({type(module).__qualname__}.forward overrides nn.Linear's), which a PiSSA layer would "
            "not run: adapt a plain nn.Linear (dequantize or convert it first)"
        )
    hooks = hooks_on(module)
    if hooks:
        lost.append(
            f"{'; '.join(hooks)}: remove them (handle.remove()), and register them on the PiSSA layer after apply() "
            "or load()"
        )
    return lost


def _computed(module: nn.Module) -> list[str]:
    """Which of the weight and bias of an unparametrized ``module`` are neither parameters, buffers nor submodules
    of it (NF4Linear's weight is an NF4Weight module): computed, by a hook."""
    own = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    own |= {n for n, _ in module.named_children()}
    return [k for k in ("weight", "bias") if getattr(module, k, None) is not None and k not in own]


def refusal(name: str, module: nn.Module) -> str | None:
    """Why ``module`` (at ``name``) cannot be replaced by a PiSSA layer without losing something, or None."""
    lost = replacement_losses(module)
    if not lost:
        return None
    return (
        f"minipissa: module '{name}' has {'; and '.join(lost)}; or `exclude` the module. A PiSSA layer in its place "
        "would silently drop this, so nothing was changed"
    )
