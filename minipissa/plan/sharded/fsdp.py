"""FSDP2 bookkeeping when sharded init replaces a module that ``fully_shard`` manages.

FSDP2 has no public way to swap a module it manages, so this reads its internals, in the layouts of the
torch versions it was tested on: 2.11 (``FSDPState._fsdp_param_group``, one group) and 2.13
(``FSDPState._fsdp_param_groups``, a list), with ``FSDPParam._module_info`` in both. On any other layout the
check fails with a named error before anything is modified: apply minipissa before ``fully_shard`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from torch import nn

from ..tree import Plan

_INSTEAD = (
    "this torch version's FSDP2 internals are not the ones minipissa knows (tested: torch 2.11 and 2.13). "
    "Call minipissa.apply before fully_shard instead (A and B are then sharded like any parameter)"
)


def _fsdp_state_of() -> Any:
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state
    except ImportError:
        raise NotImplementedError(f"minipissa: sharded init under FSDP2: {_INSTEAD}") from None
    return _get_module_fsdp_state


def _param_groups(state: Any) -> list[Any]:
    """The FSDPParamGroups of one FSDP2 state: a list in torch 2.13, a single (optional) group in 2.11."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if isinstance(groups, list):
        return groups
    if "_fsdp_param_group" in vars(state):  # torch 2.11: a plain attribute, None for a module without params
        group = vars(state)["_fsdp_param_group"]
        return [] if group is None else [group]
    raise NotImplementedError(f"minipissa: sharded init under FSDP2: {_INSTEAD}")


class FsdpAdoption:
    """Keeps FSDP2's bookkeeping right when a module it manages is replaced by a PiSSALinear.

    FSDP2 records, for each parameter, the module it sets the all-gathered tensor on. The weight and bias
    keep their Parameter objects, so only that module reference moves to the new layer. A and B are new:
    they get their own FSDP2 group on the layer (same mesh and policies as the enclosing group), so they
    are sharded, all-gathered and reduce-scattered like any parameter. Everything is checked in the
    constructor, before the model changes.
    """

    def __init__(self, model: nn.Module, plans: Sequence[Plan]) -> None:
        self.found: dict[int, tuple[Any, list[Any]]] = {}
        state_of = _fsdp_state_of()
        targets = {id(p.module): p.name for p in plans}
        for plan in plans:
            if state_of(plan.module) is not None:
                raise ValueError(
                    f"minipissa: fully_shard was applied to the target module '{plan.name}' itself; apply it "
                    "to the blocks that contain the targets (e.g. decoder layers) and to the root, then "
                    "minipissa.apply"
                )
        for module in model.modules():
            state = state_of(module)
            if state is None:
                continue
            if getattr(state, "_is_root", None) is not None:
                raise RuntimeError(
                    "minipissa: this FSDP2 model has already run a forward pass; call minipissa.apply "
                    "before the first forward (FSDP2 fixes its parameter groups then)"
                )
            for group in _param_groups(state):
                for param in group.fsdp_params:
                    info = getattr(param, "_module_info", None)
                    if info is None:
                        raise NotImplementedError(f"minipissa: sharded init under FSDP2: {_INSTEAD}")
                    if any(id(m) in targets for m in info.shared_modules):
                        raise NotImplementedError("minipissa: a target module is shared (used twice) under FSDP2")
                    if id(info.module) in targets:
                        self.found.setdefault(id(info.module), (group, []))[1].append(param)

    def adopt(self, old: nn.Module, new: nn.Module) -> None:
        """Point FSDP2's records from ``old`` to ``new`` (a PiSSALinear) and shard its A and B."""
        entry = self.found.get(id(old))
        if entry is None:  # a DTensor weight that FSDP2 does not manage
            return
        from torch.distributed.fsdp import fully_shard

        group, params = entry
        for param in params:
            param._module_info.module = new
        frozen = {p for p in (getattr(new, "weight", None), getattr(new, "bias", None)) if p is not None}
        fully_shard(
            new,
            mesh=group.mesh_info.mesh,
            reshard_after_forward=group.post_forward_mesh_info is not None,
            mp_policy=group.mp_policy,
            offload_policy=group.offload_policy,
            ignored_params=cast(set[nn.Parameter], frozen),
        )
