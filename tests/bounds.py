"""Worst-case rounding bounds for comparing two forwards of a chain of linear layers with tanh between them (the
models of tests/api/test_adapters*.py), derived from the standard floating-point model, not from the code under test.

Per layer, two computations of (nearly) the same linear map on inputs that differ by ``e`` (elementwise) differ by

    L·e + R·(|x| + e) + rb

where ``L`` (out, in) bounds the first one's matrix (|W_eff|), ``R`` (out, in) is the sum of u·|M| over every
rounding either of them makes (a residual rounded to its dtype: u_w·|W_res|; a matrix product over n terms: at most
n·u_a·|M|·|x| (Higham, Accuracy and Stability, Thm 3.5, gamma_n ~ n·u)), ``rb`` the rounding of the bias add, and
|x| the first computation's input. tanh is 1-Lipschitz; rounding its output to the activation dtype adds u_a·|x|
on each side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from minipissa.core.weights import weight_matrix


def unit(dtype: torch.dtype) -> float:
    """The unit roundoff of ``dtype`` (half its epsilon)."""
    return torch.finfo(dtype).eps / 2


def absolute(t: Tensor) -> Tensor:
    return t.detach().double().abs()


def stored(layer: torch.nn.Module) -> Tensor:
    """|W| (out, in) of a plain or PiSSA layer's stored weight, in float64."""
    flip = getattr(layer, "fan_in_fan_out", type(layer).__name__ == "Conv1D")
    return absolute(weight_matrix(layer.weight, flip))


def low_rank(b: Tensor, a: Tensor, s: float) -> Tensor:
    """s·|B|·|A| (out, in): bounds |s·B·A| elementwise, and the matrices a product through A then B rounds."""
    return abs(s) * absolute(b) @ absolute(a)


def chain(steps: Sequence[tuple[Tensor, Tensor, Tensor]], inputs: Sequence[Tensor], u_a: float) -> Tensor:
    """The bound on the outputs' difference (batch, out) of a chain: ``steps`` (L, R, rb) per layer, ``inputs`` the
    first computation's input of each layer (batch, in); tanh between layers, not after the last."""
    e = torch.zeros_like(absolute(inputs[0]))
    for i, ((lip, rounding, rb), x) in enumerate(zip(steps, inputs, strict=True)):
        if i:  # the tanh before this layer: 1-Lipschitz, its output rounded on each side
            e = e + 2 * u_a * absolute(x)
        e = e @ lip.mT + (absolute(x) + e) @ rounding.mT + rb
    return e


def gamma(n: int, u: float) -> float:
    """n·u / (1 - n·u): the bound of an n-term dot product's rounding, relative to the sum of |terms|."""
    return n * u / (1 - n * u)


def rounding_only(layers: Sequence[torch.nn.Module], x: Tensor) -> Tensor:
    """The bound (batch, out) on two forwards of one chain of PiSSA layers (tanh between), the same stored tensors,
    that differ in their rounding alone: another CPU's kernels (the order of a product's sums, fused multiply-adds,
    a vectorized tanh). Each layer rounds its dense product over n = in terms, its adapter path (x·Aᵀ over n terms,
    times s, then ·Bᵀ over r) and the two adds (the paths, the bias), on each side; tanh is taken to 1 ulp (SLEEF's
    vectorized tanh is accurate to 1.0 ulp, not the 0.5 of a correctly rounded one)."""
    steps, inputs, h = [], [], x
    with torch.no_grad():
        for layer in layers:
            u, n, r = unit(h.dtype), layer.in_features, layer.rank
            w = absolute(weight_matrix(layer.residual(h.dtype), layer.fan_in_fan_out))  # (out, in)
            ba = low_rank(layer.B, layer.A, layer.scaling)
            one_side = gamma(n, u) * w + (gamma(n, u) + gamma(r, u) + u) * ba + 2 * u * (w + ba)
            bias = torch.zeros(()) if layer.bias is None else absolute(layer.bias)
            steps.append((w + ba, 2 * one_side, 2 * 2 * u * bias))
            inputs.append(h)
            h = torch.tanh(layer(h))
    return chain(steps, inputs, 2 * unit(x.dtype))
