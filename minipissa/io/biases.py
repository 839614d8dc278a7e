"""The biases of adapted layers: part of the base, and of what training changes.

apply() fingerprints each target's bias into its layer's ``info["bias_fingerprint"]`` (None: no bias), as it does
the weight. ``save`` writes a bias that was trained since (it requires grad, or it is no longer the base's: its
fingerprint differs) as ``<module path>.bias``; ``load`` checks that the model's bias is the base's (or that very
trained bias), restores the trained one and lets it train on. Files of format version <= 3 recorded no bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..core.dtensor import full_tensor
from ..core.dtypes import dtype_name
from ..core.errors import StateError
from ..core.fingerprint import fingerprint, same
from ..nn.layer import PiSSALinear
from .records import ModuleRecord


def keep_trained(
    layers: Sequence[tuple[str, PiSSALinear]], recs: Sequence[ModuleRecord], prints: list[Any]
) -> list[ModuleRecord]:
    """The records, with ``bias`` (a CPU copy) on those of the layers whose bias was trained since apply; ``prints``:
    the fingerprints, as they are now, of the biases of ``layers`` that have one, in order."""
    now = iter(prints)
    out = []
    for (name, layer), rec in zip(layers, recs, strict=True):
        base = rec.info.get("bias_fingerprint", False)  # False: a layer made before biases were recorded
        if base is not False and (base is None) != (layer.bias is None):
            what = "was given a bias" if layer.bias is not None else "lost its bias"
            raise StateError(
                f"minipissa: module '{name}' {what} after apply; the file would load onto its base with the base's "
                "bias (or none), not this model's. Put the bias back as apply() found it"
            )
        if layer.bias is None:
            out.append(rec)
            continue
        print_ = next(now)
        # As for a residual, a cast to another dtype is no change: load, then cast, reproduces it
        changed = isinstance(base, dict) and base["dtype"] == print_["dtype"] and base["hash"] != print_["hash"]
        if layer.bias.requires_grad or changed:
            bias = full_tensor(layer.bias).cpu()
            if not bool(torch.isfinite(bias).all()):
                raise StateError(f"minipissa: module '{name}': its trained bias holds NaN or inf; nothing was saved")
            rec = replace(rec, bias=bias)
        out.append(rec)
    return out


def check(bias: Tensor | None, rec: ModuleRecord, where: str, layer: PiSSALinear | None = None) -> None:
    """The module's bias is the base's bias the adapter was saved on, or the trained bias the file holds (a residual
    file saved after training holds that one). ``layer``: the module already is this PiSSA layer; its recorded base
    bias must be the file's, and its bias is then either overwritten by the file's trained one, or must be the base's.
    """
    if "bias_fingerprint" not in rec.info:  # format version <= 3
        return
    saved = rec.info["bias_fingerprint"]
    if (bias is None) != (saved is None):
        raise StateError(
            f"{where} has {'no' if bias is None else 'a'} bias, but the adapter was saved on a base layer with"
            f"{'' if bias is None else 'out'} one; load onto the exact base model"
        )
    if bias is None:
        return
    recorded = None if layer is None else layer.info.get("bias_fingerprint")
    if isinstance(recorded, dict) and recorded.get("hash") != saved["hash"]:
        raise StateError(f"{where} was adapted on a base with another bias than the file's; load onto the base model")
    if (layer is not None and rec.bias is not None) or same(saved, full_tensor(bias)):
        return
    if dtype_name(bias.dtype) != saved["dtype"] and rec.bias is None:
        # A residual base saved after a cast of the model (model.half()): its bias was cast with it, and a cast is no
        # edit. The fingerprint is of the uncast bias, so it cannot be compared; the residual's own was (state._check).
        return
    if rec.bias is not None and bias.dtype == rec.bias.dtype and torch.equal(full_tensor(bias).cpu(), rec.bias):
        return
    raise StateError(
        f"{where}: its bias does not match the bias of the base the adapter was saved on (fingerprint differs): a "
        "different base model or checkpoint, or a bias trained since. Load onto the exact base model"
    )


@torch.no_grad()
def restore(layer: PiSSALinear, rec: ModuleRecord) -> None:
    """Put the file's trained bias (checked by :func:`check`) into the layer that load() made or found; a layer loaded
    from a file of version <= 3 takes its bias as the base's."""
    if "bias_fingerprint" not in layer.info:
        layer.info["bias_fingerprint"] = None if layer.bias is None else fingerprint(layer.bias)
    if rec.bias is not None and layer.bias is not None:
        layer.bias.copy_(rec.bias)
