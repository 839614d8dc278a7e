"""The adapter file's records: one :class:`ModuleRecord` per adapted module, made from a live layer when
saving, or parsed from a file when loading, where every field is checked (type, range, shape, dtype) before
anything uses it. Whatever the metadata holds, parsing returns records or raises :class:`StateError`.

Per module, the file holds ``<module path>.A`` (r, in) and ``.B`` (out, r) in the adapter dtype,
``.A0``/``.B0`` in the decomposition dtype, and in the JSON blob the fields of :class:`ModuleRecord` with the
init ``info`` (:data:`INFO`). Format version 2 fingerprints weights with an exact full hash; version 1's
sampled fingerprints are still read. Version 3 adds QPiSSA (``quantize``, ``quant_iters``, and for an NF4
residual its errors and the sha256 of its codes and absmax, :data:`NF4_INFO`); a file without them is dense.
Version 4 fingerprints the base's bias too (``bias_fingerprint``, None for a layer without one) and holds
``<module path>.bias`` for a bias trained since apply (:attr:`ModuleRecord.bias`); older files have neither.
``double_quant`` (the NF4 absmax in 8 bits) is recorded only where true (:data:`~minipissa.plan.config.UNLESS_DEFAULT`):
other files are what they were, and a reader that knows nothing of it refuses a file that has it (an unknown info
key) rather than rebuild another residual.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.checks import Check
from ..core.decompose import compute_dtype
from ..core.dtensor import full_tensor
from ..core.dtypes import FLOATS, dtype_name
from ..core.errors import StateError
from ..core.nf4 import stored_bytes
from ..nn import adapters as per_layer
from ..nn.layer import PiSSALinear
from ..plan.config import RECORDED, UNLESS_DEFAULT, check_recorded
from ..plan.settings import Settings, check_alpha, check_dropout, check_rank
from . import optimizer_state, trained_modules

FACTORS = ("A", "B", "A0", "B0")
FIELDS = ("rank", "alpha", "rslora", "fan_in_fan_out", "in_features", "out_features", "dropout", "base_dtype")
#: The init info each module records: the options that made its factors, and what was measured of W.
INFO = (*RECORDED, "singular_values", "weight_norm", "base_fingerprint", "residual_fingerprint")
#: What an NF4 residual adds (qpissa.py): its errors at init and the sha256 of its codes + absmax.
NF4_INFO = ("nf4_error", "qlora_error", "nf4_sha256")
#: Info keys that version 1-2 files lack, and their values there.
DENSE_DEFAULTS = {"quantize": None, "quant_iters": 1}
CONFIG_KEYS = ("rank", "alpha", "rslora", *RECORDED)


@dataclass(frozen=True, kw_only=True)
class ModuleRecord(Settings):
    """One adapted module as saved: its settings (``adapter_dtype``: A's, ``quantize``: the info's), its size and
    base dtype, init info and the four factors (CPU tensors)."""

    name: str
    in_features: int
    out_features: int
    base_dtype: str
    info: dict[str, Any]
    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    A0: Tensor  # (r, in)
    B0: Tensor  # (out, r)
    bias: Tensor | None = None  # (out,): the bias as trained, when it was unfrozen or changed since apply

    def meta(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FIELDS} | {"info": self.info}


def from_layer(
    name: str, layer: PiSSALinear, residual_print: dict[str, Any], factor_hashes: tuple[str, str]
) -> ModuleRecord:
    """The record of a live layer (tensors gathered to plain CPU tensors, not copied where they already are:
    treat them as read-only). ``residual_print``: the residual's fingerprint now; ``factor_hashes``: the hashes of
    its A0 and B0 now. If they are not what the layer was made with (``layer.made``; a cast the layer followed is
    no edit, see :mod:`minipissa.made`), load(base="original") would rebuild another residual, and the record says
    so (``residual_edited``)."""
    info = dict(layer.info)
    if (sha256 := layer.weight_kind.sha256(layer.weight)) is not None:
        info["nf4_sha256"] = sha256
    if layer.made is not None and layer.made.edits(residual_print, factor_hashes):
        info["residual_edited"] = True
    if not per_layer.corrected(layer):  # else the layer's residual is another adapter's; this one's own is recorded
        info["residual_fingerprint"] = residual_print
    dropout = layer.dropout.p if isinstance(layer.dropout, torch.nn.Dropout) else 0.0
    base = info.get("base_fingerprint")
    base_dtype = base["dtype"] if isinstance(base, dict) else dtype_name(layer.weight.dtype)
    a, b, a0, b0 = (full_tensor(t).cpu() for t in (layer.A, layer.B, layer.A0, layer.B0))
    return ModuleRecord(
        rank=layer.rank, alpha=layer.alpha, rslora=layer.rslora, fan_in_fan_out=layer.fan_in_fan_out,
        dropout=float(dropout), adapter_dtype=a.dtype, quantize=info.get("quantize"), name=name,
        in_features=layer.in_features, out_features=layer.out_features, base_dtype=base_dtype, info=info,
        A=a, B=b, A0=a0, B0=b0,
    )  # fmt: skip


def config_summary(recs: list[ModuleRecord]) -> dict[str, Any]:
    """The run's settings: the value every module shares, or "per-module"."""

    def value(rec: ModuleRecord, key: str) -> Any:
        return getattr(rec, key) if hasattr(rec, key) else rec.info.get(key)

    keys = [k for k in CONFIG_KEYS if k not in UNLESS_DEFAULT or any(k in r.info for r in recs)]
    return {key: value(recs[0], key) if len({repr(value(r, key)) for r in recs}) == 1 else "per-module" for key in keys}


