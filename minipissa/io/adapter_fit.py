"""Before load() changes anything: does each module of the file fit the module in the model? (:func:`fit`: the
same kind, shape, layout and dtype; the very base weight the adapter was saved on, by its fingerprint, or its
residual; a 4-bit residual rebuilt to the saved codes; an existing PiSSA layer holding the same initial adapter.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from ..core.decompose import compute_dtype
from ..core.dtensor import full_tensor
from ..core.dtypes import dtype_name
from ..core.errors import PathLike, StateError
from ..core.fingerprint import same
from ..core.nf4 import NF4Weight
from ..core.qpissa import residual_nf4
from ..core.weights import is_conv1d, weight_matrix
from ..nn import adapters as per_layer
from ..nn.layer import PiSSALinear
from ..nn.nf4_linear import NF4Linear
from ..plan.quantized_base import dense_stand_in
from ..plan.replaceable import refusal
from ..plan.targets import is_supported
from . import biases
from .records import ModuleRecord


@dataclass
class Loading:
    record: ModuleRecord
    module: nn.Module
    existing: bool  # already this PiSSALinear: only A and B are set
    residual: NF4Weight | None = None  # QPiSSA: the 4-bit residual, rebuilt and checked against the file
    adds: bool = False  # a PiSSALinear with other adapters: this one is added beside them (nn/adapters.py)


def _check_existing(layer: PiSSALinear, rec: ModuleRecord, where: str) -> None:
    same_setup = (layer.rank, layer.alpha, layer.rslora, layer.fan_in_fan_out, layer.in_features, layer.out_features)
    saved = (rec.rank, rec.alpha, rec.rslora, rec.fan_in_fan_out, rec.in_features, rec.out_features)
    a0, b0 = full_tensor(layer.A0).cpu(), full_tensor(layer.B0).cpu()
    if same_setup != saved or not (torch.equal(a0, rec.A0) and torch.equal(b0, rec.B0)):
        raise StateError(
            f"{where} already is a PiSSA layer with a different adapter (rank, alpha, layout or initial "
            "factors differ); load onto the plain base model instead, or pass name='...' to minipissa.load to add "
            "the file beside the model's adapter"
        )
    _check_same_residual(layer, rec, where)
    if layer.merged:
        raise StateError(f"{where} is merged; call minipissa.unmerge(model) before loading A and B into it")
    if layer.A.dtype != rec.A.dtype:
        raise StateError(f"{where} has adapter dtype {layer.A.dtype}, the file {rec.A.dtype}; they must match")
    biases.check(layer.bias, rec, where, layer)


def _check_same_residual(layer: PiSSALinear, rec: ModuleRecord, where: str) -> None:
    """A and B go into an existing layer only if it holds the residual they were trained on: the same kind (4-bit or
    dense), made from the same base weight (its fingerprint: shape, dtype, digest), and for NF4 the same codes. The
    initial factors alone do not tell: QPiSSA and PiSSA of one weight share them, as LoRA inits of any two bases do."""
    kinds = ("a 4-bit (QPiSSA)", "a full-precision")
    mine, saved = kinds[not layer.quantized], kinds[rec.info["quantize"] is None]
    if mine != saved:
        raise StateError(
            f"{where} already is a PiSSA layer with {mine} residual; the file's adapter was trained on {saved} one. "
            "Load onto the plain base model instead (the residual is then rebuilt as the file says)"
        )
    _check_same_base(layer, rec, where)
    if (sha256 := layer.weight_kind.sha256(layer.weight)) is not None and sha256 != rec.info["nf4_sha256"]:
        raise StateError(
            f"{where}: its 4-bit residual is not the one the file's adapter was trained on (sha256 differs)"
        )


def _check_same_base(layer: PiSSALinear, rec: ModuleRecord, where: str) -> None:
    """The layer was made from the very base weight the file's adapter was (fingerprints: shape, dtype, digest)."""
    made, want = layer.info.get("base_fingerprint"), rec.info["base_fingerprint"]
    made = made if isinstance(made, dict) else {}
    # Fingerprints of two format versions (an exact hash, a sampled digest) share only the shape and dtype.
    shared = ["shape", "dtype", *(k for k in ("hash", "sample_sha256") if k in made and k in want)]
    if any(made.get(k) != want[k] for k in shared):
        raise StateError(
            f"{where} already is a PiSSA layer made from another base weight than the file's adapter (their "
            "fingerprints differ: another checkpoint or dtype); load onto the plain base model it was trained on"
        )


