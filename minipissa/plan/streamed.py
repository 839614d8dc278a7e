"""The streaming init: the factor stream over fetched weights (fetch.py), each target's residual made on the device
while its weight is there, and the device copy of the weight dropped right after.

    apply(..., device="cuda"):  fetch W (host -> device, the next one read ahead) -> factors (factors.py, stacked.py)
                                -> W_res or nf4(W_res), W's fingerprint -> drop W -> install.adapt (build, replace)

The factors, residuals and codes are those of the in-place init on the same device: the same functions on the same
values, in the same order and chunks. Only the residual, A0 and B0 (and the bias) stay on the device; at most a
chunk's weights (two, while a chunk is in the stacked road's pipeline) and the one read ahead are there at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..core.fingerprint import fingerprint_later, is_finite, read_all
from ..core.nf4 import NF4Weight
from ..core.qpissa import quantize_residual
from ..core.weights import residual_weight
from .config import InitConfig
from .factors import Factors, factors, refuse_overflow
from .fetch import Fetcher, Streamed
from .tree import Plan


def streamed_factors(plans: Sequence[Plan], cfg: InitConfig, fetch: Fetcher) -> Iterator[Factors]:
    """The factors of every plan, each with what :class:`~minipissa.plan.fetch.Streamed` holds, made from its weight
    as fetched. An error while decomposing names a held weight that holds NaN or inf, if one does."""
    try:
        for item in factors(plans, cfg, fetch):
            item.made = _made(item, cfg, fetch)
            yield item
    except Exception as e:
        held = fetch.held()
        prints = read_all([fingerprint_later(w) for _, w in held])
        bad = [(p.name, w) for (p, w), fp in zip(held, prints, strict=True) if not is_finite(fp)]
        if bad:
            try:
                refuse_overflow(bad, "weights", "fingerprint")
            except ValueError as named:
                raise named from e
        raise


@torch.no_grad()
def _made(item: Factors, cfg: InitConfig, fetch: Fetcher) -> Streamed:
    """The residual (as the installer makes it in place: install._put_all, layer.PiSSALinear), the fingerprints and
    the residual's range check of one item's fetched weight, which is then dropped."""
    plan = item.plan
    weight, bias = fetch.fetched(plan)
    weight_print = fingerprint_later(weight)
    bias_print = None if bias is None else fingerprint_later(bias)
    errors = None
    residual: Tensor | NF4Weight
    if cfg.quantize:
        residual, errors = quantize_residual(
            weight, item.a0, item.b0, plan.scaling, plan.fan_in_fan_out, qlora_too=cfg.init != "lora",
            double_quant=cfg.double_quant,
        )  # fmt: skip
        # The largest |W_res| of each block overflows W's dtype exactly where W_res in that dtype would.
        finite = torch.isfinite(residual.absmax_values().to(weight.dtype)).all()
    else:
        dense = residual_weight(weight, item.a0, item.b0, plan.scaling, plan.fan_in_fan_out)
        residual, finite = dense, torch.isfinite(dense).all()
    fetch.drop(plan)
    return Streamed(residual, weight_print, bias, bias_print, finite, errors)


def overflowing(items: Sequence[Factors]) -> list[str]:
    """The streamed items whose residual leaves its weight dtype's range (one read-back per device)."""
    by_device: dict[torch.device, list[Factors]] = {}
    for item in items:
        if item.made is not None:
            by_device.setdefault(item.made.finite.device, []).append(item)
    bad = []
    for members in by_device.values():
        flags = torch.stack([i.made.finite for i in members if i.made is not None]).tolist()
        bad += [i.plan.name for i, ok in zip(members, flags, strict=True) if not ok]
    return bad
