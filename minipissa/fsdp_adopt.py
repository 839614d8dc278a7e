"""FSDP2 bookkeeping when sharded init replaces a module that ``fully_shard`` manages.

These are FSDP2 internals (torch 2.13: ``FSDPParam._module_info``, ``FSDPState._fsdp_param_groups``); if
they change, the checks here fail loudly before anything is modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from .layer import PiSSALinear

if TYPE_CHECKING:
    from .model import _Plan


class FsdpAdoption:
    """Keeps FSDP2's bookkeeping right when a module it manages is replaced by a PiSSALinear.

    FSDP2 records, for each parameter, the module it sets the all-gathered tensor on. The weight and bias
    keep their Parameter objects, so only that module reference moves to the new layer. A and B are new:
    they get their own FSDP2 group on the layer (same mesh and policies as the enclosing group), so they
    are sharded, all-gathered and reduce-scattered like any parameter. These are FSDP2 internals
    (torch 2.13); if they change, the checks here fail loudly before anything is modified.
    """

    def __init__(self, model: nn.Module, plans: Sequence[_Plan]) -> None:
        self.found: dict[int, tuple[Any, list[Any]]] = {}
        try:
            from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state
        except ImportError:  # pragma: no cover
            return
        targets = {id(p.module): p.name for p in plans}
        for plan in plans:
            if _get_module_fsdp_state(plan.module) is not None:
                raise ValueError(
                    f"minipissa: fully_shard was applied to the target module '{plan.name}' itself; apply it "
                    "to the blocks that contain the targets (e.g. decoder layers) and to the root, then "
                    "minipissa.apply"
                )
        for module in model.modules():
            state = _get_module_fsdp_state(module)
            if state is None:
                continue
            if state._is_root is not None:
                raise RuntimeError(
                    "minipissa: this FSDP2 model has already run a forward pass; call minipissa.apply "
                    "before the first forward (FSDP2 fixes its parameter groups then)"
                )
            for group in state._fsdp_param_groups:
                for param in group.fsdp_params:
                    info = param._module_info
                    if any(id(m) in targets for m in info.shared_modules):
                        raise NotImplementedError("minipissa: a target module is shared (used twice) under FSDP2")
                    if id(info.module) in targets:
                        self.found.setdefault(id(info.module), (group, []))[1].append(param)

    def adopt(self, old: nn.Module, new: PiSSALinear) -> None:
        entry = self.found.get(id(old))
        if entry is None:  # a DTensor weight that FSDP2 does not manage
            return
        from torch.distributed.fsdp import fully_shard

        group, params = entry
        for param in params:
            param._module_info.module = new
        frozen = {p for p in (new.weight, new.bias) if p is not None}
        fully_shard(
            new,
            mesh=group.mesh_info.mesh,
            reshard_after_forward=group.post_forward_mesh_info is not None,
            mp_policy=group.mp_policy,
            offload_policy=group.offload_policy,
            ignored_params=cast(set[nn.Parameter], frozen),
        )
