"""The one-launch cast of every adapter's float32 masters per model forward (minipissa/casts.py).

The cast copies must be exactly what each layer would cast for itself (so outputs and gradients are
bit-identical with and without the hook), exist only during a forward, and never go stale."""

from __future__ import annotations

import pytest
import torch
from models import MLP
from torch import nn
from torch.utils.checkpoint import checkpoint

import minipissa
from minipissa.nn import casts
from minipissa.nn.layer import PiSSALinear


def layers(model: nn.Module) -> list[PiSSALinear]:
    return [layer for _, layer in minipissa.pissa_layers(model)]


def has_casts(layer: PiSSALinear) -> bool:
    """Whether the model's shared casts hold this layer's A and B for the forward running now."""
    shared = layer.shared_casts
    return shared is not None and shared.casts_for(layer, layer.weight.dtype, layer.A, layer.B) is not None


def bf16_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP((32, 48, 40, 24)).to(torch.bfloat16)
    return minipissa.apply(model, 4, "all-linear", niter=2)


def outputs_and_grads(model: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    loss = sum(model(x).float().square().mean() for x in xs)
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return [loss.detach(), *grads]


def test_hook_casts_are_bit_identical_to_per_layer_casts_forward_and_backward():
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    hooked, plain = bf16_model(), bf16_model()
    casts.remove(layers(plain))
    seen = []
    hooked.layers[1].register_forward_pre_hook(lambda m, a: seen.append(has_casts(m)))
    got, want = outputs_and_grads(hooked, [x]), outputs_and_grads(plain, [x])
    assert seen == [True], "the layer did not receive the model's casts"
    assert len(got) == len(want) == 7  # the loss, then dA and dB of 3 layers
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_two_forwards_before_one_backward_and_steps_in_between():
    """Each forward gets a fresh buffer: the first forward's saved casts survive the second; after
    an optimizer step the next forward sees the new masters."""
    hooked, plain = bf16_model(), bf16_model()
    casts.remove(layers(plain))
    xs = [torch.randn(5, 32, dtype=torch.bfloat16) for _ in range(2)]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (hooked, plain)]
    for _ in range(3):
        got, want = outputs_and_grads(hooked, xs), outputs_and_grads(plain, xs)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        for model, opt in zip((hooked, plain), opts, strict=True):
            for p in model.parameters():  # the gradients were cleared by outputs_and_grads: take new ones
                if p.requires_grad:
                    p.grad = torch.full_like(p, 0.01)
            opt.step()
    assert not torch.equal(hooked.layers[0].A, hooked.layers[0].A0)  # the masters did move


def test_casts_live_only_during_a_forward_even_when_it_fails():
    model = bf16_model()
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(has_casts(m)))
    model(torch.randn(2, 32, dtype=torch.bfloat16))
    assert seen == [True] and not any(has_casts(layer) for layer in layers(model))
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 31, dtype=torch.bfloat16))  # wrong width: the first layer fails
    assert not any(has_casts(layer) for layer in layers(model))


def test_layers_outside_the_model_forward_cast_for_themselves():
    """A checkpointed block recomputes in backward, after the hook has taken the casts back, and a
    layer can be called alone: both must still compute with the current masters."""
    model, plain = bf16_model(), bf16_model()
    casts.remove(layers(plain))
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    for m in (model, plain):
        y = checkpoint(m.layers[0], x, use_reentrant=False)
        y.float().sum().backward()
    assert torch.equal(model.layers[0].A.grad, plain.layers[0].A.grad)
    alone = model.layers[2](torch.randn(3, 40, dtype=torch.bfloat16))
    assert alone.dtype == torch.bfloat16


def test_unload_removes_the_hooks_and_apply_again_refreshes_them():
    model = bf16_model()
    shared = model.layers[0].shared_casts
    assert shared is not None and all(layer.shared_casts is shared for layer in layers(model))
    minipissa.unload(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    minipissa.apply(model, 2, "layers.0")
    minipissa.apply(model, 2, "layers.1")  # a second apply: one set of hooks for all layers
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    assert model.layers[0].shared_casts is model.layers[1].shared_casts is not shared


def test_a_copy_made_before_its_master_changed_is_not_used():
    """Between the model's pre-hook and the layer, a wrapper may swap a master's storage (FSDP does,
    in its own hooks) or update it in place: the layer must then cast the current master itself."""
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    for change in ("swap", "in-place"):
        model = bf16_model()
        first = model.layers[0]

        def meddle(module: nn.Module, args: object, change: str = change) -> None:
            with torch.no_grad():
                if change == "swap":
                    module.A.data = module.A.data.clone() * 2
                else:
                    module.A.mul_(2)

        handle = first.register_forward_pre_hook(meddle)
        got = model(x)
        handle.remove()
        plain = bf16_model()
        casts.remove(layers(plain))
        with torch.no_grad():
            plain.layers[0].A.mul_(2)
        assert torch.equal(got, plain(x)), change


class Branches(nn.Module):
    """Two adapted branches, one of which a forward may skip."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, both: bool = True) -> torch.Tensor:
        y = self.first(x)
        return self.second(y) if both else y


def test_an_adapter_a_forward_skips_gets_no_gradient_as_an_unused_parameter():
    """The one cast per forward is differentiable; an adapter whose layer did not run gets grad None (not zeros,
    which AdamW would step with its momentum), its float32 master's gradient equals the per-layer casts' one."""
    torch.manual_seed(0)
    hooked = minipissa.apply(Branches().to(torch.bfloat16), 4, ["first", "second"], niter=2)
    plain = minipissa.apply(Branches().to(torch.bfloat16), 4, ["first", "second"], niter=2)
    plain.load_state_dict(hooked.state_dict())
    casts.remove(layers(plain))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    for model in (hooked, plain):
        model(x, both=False).float().square().sum().backward()
    assert hooked.second.A.grad is None and hooked.second.B.grad is None
    assert hooked.first.A.grad is not None and hooked.first.A.grad.dtype == torch.float32
    assert torch.equal(hooked.first.A.grad, plain.first.A.grad) and torch.equal(hooked.first.B.grad, plain.first.B.grad)
