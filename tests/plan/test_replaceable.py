"""Modules a PiSSA layer cannot replace without losing something (hooks, their own forward, a parametrized or
hook-computed weight): apply() and load() refuse them up front with what to do, the model unchanged; subclasses that
keep nn.Linear's forward adapt; unload() refuses to drop hooks on a PiSSA layer."""

from __future__ import annotations

import pytest
import torch
from snapshots import assert_unchanged, snapshot
from test_targets import TinyLM
from torch import nn

import minipissa


class OwnForward(nn.Linear):
    """A Linear subclass that computes something else: a PiSSA layer would not run this forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Tagged(nn.Linear):
    """A Linear subclass that adds an attribute only (as torch's NonDynamicallyQuantizableLinear does)."""

    tag = "kept"


def _hook(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    return output * 0


HOOKED = {
    "forward hook": (lambda m: m.register_forward_hook(_hook), "forward hooks \\(_hook\\)"),
    "forward pre-hook": (lambda m: m.register_forward_pre_hook(lambda mod, a: None), "forward pre-hooks"),
    "kwargs forward hook": (
        lambda m: m.register_forward_hook(lambda mod, a, k, o: None, with_kwargs=True),
        "forward hooks",
    ),
    "full backward hook": (lambda m: m.register_full_backward_hook(lambda mod, gi, go: None), "backward hooks"),
    "backward pre-hook": (lambda m: m.register_full_backward_pre_hook(lambda mod, go: None), "backward pre-hooks"),
    "state-dict hook": (lambda m: m.register_state_dict_post_hook(lambda mod, sd, p, lm: None), "state-dict hooks"),
    "state-dict pre-hook": (lambda m: m.register_state_dict_pre_hook(lambda mod, p, k: None), "state-dict pre-hooks"),
    "load pre-hook": (
        lambda m: m.register_load_state_dict_pre_hook(lambda *a: None),
        "load_state_dict pre-hooks",
    ),
    "load post-hook": (
        lambda m: m.register_load_state_dict_post_hook(lambda mod, keys: None),
        "load_state_dict post-hooks",
    ),
    "own forward (subclass)": (lambda m: None, "its own forward \\(OwnForward.forward overrides"),
    "own forward (instance)": (lambda m: setattr(m, "forward", lambda x: x), "a forward of its own"),
    "weight_norm": (lambda m: torch.nn.utils.parametrizations.weight_norm(m), "parametrized tensors \\['weight'\\]"),
    "spectral_norm": (lambda m: torch.nn.utils.parametrizations.spectral_norm(m), "parametrized tensors"),
    "orthogonal": (lambda m: torch.nn.utils.parametrizations.orthogonal(m), "parametrized tensors"),
    "parametrized bias": (
        lambda m: torch.nn.utils.parametrize.register_parametrization(m, "bias", nn.Identity()),
        "parametrized tensors \\['bias'\\]",
    ),
    "legacy weight_norm": (lambda m: torch.nn.utils.weight_norm(m), "a weight computed by a hook"),
    "legacy spectral_norm": (lambda m: torch.nn.utils.spectral_norm(m), "a weight computed by a hook"),
}


def seeded() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def hooked_model(case: str) -> TinyLM:
    model = seeded()
    if case == "own forward (subclass)":  # the same tensors, in a class of its own
        plain, model.blocks[1].v_proj = model.blocks[1].v_proj, OwnForward(16, 16)
        model.blocks[1].v_proj.load_state_dict(plain.state_dict())
    HOOKED[case][0](model.blocks[1].v_proj)
    return model


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.nn.utils.weight_norm is deprecated
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
@pytest.mark.parametrize("case", sorted(HOOKED))
def test_what_a_pissa_layer_would_drop_is_refused_up_front(case, targets):
    """Hooks registered on a target, a subclass's own forward, a computed (parametrized) weight or bias: refused with
    the module and what to do, before anything changes (a parametrized weight used to fail midway, and hooks were
    silently lost)."""
    model = hooked_model(case)
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=f"module 'blocks.1.v_proj' has {HOOKED[case][1]}.*or `exclude` the module"
    ) as e:
        minipissa.apply(model, 4, targets)
    assert ("handle.remove()" in str(e.value)) == ("hook" in case)  # weight_norm's own hooks go with it: not named
    assert_unchanged(model, before)
    assert not list(minipissa.pissa_layers(model))
    minipissa.apply(model, 4, targets, exclude="blocks.1.v_proj")  # what the error offers works


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("case", sorted(HOOKED))
def test_load_refuses_what_a_pissa_layer_would_drop_too(case, tmp_path):
    adapter = tmp_path / "a.safetensors"
    minipissa.save(minipissa.apply(seeded(), 4, "v_proj"), adapter)
    model = hooked_model(case)
    before = snapshot(model)
    with pytest.raises(minipissa.StateError, match=f"module 'blocks.1.v_proj' has {HOOKED[case][1]}"):
        minipissa.load(model, adapter)
    assert_unchanged(model, before)


def test_hooks_registered_on_the_pissa_layer_after_apply_run_and_unload_refuses_to_drop_them():
    model = minipissa.apply(TinyLM(), 4, "v_proj")
    seen = []
    handle = model.blocks[1].v_proj.register_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    model(torch.tensor([[1, 2]]))
    assert seen == ["PiSSALinear"]
    before = snapshot(model)
    with pytest.raises(ValueError, match="unload: the PiSSA layer 'blocks.1.v_proj' has forward hooks"):
        minipissa.unload(model)
    assert_unchanged(model, before)
    handle.remove()
    minipissa.unload(model)


def test_torch_leftovers_of_a_removed_parametrization_are_no_hooks_to_refuse():
    """parametrizations.weight_norm leaves a load_state_dict pre-hook behind after its removal (no handle to remove
    it; it only renames old checkpoints' keys): the module then adapts, exactly."""
    model = TinyLM()
    layer = model.blocks[1].v_proj
    torch.nn.utils.parametrizations.weight_norm(layer)
    torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")
    assert layer._load_state_dict_pre_hooks and type(layer) is nn.Linear
    ids = torch.tensor([[1, 2, 3]])
    y = model(ids)
    minipissa.apply(model, 4, "v_proj")
    torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)


def test_a_linear_subclass_that_keeps_linears_forward_adapts_and_comes_back():
    torch.manual_seed(0)
    model = nn.Sequential(Tagged(8, 8), nn.Tanh(), nn.modules.linear.NonDynamicallyQuantizableLinear(8, 4))
    x = torch.randn(3, 8)
    y = model(x)
    minipissa.apply(model, 2, ["0", "2"])
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    minipissa.unload(model)
    assert type(model[0]) is Tagged and model[0].tag == "kept"
    assert type(model[2]) is nn.modules.linear.NonDynamicallyQuantizableLinear