def parse(
    info: dict[str, Any], tensors: dict[str, Tensor], where: str, *, saving: bool = False
) -> tuple[list[ModuleRecord], dict[str, Tensor]]:
    """The module records of an adapter file's verified blob and tensors, and its optimizer tensors. ``saving``:
    save() runs these checks on what it is about to write (the errors then say that load() would refuse it)."""
    check = Check(where, StateError, SAVING if saving else CRAFTED)
    check.text(info.get("minipissa_version"), "minipissa_version")
    modules = check.mapping(info.get("modules"), "modules")
    if not modules:
        check.fail("modules", "a non-empty object", modules)
    check.mapping(info.get("config"), "config")
    if info.get("optimizer") is not None:
        optimizer_state.check_meta(check.mapping(info["optimizer"], "optimizer"), check)
    tensors = dict(tensors)
    recs = [_record(check, name, meta, tensors) for name, meta in _in_model_order(check, modules, info).items()]
    extra = [
        k
        for k in tensors
        if not k.startswith((optimizer_state.PREFIX, trained_modules.PREFIX, trained_modules.INITIAL))
    ]
    if extra:
        raise StateError(f"{where} holds tensors no module accounts for: {extra[:5]}")
    return recs, tensors


def _in_model_order(check: Check, modules: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """``modules`` in the model's order, which the blob's sorted keys lose: ``module_order`` (files of 0.2.0 on),
    else sorted by name as the file holds them."""
    order = info.get("module_order")
    if order is None:
        return modules
    if not (isinstance(order, list) and all(isinstance(n, str) for n in order) and sorted(order) == sorted(modules)):
        check.fail("module_order", "the names of 'modules', each once", order)
    return {name: modules[name] for name in order}


def check_readable(payload: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """A StateError unless :func:`parse` takes what save() is about to write: the reader's own checks, run on the
    metadata as the reader will see it (through JSON: tuples turn into lists, and so on)."""
    try:
        seen = json.loads(json.dumps(payload, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise StateError(f"minipissa.save: the metadata is not JSON-able ({e}); was a layer's info edited?") from None
    parse(seen, tensors, "minipissa.save", saving=True)


_NAME = re.compile(r"[^.\s]+(\.[^.\s]+)*")


def _record(check: Check, name: str, meta: Any, tensors: dict[str, Tensor]) -> ModuleRecord:
    if not _NAME.fullmatch(name):
        check.fail("a module name", "a dotted module path", name)
    meta = check.mapping(meta, f"module '{name}'", keys=(*FIELDS, "info"))
    check = check.within(f"module '{name}'")
    rank = check_rank(check, meta["rank"])
    rslora = check.boolean(meta["rslora"], "rslora")
    alpha = check_alpha(check, meta["alpha"], rank, rslora)
    in_f, out_f = (check.integer(meta[k], k, low=1) for k in ("in_features", "out_features"))
    dropout = check_dropout(check, meta["dropout"])
    base_dtype = check.text(meta["base_dtype"], "base_dtype", choices=tuple(FLOATS))
    flip = check.boolean(meta["fan_in_fan_out"], "fan_in_fan_out")
    info = _info(check, meta["info"], rank, (in_f, out_f) if flip else (out_f, in_f), base_dtype)
    missing = [f"{name}.{k}" for k in FACTORS if f"{name}.{k}" not in tensors]
    if missing:
        raise StateError(f"{check.where}: module '{name}' lacks tensors {missing}; the file is incomplete")
    a, b, a0, b0 = (tensors.pop(f"{name}.{k}") for k in FACTORS)
    shapes = [tuple(t.shape) for t in (a, b, a0, b0)]
    if shapes != [(rank, in_f), (out_f, rank)] * 2:
        check.fail("A, B, A0, B0", f"of shapes ({rank}, {in_f}), ({out_f}, {rank}) twice", shapes)
    if not (a.dtype == b.dtype and a.is_floating_point()) or not a0.dtype == b0.dtype == compute_dtype(
        FLOATS[base_dtype]
    ):
        check.fail("dtypes of A, B, A0, B0", "one float dtype for A and B; A0, B0 in the decomposition dtype",
                   [str(t.dtype) for t in (a, b, a0, b0)])  # fmt: skip
    if not all(bool(torch.isfinite(t).all()) for t in (a, b, a0, b0)):
        check.fail("A, B, A0, B0", "finite", "NaN or infinite values")
    bias = _bias(check, info, tensors.pop(f"{name}.bias", None), out_f)
    return ModuleRecord(
        rank=rank, alpha=alpha, rslora=rslora, fan_in_fan_out=flip, dropout=dropout, adapter_dtype=a.dtype,
        quantize=info["quantize"], name=name, in_features=in_f, out_features=out_f, base_dtype=base_dtype, info=info,
        A=a, B=b, A0=a0, B0=b0, bias=bias,
    )  # fmt: skip


def _bias(check: Check, info: dict[str, Any], bias: Tensor | None, out_f: int) -> Tensor | None:
    """The module's bias as trained (version 4; None: not trained), and its base's fingerprint, checked."""
    if info.get("bias_fingerprint") is not None:  # None: the base layer has no bias; absent: a file of version <= 3
        base = _fingerprint(check, info["bias_fingerprint"], "bias_fingerprint")
        if list(base["shape"]) != [out_f] or "hash" not in base:
            check.fail("bias_fingerprint", f"an exact fingerprint of a bias of shape [{out_f}]", base)
    if bias is None:
        return None
    if info.get("bias_fingerprint") is None:
        check.fail("info", "a bias_fingerprint (the file holds a trained bias)", sorted(info))
    if tuple(bias.shape) != (out_f,) or not bias.is_floating_point():
        check.fail("bias", f"floating-point, of shape ({out_f},)", f"{bias.dtype} {tuple(bias.shape)}")
    if not bool(torch.isfinite(bias).all()):
        check.fail("bias", "finite", "NaN or infinite values")
    return bias


def _info(check: Check, value: Any, rank: int, shape: tuple[int, int], dtype: str) -> dict[str, Any]:
    required = tuple(k for k in INFO if k not in DENSE_DEFAULTS and k not in UNLESS_DEFAULT)
    info = check.mapping(
        value,
        "info",
        keys=required,
        optional=("residual_edited", "bias_fingerprint", *DENSE_DEFAULTS, *UNLESS_DEFAULT, *NF4_INFO),
    )
    info = DENSE_DEFAULTS | info
    check_recorded(info, check)  # the very checks apply() runs on its arguments: what apply() accepts, a file holds
    quantized = info["quantize"] is not None
    if quantized:
        for key in NF4_INFO:
            if key not in info:
                check.fail("info", f"an object with '{key}' (an NF4 residual)", sorted(info))
        check.number(info["nf4_error"], "nf4_error", low=0.0)
        check.number(info["qlora_error"], "qlora_error", low=0.0)
        if not (isinstance(info["nf4_sha256"], str) and re.fullmatch("[0-9a-f]{64}", info["nf4_sha256"])):
            check.fail("nf4_sha256", "64 hex digits", info["nf4_sha256"])
    elif any(k in info for k in NF4_INFO):
        check.fail("info", "no NF4 fields for a dense residual", sorted(info))
    sigma = check.array(info["singular_values"], "singular_values")
    if len(sigma) not in (0, rank):
        check.fail("singular_values", f"{rank} values (or none, for init='lora')", sigma)
    for s in sigma:
        check.number(s, "singular_values", low=0.0)
    check.number(info["weight_norm"], "weight_norm", low=0.0)
    base = _fingerprint(check, info["base_fingerprint"], "base_fingerprint")
    residual = _fingerprint(check, info["residual_fingerprint"], "residual_fingerprint")
    if tuple(base["shape"]) != shape or base["dtype"] != dtype:
        check.fail("base_fingerprint", f"of a {dtype} weight of shape {list(shape)}", base)
    numel = shape[0] * shape[1]
    stored = [stored_bytes(numel, info.get("double_quant", False))] if quantized else list(shape)  # NF4: packed()
    if list(residual["shape"]) != stored or (residual["dtype"] == "uint8") != quantized:
        check.fail("residual_fingerprint", f"of a residual stored as {stored}", residual)
    if "residual_edited" in info:
        check.boolean(info["residual_edited"], "residual_edited")
    return info


def _fingerprint(check: Check, value: Any, field: str) -> dict[str, Any]:
    exact = isinstance(value, dict) and "hash" in value
    print_ = check.mapping(value, field, keys=("shape", "dtype", "sum", "sumsq", "hash" if exact else "sample_sha256"))
    for size in check.array(print_["shape"], f"{field} shape"):
        check.integer(size, f"{field} shape", low=0)
    check.text(print_["dtype"], f"{field} dtype", choices=(*FLOATS, "uint8"))
    check.number(print_["sum"], f"{field} sum")
    check.number(print_["sumsq"], f"{field} sumsq", low=0.0)
    digest, length = ("hash", 16) if exact else ("sample_sha256", 64)
    if not (isinstance(print_[digest], str) and re.fullmatch(f"[0-9a-f]{{{length}}}", print_[digest])):
        check.fail(f"{field} {digest}", f"{length} hex digits", print_[digest])
    return print_


CRAFTED = "the file is corrupted or crafted"
SAVING = "load() would refuse such a file, so save() wrote nothing (training diverged, or a layer edited by hand?)"
