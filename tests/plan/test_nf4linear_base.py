"""Starting from minipissa's own 4-bit layers (plan/quantized_base.py): an NF4Linear target, its weight single- or
double-quantized, is decomposed from its dequantized weight exactly as its shell holding that weight; the NF4Linear
is left as it was; save/load onto a fresh copy, a refusal of another 4-bit weight, and unload follow.

No bitsandbytes here: the oracle is the dequantization written out below from nf4.py's and nf4_stats.py's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from four_bit import assert_same_layers, bits
from models import Conv1D
from snapshots import assert_unchanged, snapshot
from torch import nn

import minipissa
from minipissa import NF4Linear, StateError
from minipissa.core import nf4
from minipissa.plan.quantized_base import dense_weight, is_four_bit


def nf4_linear(module: nn.Module, dtype: torch.dtype, double_quant: bool) -> NF4Linear:
    """``module`` (an nn.Linear or the tests' Conv1D) turned into an NF4Linear of its weight."""
    conv = isinstance(module, Conv1D)
    weight = nf4.NF4Weight.quantized(module.weight.detach().to(dtype), double_quant=double_quant)
    return NF4Linear(module, weight, module.bias.detach().to(dtype), conv)


def by_hand(w: nf4.NF4Weight) -> torch.Tensor:
    """deq of an NF4Weight written out here: code[index] * its block's absmax in float32, cast once; the absmax of a
    double-quantized one is code8 * scale + offset of its group of 256 (a multiply, then an add, in float32)."""
    n, blocks = math.prod(w.shape), -(-math.prod(w.shape) // 64)
    if w.double_quant:
        per_block = [t.repeat_interleave(256)[:blocks] for t in (w.absmax_scale, w.absmax_offset)]
        absmax = w.absmax_codes.float() * per_block[0] + per_block[1]
    else:
        absmax = w.absmax
    index = torch.stack([w.codes >> 4, w.codes & 15], 1).reshape(-1)[:n].long()
    return (nf4.code_table()[index] * absmax.repeat_interleave(64)[:n]).to(w.dtype).reshape(w.shape)


def build(seed: int, conv: bool, double_quant: bool, sizes=(64, 40)) -> tuple[nn.Sequential, nn.Sequential]:
    """A one-layer model holding an NF4Linear (bfloat16 weight) and the same model holding its shell with deq(W)."""
    torch.manual_seed(seed)
    base = Conv1D(sizes[1], sizes[0]) if conv else nn.Linear(*sizes)
    four = nn.Sequential(nf4_linear(base, torch.bfloat16, double_quant))
    shell = Conv1D(sizes[1], sizes[0]) if conv else nn.Linear(*sizes)
    shell.weight = nn.Parameter(by_hand(four[0].weight))
    shell.bias = nn.Parameter(four[0].bias.detach().clone())
    return four, nn.Sequential(shell.to(torch.bfloat16))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_dense_weight_of_an_nf4linear_is_its_dequantized_weight(conv, double_quant):
    """(1024, 40): 640 blocks, so a double-quantized absmax spans three groups of 256, the last one partial."""
    four, plain = build(0, conv, double_quant, sizes=(1024, 40))
    assert is_four_bit(four[0]) and four[0].weight.double_quant == double_quant
    got = dense_weight(four[0])
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == plain[0].weight.shape
    assert torch.equal(bits(got), bits(plain[0].weight))


@pytest.mark.parametrize(
    ("conv", "quantize", "double_quant", "requantize_double"),
    [
        (False, None, False, False),
        (True, "nf4", False, True),
        (False, "nf4", True, False),
        (True, None, True, False),
        (False, "nf4", True, True),
    ],
)
def test_nf4linear_targets_are_decomposed_from_their_dequantized_weight(
    conv, quantize, double_quant, requantize_double, tmp_path
):
    """apply() on an NF4Linear (single or double-quantized: ``double_quant``) equals apply on its shell holding deq(W),
    the new residual dense or quantized either way (``requantize_double``); the NF4Linear is left as it was; save,
    then load onto a fresh copy; load onto another 4-bit weight is refused, the model unchanged; unload gives the
    shell's class back with the merged 16-bit weight."""
    four, plain = build(0, conv, double_quant)
    original, codes = four[0], four[0].weight.codes.clone()
    options = dict(quantize=quantize, double_quant=requantize_double)
    minipissa.apply(four, 4, "0", **options)  # (all-linear takes a Sequential's last layer for its head)
    minipissa.apply(plain, 4, "0", **options)
    assert_same_layers(four, plain)
    assert original.shell[0].weight is None and torch.equal(original.weight.codes, codes)  # the NF4Linear: untouched
    with torch.no_grad():
        minipissa.pissa_layers(four).__next__()[1].B.add_(0.01)
    minipissa.save(four, tmp_path / "a.safetensors")
    fresh, _ = build(0, conv, double_quant)
    minipissa.load(fresh, tmp_path / "a.safetensors")
    assert_same_layers(fresh, four)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(bits(fresh(x)), bits(four(x)))
    other, _ = build(1, conv, double_quant)
    before = snapshot(other)
    with pytest.raises(StateError, match="another 4-bit weight than the adapter's base"):
        minipissa.load(other, tmp_path / "a.safetensors")
    assert_unchanged(other, before)
    unloaded = minipissa.unload(fresh)[0]
    assert type(unloaded) is type(plain[0].base_shell[0]) and unloaded.weight.dtype == torch.bfloat16
