"""NF4Linear: a frozen linear layer whose weight is held in 4-bit NF4, as :func:`minipissa.load_residual` puts a
QPiSSA residual in place (y = deq(nf4(W_res)) x + bias). :func:`minipissa.load` with ``base="residual"`` turns it
into a PiSSA layer that keeps those very codes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.nf4 import NF4Weight
from ..core.weights import weight_matrix


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` or ``Conv1D`` (``fan_in_fan_out``: stored (in, out)) with an :class:`NF4Weight`.

    ``shell`` is the module it stands in for, with its tensors dropped (kept off the module tree): a PiSSA layer
    built on top unloads back to that class.
    """

    bias: nn.Parameter | None

    def __init__(self, shell: nn.Module, weight: NF4Weight, bias: Tensor | None, fan_in_fan_out: bool) -> None:
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.fan_in_fan_out = fan_in_fan_out
        self.shell = (shell,)  # a tuple: not registered as a submodule
        shell.weight, shell.bias = None, None  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out), with the weight dequantized to x's dtype."""
        return F.linear(x, weight_matrix(self.weight.dequantize(x.dtype), self.fan_in_fan_out), self.bias)

    def as_base(self) -> nn.Module:
        """The shell, holding a meta weight of the stored shape and dtype (what a PiSSA layer reads of its base)
        and the bias."""
        (shell,) = self.shell
        shell.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta"), False)
        shell.bias = self.bias  # type: ignore[assignment]
        return shell

    def extra_repr(self) -> str:
        return f"fan_in_fan_out={self.fan_in_fan_out}, bias={self.bias is not None}"
