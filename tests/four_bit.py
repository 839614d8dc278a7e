"""4-bit models for tests, quantized by bitsandbytes on the CPU (0.50.2 quantizes a Linear4bit at its first
``.to(device)``, "cpu" included), and bitsandbytes' own dequantization as the oracle (callers of those skip without
it); and the comparison of two adapted models, layer by layer, bit for bit."""

from __future__ import annotations

import logging

import torch
from torch import nn

import minipissa


def bnb():
    """bitsandbytes, imported quietly (it logs that its optional CPU GEMM kernels are missing: not used here)."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes

        return bitsandbytes
    finally:
        logger.setLevel(level)


def linear4bit(
    linear: nn.Linear,
    nested: bool,
    quant_type: str = "nf4",
    blocksize: int = 64,
    storage: torch.dtype = torch.uint8,
    device: str = "cpu",
) -> nn.Module:
    """A bitsandbytes Linear4bit holding ``linear``'s weight (quantized from its dtype, on ``device``) and a copy of
    its bias."""
    b = bnb()
    out_features, in_features = linear.weight.shape
    layer = b.nn.Linear4bit(
        in_features, out_features, bias=linear.bias is not None, quant_type=quant_type,
        compress_statistics=nested, quant_storage=storage,
    )  # fmt: skip
    layer.weight = b.nn.Params4bit(
        linear.weight.detach().clone(), quant_type=quant_type, blocksize=blocksize, compress_statistics=nested,
        quant_storage=storage, module=layer,
    )  # fmt: skip
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone())
    return layer.to(device)  # bitsandbytes quantizes here


def four_bit(model: nn.Module, nested: bool, **kwargs: object) -> nn.Module:
    """``model`` with every nn.Linear replaced by a Linear4bit of its weight and bias (in place; returned)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear4bit(module, nested, **kwargs))
    return model


def dequantized(weight: torch.Tensor, state: object | None = None) -> torch.Tensor:
    """bitsandbytes' dequantization of a Params4bit by its own steps: the first-level absmax as it computes it
    (double quantization: ``dequantize_blockwise(absmax, state2) + offset``), then its pure-torch reference
    ``_dequantize_4bit_compute``. (Its CPU C kernel, behind ``functional.dequantize_4bit``, cuts the blocks per row
    on AVX-512 CPUs: wrong where a row is not a multiple of the block; tests/core/test_nf4.py.)"""
    functional = bnb().functional
    from bitsandbytes.backends.default import ops

    state = weight.quant_state if state is None else state
    reference = getattr(ops._dequantize_4bit_compute, "__wrapped__", ops._dequantize_4bit_compute)
    absmax = state.absmax
    if state.nested:
        absmax = functional.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    code = functional.get_4bit_type(state.quant_type, device="cpu")
    flat = weight.data.reshape(-1).view(torch.uint8)
    shape = tuple(state.shape)
    return reference(flat, absmax, code, state.blocksize, shape, state.dtype).reshape(shape)


def plain_copy(model: nn.Module, like: nn.Module) -> nn.Module:
    """``like`` (a float model of the same architecture, changed in place) holding ``model``'s 4-bit weights as
    bitsandbytes dequantizes them, and its biases: the model apply() must treat ``model`` as."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in like.named_modules():
            if type(module) is nn.Linear:
                four = modules[name]
                module.weight = nn.Parameter(dequantized(four.weight))
                if four.bias is not None:
                    module.bias = nn.Parameter(four.bias.detach().clone())
    return like


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``: what bit-for-bit comparisons compare (NaN payloads and signed zeros included)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same_layers(a: nn.Module, b: nn.Module) -> None:
    """Two adapted models hold bit-identical PiSSA layers: factors, residual (codes or dense), bias, records."""
    la, lb = dict(minipissa.pissa_layers(a)), dict(minipissa.pissa_layers(b))
    assert la.keys() == lb.keys() and la
    for name, x in la.items():
        y = lb[name]
        assert x.quantized == y.quantized, name
        for t in ("A", "B", "A0", "B0", "bias"):
            assert torch.equal(bits(getattr(x, t)), bits(getattr(y, t))), (name, t)
        assert torch.equal(bits(x.stored_residual()), bits(y.stored_residual())), name
        for key in ("base_fingerprint", "residual_fingerprint", "nf4_error", "qlora_error", "singular_values"):
            assert x.info.get(key) == y.info.get(key), (name, key)
