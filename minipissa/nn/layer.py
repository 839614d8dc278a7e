"""PiSSALinear: a frozen residual weight plus a trainable rank-r adapter.

    y = W_res x + s * B (A dropout(x)) + bias,        W_res = W - s * B0 A0

At init A = A0 and B = B0, so the layer computes exactly W x + bias. ``weight`` and ``bias`` keep the base layer's
names, dtype and layout (an ``nn.Linear`` stores W as (out, in); a GPT-2 style ``Conv1D`` stores it as (in, out),
"fan_in_fan_out"), so a model's state-dict keys after :func:`minipissa.apply` are the original keys plus ``A``,
``B``, ``A0`` and ``B0``. A0 and B0 live in host memory
(they are read only by :meth:`original` forwards, save and conversion), so that they take no device memory in
training, and are neither buffers nor parameters (DDP does not broadcast them each step); the state dict has them.

QPiSSA: ``weight`` may instead be an :class:`~minipissa.nf4.NF4Weight`, W_res in 4 bits (state-dict keys
``weight.codes`` and ``weight.absmax``), dequantized to the activations' dtype at each use:

    y = deq(nf4(W_res)) x + s * B (A dropout(x)) + bias

The layer has one road for either: it asks its ``weight_kind`` (weight_kinds.py) whatever depends on the kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.decompose import compute_dtype
from ..core.dtensor import full_tensor
from ..core.fingerprint import fingerprint
from ..core.host import host_copies
from ..core.made import Made
from ..core.nf4 import NF4Weight
from ..core.weights import factor_rank, frozen, is_conv1d, lora_scaling, residual_weight, weight_matrix
from .adapter_slot import BUFFERS, AdapterHost, device_only
from .casts import SharedCasts
from .ops import low_rank_linear
from .weight_kinds import DENSE, NF4, WeightKind, refuse_merge


def refuse_merged(layers: Iterable[PiSSALinear], mode: str) -> None:
    """original() and disabled() compute with the residual, which a merged layer does not hold as its weight."""
    if any(layer.merged for layer in layers):
        raise RuntimeError(f"minipissa.{mode}(): the model is merged; call minipissa.unmerge(model) first")


class PiSSALinear(AdapterHost):
    """A linear layer split into a frozen residual and a trainable low-rank adapter.

    Built from a base ``nn.Linear`` or ``Conv1D`` and factors A0 (r, in), B0 (out, r) in the decomposition dtype
    (float32, or float64 for float64 weights). The base's weight tensor is not modified: the residual is a new
    tensor (``base_is_residual=True``: the base already holds W_res), or ``residual``, W_res already made (QPiSSA:
    quantized; or dense, by the streaming init). The layer takes the base's tensors over and drops them from the
    base module.

    Attributes:
        weight: residual W_res, the base's dtype and layout, frozen; or an :class:`NF4Weight` (QPiSSA).
        weight_kind: what the layer asks of ``weight`` (weight_kinds.py: dense or NF4).
        bias: the base's bias (or None), frozen.
        A: (r, in) trainable, ``adapter_dtype`` (default: the decomposition dtype).
        B: (out, r) trainable.
        A0, B0: frozen copies of the initial factors in host memory, in the decomposition dtype whatever ``.to()``
            does to the module, so that :meth:`original` and conversion stay exact after ``model.half()``.
        info: metadata of the initialisation (init method, singular values, ...), JSON-able.
        mode: "adapter" (the default), "original" (W_res + s B0 A0) or "disabled" (W_res alone); with several
            adapters (nn/adapters.py) also "corrected", "absent" and "mixed".
        adapter_name, active: the name of the adapter the layer holds, and of the model's active adapter.
        order: the names of its adapters, in the order they came.
        residual_init: (A0, B0, s) that W_res was made from: the layer's own, or another adapter's.
        made: what the layer was made with (:class:`~minipissa.made.Made`), set by apply() and load(); what save()
            compares against to tell an edited residual or A0/B0. None for a layer built otherwise.
        shared_casts: the model's :class:`SharedCasts`, asked for A and B in the activations' dtype.
    """

    weight: nn.Parameter | NF4Weight
    weight_kind: WeightKind
    bias: nn.Parameter | None
    A: nn.Parameter
    B: nn.Parameter
    A0: Tensor
    B0: Tensor
    residual_while_merged: Tensor | None
    shared_casts: SharedCasts | None
    made: Made | None

    def __init__(
        self,
        base: nn.Module,
        a0: Tensor,
        b0: Tensor,
        *,
        alpha: float,
        rslora: bool = False,
        dropout: float = 0.0,
        fan_in_fan_out: bool | None = None,
        adapter_dtype: torch.dtype | None = None,
        info: dict[str, Any] | None = None,
        base_is_residual: bool = False,
        residual: NF4Weight | Tensor | None = None,
        initial: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """``residual``: W_res made already, 4-bit or dense (the streaming init makes it on the device, and the base
        may hold no values then). ``initial``: A0 and B0 already copied to host memory (apply() copies all layers' in
        one transfer)."""
        super().__init__()
        base_weight = cast(Tensor, base.weight)
        self.fan_in_fan_out = is_conv1d(base) if fan_in_fan_out is None else fan_in_fan_out
        out_features, in_features = weight_matrix(base_weight, self.fan_in_fan_out).shape
        rank = factor_rank(a0, b0, out_features, in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha, self.rslora = float(alpha), rslora
        self.scaling = lora_scaling(self.alpha, rank, rslora)
        self.info: dict[str, Any] = dict(info or {})
        self.mode = "adapter"
        self.shared_casts, self.made = None, None
        self.trainable_before_merge = (True, True)
        # Kept off the module tree (its tensors are dropped below, so no memory, no state-dict keys): unload() puts
        # the merged weight back into it, so Linear, Conv1D and their subclasses come back as they were.
        self.base_shell = (base,)  # a tuple: not registered as a submodule

        a0 = a0.detach().to(compute_dtype(base_weight.dtype))
        b0 = b0.detach().to(a0.dtype)
        dtype = adapter_dtype or a0.dtype
        dense = base_weight if residual is None else residual  # base_is_residual: a residual file, or sharded init
        if residual is None and not base_is_residual:  # W_res = W - s B0 A0, a new tensor (no grad: all detached)
            dense = residual_weight(base_weight.detach(), a0, b0, self.scaling, self.fan_in_fan_out)
        self.weight, self.weight_kind = (dense, NF4) if isinstance(dense, NF4Weight) else (frozen(dense), DENSE)
        self.bias = None if base.bias is None else frozen(cast(Tensor, base.bias))
        self.A = nn.Parameter(a0.clone().to(dtype))
        self.B = nn.Parameter(b0.clone().to(dtype))
        self.A0, self.B0 = initial if initial is not None else host_copies([a0, b0])
        self.adapter_name = self.active = "default"  # with order and residual_init: see the docstring
        self.order, self.residual_init = [self.adapter_name], (self.A0, self.B0, self.scaling)
        for name in BUFFERS:  # this adapter's correction of another adapter's residual (nn/adapters.py): None here
            self.register_buffer(name, None, persistent=False)
        self.initial_on_device: tuple[Tensor, Tensor] | None = None  # set while in original() (model.py)
        # trained.Origin, set by apply()/load(): the run that made this layer (its modules trained in full, init
        # time) and this layer's name then. On the layer, so that every copy and wrapper of the model keeps it.
        self.origin: Any = None
        # While merged, the exact residual is kept here (one weight's memory): unmerge is bit-exact, merge/unmerge
        # cycles never drift. Non-persistent: no state-dict key.
        self.register_buffer("residual_while_merged", None, persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The layer has taken the base's tensors over; the shell must not keep W alive.
        base.weight, base.bias = None, None  # type: ignore[assignment]

    @property
    def quantized(self) -> bool:
        """True when the residual is held in NF4 (QPiSSA)."""
        return self.weight_kind.quantized

    def residual(self, dtype: torch.dtype | None = None) -> Tensor:
        """W_res in its stored layout, in ``dtype`` (default: the weight's); for QPiSSA dequantized, a new tensor."""
        return self.weight_kind.dequantize(self.weight, dtype)

    def stored_residual(self) -> Tensor:
        """What fingerprints cover: W_res as stored (also while merged); NF4: the codes and absmax bytes (uint8)."""
        kept = self.residual_while_merged
        return self.weight_kind.stored(self.weight if kept is None else kept)

    @property
    def merged(self) -> bool:
        return self.residual_while_merged is not None

    def delta_weight(self, a: Tensor | None = None, b: Tensor | None = None) -> Tensor:
        """s * B A as an (out, in) matrix in the factors' dtype (A, B by default)."""
        a = self.A if a is None else a
        b = self.B if b is None else b
        return self.scaling * (b @ a)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out), computed in x's dtype."""
        merged = self.residual_while_merged is not None
        if merged and self.training and torch.is_grad_enabled():
            raise RuntimeError(
                "minipissa: this layer is merged (its adapter folded into the weight), so training it would update "
                "nothing and leave the merged weight stale; call minipissa.unmerge(model) before training, or "
                "model.eval() / torch.no_grad() for inference"
            )
        if self.mode == "adapter" and not merged and self._fast_path_applies(x):
            return self._fast(x)
        return self._reference(x)

    def _reference(self, x: Tensor) -> Tensor:
        """The formula itself: y = W_res x + bias + s * B (A dropout(x)); W_res + s0·B0·A0 in mode "original" (and
        where the active adapter is absent); W_res + C·D for an adapter made on another one's residual."""
        mode = self.mode
        if mode in ("original", "disabled", "mixed"):
            refuse_merged((self,), mode)
        if mode == "mixed":  # minipissa.per_example(): each example with its own adapter (nn/adapters.py)
            return cast(Callable[[Tensor], Tensor], self.per_example)(x)
        if mode == "corrected" and not self.merged and self._fast_path_applies(x):
            return self._fast_corrected(x)
        weight = weight_matrix(self.residual(x.dtype), self.fan_in_fan_out)
        if self.merged:
            return F.linear(x, weight, self.bias)
        if mode == "original" or (mode in ("absent", "disabled") and self.absent):
            return low_rank_linear(x, weight, self.bias, *self.original_factors())
        c, d = self._buffers.get("correction_b"), self._buffers.get("correction_a")
        y = F.linear(x, weight, self.bias) if c is None or d is None else low_rank_linear(x, weight, self.bias, d, c, 1)
        if mode == "disabled":
            return y
        a, b, x = self.A, self.B, self.dropout(x)
        # Scale the rank-r intermediate, not the (..., out) output: r/out of the multiplications.
        return y + F.linear(F.linear(x, a.to(x.device, x.dtype)) * self.scaling, b.to(x.device, x.dtype))

    def _fast_path_applies(self, x: Tensor) -> bool:
        """The fast path (ops.py) picks one dtype for every product, so not under autocast; and not for an unfrozen
        bias where the weight's kind gives the bias no gradient there (NF4)."""
        if not self.weight_kind.trains_bias and self.bias is not None and self.bias.requires_grad:
            return False
        return not torch.is_autocast_enabled(x.device.type)

    def _fast(self, x: Tensor) -> Tensor:
        """The formula in ops.py's fast form, with A and B cast by the model's :class:`SharedCasts` (one
        launch for all layers, differentiable) where it has them."""
        # Host time matters here (every adapter, every step): each module attribute is read once.
        a, b, weight, dropout = self.A, self.B, self.weight, self.dropout
        xa = None if isinstance(dropout, nn.Identity) or not self.training else dropout(x)
        casts = None if self.shared_casts is None else self.shared_casts.casts_for(self, x.dtype, a, b)
        a_c, b_c = casts if casts is not None else (a, b)
        return self.weight_kind.linear(x, xa, weight, self.bias, a_c, b_c, self.scaling, self.fan_in_fan_out)

    @torch.no_grad()
    def _folded(self) -> Tensor:
        """W_res + s·B·A in the stored layout and the weight's dtype, rounded once: merge's and unload's one fold
        (of an unmerged layer); with several adapters, of what the layer computes (:meth:`_reference`)."""
        delta = self.added_delta()
        return self.weight_kind.folded(self.weight, delta.mT if self.fan_in_fan_out else delta)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·B·A into ``weight`` (in the decomposition dtype, rounded once). No-op if merged.

        A QPiSSA layer refuses (:func:`refuse_merge`): B·A rounded into 4 bits would lose most of the training."""
        if self.merged:
            return
        refuse_merge([("this layer", self.weight_kind)])
        weight = cast(nn.Parameter, self.weight)  # a dense one: mergeable
        residual = weight.data
        weight.data = self._folded()
        self.residual_while_merged = residual
        # While merged A and B take no part in the output: no gradient, and so no optimizer step, reaches them.
        self.trainable_before_merge = (self.A.requires_grad, self.B.requires_grad)
        self.A.requires_grad_(False)
        self.B.requires_grad_(False)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the residual bit-exactly. No-op if not merged."""
        if self.residual_while_merged is not None:
            self.weight.data = self.residual_while_merged
            self.residual_while_merged = None
            self.A.requires_grad_(self.trainable_before_merge[0])
            self.B.requires_grad_(self.trainable_before_merge[1])

    def unload(self) -> nn.Module:
        """The base layer holding the merged weight W_res + s·B·A (frozen), without minipissa. For QPiSSA, the
        full-precision weight deq(nf4(W_res)) + s·B·A in the base's dtype."""
        (base,) = self.base_shell
        self.unmerge()  # the fold starts from the exact residual
        base.weight = nn.Parameter(self._folded(), requires_grad=False)
        base.bias = cast(Any, self.bias)
        return base

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        # Module.to(dtype) / .half() would round the fp32 master A/B to the new dtype (A0/B0 are not module tensors:
        # they stay as they are, on the host). Adapter tensors follow device moves only; change their dtype
        # explicitly via `adapter_dtype`.
        # A cast of the residual (not a move: that changes no bit) is followed by `made`, so that save() can tell
        # whether load() then the same cast gives it back: two fingerprints per cast, as apply() takes. (An NF4
        # residual is not cast: NF4Weight follows device moves only.)
        before = None
        if self.made is not None and self.weight_kind.follows_casts:
            residual = self.stored_residual()  # dense: the tensor itself
            probe = fn(torch.empty(0, dtype=residual.dtype, device=residual.device))
            before = fingerprint(full_tensor(residual)) if probe.dtype != residual.dtype else None
        module = super()._apply(device_only(fn, [self.A, self.B, self.A.grad, self.B.grad]), recurse)
        if self.initial_on_device is not None:  # A0, B0 on the device, for original() or an absent adapter
            self.initial_on_device = (fn(self.initial_on_device[0]), fn(self.initial_on_device[1]))
        if before is not None and self.made is not None:
            self.made.cast(before, fingerprint(full_tensor(self.stored_residual())))
        return module

    def extra_repr(self) -> str:
        layout = ", fan_in_fan_out" if self.fan_in_fan_out else ""
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}{layout}, "
            f"mode={self.mode}, merged={self.merged}"
        )