def _check_addable(layer: PiSSALinear, rec: ModuleRecord, base: str, where: str) -> Loading:
    """Adapter ``rec`` beside the layer's others: the same module (layout, shape) of the same base weight and dtype;
    a 4-bit residual only for an adapter of the same initialisation (its codes are nf4(W - s0·B0·A0): the
    quantization error of another adapter's residual is another, and no low-rank term corrects it)."""
    if base != "original":
        raise StateError(f"{where} already is a PiSSA layer: base='{base}' loads onto plain base modules only")
    if layer.merged or layer.mode in ("original", "disabled", "mixed"):
        raise StateError(f"{where} is merged or inside original()/disabled()/per_example(); unmerge or leave it first")
    mine = (layer.in_features, layer.out_features, layer.fan_in_fan_out)
    if mine != (rec.in_features, rec.out_features, rec.fan_in_fan_out):
        raise StateError(
            f"{where} is a PiSSA layer of (in, out, fan_in_fan_out) = {mine}; the file's adapter is for "
            f"{(rec.in_features, rec.out_features, rec.fan_in_fan_out)}"
        )
    _check_same_base(layer, rec, where)
    if rec.A0.dtype != layer.A0.dtype:
        raise StateError(f"{where} holds {layer.A0.dtype} initial factors, the file {rec.A0.dtype}")
    if rec.info.get("residual_edited"):
        raise StateError(f"{where}: the file's adapter was saved from an edited residual; it cannot be rebuilt here")
    if layer.quantized or rec.info["quantize"] is not None:
        shared = per_layer.shares_residual(layer, rec.A0, rec.B0, rec.scaling)
        if not (layer.quantized and shared and layer.weight_kind.sha256(layer.weight) == rec.info.get("nf4_sha256")):
            raise StateError(
                f"{where}: a 4-bit (QPiSSA) residual serves only adapters of its own initialisation on its own codes: "
                f"the layer's residual is {'4-bit' if layer.quantized else 'full-precision'}, the file's adapter "
                f"{'shares its initialisation' if shared else 'has another initialisation'} and was trained on a "
                f"{'4-bit' if rec.info['quantize'] else 'full-precision'} one. The quantization error of another "
                "residual differs from this one everywhere, and no low-rank correction gives it back: load it onto "
                "its own base model"
            )
    biases.check(layer.bias, rec, where, layer)
    return Loading(rec, layer, existing=False, adds=True)


def fit(model: nn.Module, rec: ModuleRecord, base: str, path: PathLike, name: str = "default") -> Loading:
    where = f"minipissa: module '{rec.name}'"
    try:
        module = model.get_submodule(rec.name)
    except AttributeError:
        raise StateError(
            f"{where} of '{path}' is not in the model; load onto the model the adapter was trained on "
            "(with the same module paths)"
        ) from None
    if isinstance(module, PiSSALinear):
        if per_layer.holder(module, name) is None:
            return _check_addable(module, rec, base, where)  # adapter ``name`` is not on the layer yet
        _check_existing(module, rec, where)
        return Loading(rec, module, existing=True)
    if problem := refusal(rec.name, module):  # what a PiSSA layer in its place would drop: hooks, own forward...
        raise StateError(problem)
    if isinstance(module, NF4Linear) and base == "residual":
        return _check_nf4_base(module, rec, base, where)
    stand_in = dense_stand_in(rec.name, module)  # a 4-bit base (bitsandbytes, NF4Linear): its dequantized weight
    dense = None if stand_in is None else cast(Tensor, stand_in.weight)
    if isinstance(module, NF4Linear) and dense is not None and not same(rec.info["base_fingerprint"], dense):
        return _check_nf4_base(module, rec, base, where)  # not the base: a residual put in place by load_residual?
    module = stand_in or module
    if not is_supported(module):
        raise StateError(f"{where} is a {type(module).__name__}; the file adapts an nn.Linear or Conv1D there")
    weight = full_tensor(cast(Tensor, module.weight))
    if weight.is_meta:
        raise StateError(f"{where} has a meta weight; load the base model's weights before minipissa.load()")
    shape = tuple(weight_matrix(weight, rec.fan_in_fan_out).shape)
    if shape != (rec.out_features, rec.in_features) or is_conv1d(module) != rec.fan_in_fan_out:
        raise StateError(
            f"{where} has a {type(module).__name__} weight of shape {tuple(weight.shape)}; the adapter was saved "
            f"for (out, in) = ({rec.out_features}, {rec.in_features}) with fan_in_fan_out={rec.fan_in_fan_out}"
        )
    _check_weight(weight, rec, base, where)
    _check_fingerprint(weight, rec, base, where)
    biases.check(cast(Tensor | None, module.bias), rec, where)
    if rec.info["quantize"] is None:
        return Loading(rec, module, existing=False)
    return Loading(rec, module, existing=False, residual=_rebuilt_nf4(weight, rec, where))


