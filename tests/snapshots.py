"""Everything a failed call must leave as it was: the modules (by name and type, aliases included), tensors (bit
for bit, with dtypes), requires_grad, and the forward hooks of every module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Snapshot:
    modules: list[tuple[str, type]]
    state: dict[str, torch.Tensor]
    trainable: dict[str, bool]
    hooks: list[tuple[str, int, int]]


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()],
    )


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    now = snapshot(model)
    assert now.modules == before.modules, "modules were replaced"
    assert now.state.keys() == before.state.keys(), "state-dict keys changed"
    for key, tensor in before.state.items():
        assert now.state[key].dtype == tensor.dtype and same_bits(now.state[key], tensor), key
    assert now.trainable == before.trainable, "requires_grad changed"
    assert now.hooks == before.hooks, "hooks changed"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN included, which torch.equal calls unequal to itself)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_meta:  # no values to compare
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def editable(path: object) -> tuple[dict, dict[str, torch.Tensor]]:
    """A minipissa file's payload (without what safefile.write adds: checksums, version, kind) and tensors, to
    edit and write again with recomputed checksums (crafted files)."""
    from minipissa.io import safefile

    info, tensors = safefile.read(path)  # type: ignore[arg-type]
    added = (safefile.BLOB_SHA_FIELD, "tensors_sha256", "format_version", "kind")
    return {k: v for k, v in info.items() if k not in added}, tensors


def assert_refused(model: nn.Module, call: object, match: str, error: type[Exception] | None = None) -> None:
    """``call(model)`` raises (a StateError by default) matching ``match`` and leaves ``model`` bit-identical."""
    import pytest

    from minipissa import StateError

    before = snapshot(model)
    with pytest.raises(error or StateError, match=match):
        call(model)  # type: ignore[operator]
    assert_unchanged(model, before)