def _check_nf4_base(module: NF4Linear, rec: ModuleRecord, base: str, where: str) -> Loading:
    """A 4-bit residual put in place by load_residual(): the QPiSSA adapter saved with those very codes."""
    if base != "residual" or rec.info["quantize"] is None:
        raise StateError(
            f"{where} holds a 4-bit residual (minipissa.load_residual), or another 4-bit weight than the adapter's "
            "base (its dequantized weight's fingerprint differs); load the QPiSSA adapter saved with it, with "
            "base='residual'"
        )
    stored = (rec.in_features, rec.out_features) if rec.fan_in_fan_out else (rec.out_features, rec.in_features)
    if module.weight.shape != stored or module.fan_in_fan_out != rec.fan_in_fan_out:
        raise StateError(f"{where}: its 4-bit residual is {module.weight.shape}, the adapter's {stored}")
    if module.weight.double_quant != rec.info.get("double_quant", False):
        kinds = ("single-quantized (float32 absmax)", "double-quantized (8-bit absmax)")
        raise StateError(
            f"{where}: its 4-bit residual is {kinds[module.weight.double_quant]}, the adapter was saved with a "
            f"{kinds[not module.weight.double_quant]} one; load the residual file saved with this adapter"
        )
    if module.weight.sha256() != rec.info["nf4_sha256"]:
        raise StateError(f"{where}: its 4-bit residual is not the one the adapter was saved with (sha256 differs)")
    biases.check(module.bias, rec, where)
    return Loading(rec, module, existing=False, residual=module.weight)


def _check_fingerprint(weight: Tensor, rec: ModuleRecord, base: str, where: str) -> None:
    wanted, other = ("base_fingerprint", "residual_fingerprint")
    if base == "residual":
        wanted, other = other, wanted
    if same(rec.info[wanted], weight):
        return
    if same(rec.info[other], weight):
        hint = "base='residual'" if base == "original" else "base='original'"
        raise StateError(
            f"{where}: the weight is the {'residual' if base == 'original' else 'original'} weight, not the "
            f"{base} one; pass {hint} to minipissa.load()"
        )
    raise StateError(
        f"{where}: the weight does not match the {base} weight the adapter was saved with (fingerprint differs): "
        "a different base model or checkpoint, or already modified weights. Load onto the exact base model"
    )


def _check_weight(weight: Tensor, rec: ModuleRecord, base: str, where: str) -> None:
    """The dense weight is in the dtype the adapter was saved on and holds the residual it can rebuild from."""
    # The original weight is in the base's dtype; a dense residual file holds the residual as it was when saved
    # (after a model.half(), in float16).
    dense_residual = base == "residual" and rec.info["quantize"] is None
    dtype, what = (
        (rec.info["residual_fingerprint"]["dtype"], "residual") if dense_residual else (rec.base_dtype, "base")
    )
    if dtype_name(weight.dtype) != dtype:
        raise StateError(
            f"{where} has a {weight.dtype} weight; the adapter was saved on a {dtype} {what}. Cast the model "
            f"to {dtype} before loading (exact reload needs the same dtype)"
        )
    if compute_dtype(weight.dtype) != rec.A0.dtype:
        raise StateError(
            f"{where}: the file's A0 is {rec.A0.dtype}, but a PiSSA layer on a {weight.dtype} weight holds "
            f"{compute_dtype(weight.dtype)} factors; load onto the original {rec.base_dtype} weights (base='original') "
            "and cast the model after loading, as it was cast after apply()"
        )
    if base == "original" and rec.info.get("residual_edited"):
        raise StateError(
            f"{where}: its residual was edited after apply() before it was saved (in place, quantized say; by a cast "
            "a reload cannot repeat; or its A0/B0 replaced, by load_state_dict say), so rebuilding it from the "
            "original weight would not give the saved model. Load with base='residual' onto the residual weights "
            "saved by minipissa.save_residual() from that model"
        )
    if rec.info["quantize"] is not None and base == "residual":
        raise StateError(
            f"{where} has a full-precision weight, but the adapter's residual is 4-bit (NF4): put it in place with "
            "minipissa.load_residual() first, or load onto the original weights with base='original'"
        )


def _rebuilt_nf4(weight: Tensor, rec: ModuleRecord, where: str) -> NF4Weight:
    """The 4-bit residual rebuilt from the original weight: the saved one, code for code."""
    with torch.no_grad():
        a0, b0 = rec.A0.to(weight.device), rec.B0.to(weight.device)
        residual = residual_nf4(weight, a0, b0, rec.scaling, rec.fan_in_fan_out, rec.info.get("double_quant", False))
    if residual.sha256() != rec.info["nf4_sha256"]:
        raise StateError(
            f"{where}: its 4-bit residual, rebuilt from the original weight, has other codes than the saved one "
            "(re-quantizing is bit-reproducible on one device and GEMM order only: another device or library "
            "rounds W - s·B0·A0 differently, and a few values land in other 4-bit buckets). Load on the device "
            "kind that saved it"
        )
    return residual
