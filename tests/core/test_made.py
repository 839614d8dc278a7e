"""What a layer was made with: an edit of the residual or of A0/B0 (in place, by load_state_dict, before or after a
cast) is marked in the saved file, so that load(base="original") refuses it; a cast that load then the same cast
repeats is no edit. Whatever is done to the model, save -> load reproduces it bit for bit or refuses."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import seams
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import minipissa
from minipissa import StateError
from minipissa.core.made import Made

F32, F16, BF16, F64 = "float32", "float16", "bfloat16", "float64"


def made(dtype: str = F32) -> Made:
    return Made.of({"dtype": dtype, "hash": "r0"}, ("a0", "b0"))


def test_made_follows_exactly_the_casts_a_reload_then_repeats():
    m = made()
    m.cast({"dtype": F32, "hash": "r0"}, {"dtype": F64, "hash": "r64"})  # widening: R0's values, exactly
    m.cast({"dtype": F64, "hash": "r64"}, {"dtype": F16, "hash": "r16"})  # fp16(fp64(R0)) is fp16(R0)
    assert not m.lost and m.residual == {F32: ("r0", True), F64: ("r64", True), F16: ("r16", False)}
    assert m.edits({"dtype": F16, "hash": "r16"}, ("a0", "b0")) == []
    m.cast({"dtype": F16, "hash": "r16"}, {"dtype": F64, "hash": "r64"})  # back to a dtype known, the same bits
    assert not m.lost
    assert m.edits({"dtype": F64, "hash": "x"}, ("a0", "b0")) == ["residual"]
    assert m.edits({"dtype": F64, "hash": "r64"}, ("a0", "B0 changed")) == ["B0"]
    assert m.edits({"dtype": BF16, "hash": "r64"}, ("a0", "b0")) == ["residual"]  # a dtype never cast to


@pytest.mark.parametrize(
    ("casts", "why"),
    [
        ([(F32, "r0", F16, "r16"), (F16, "r16", F32, "other")], "fp32(fp16(R0)) is not R0"),
        ([(F32, "r0", F16, "r16"), (F16, "r16", F64, "r64")], "fp64(fp16(R0)): not known, not verifiable"),
        ([(F32, "edited", F16, "r16")], "edited before the cast"),
        ([(F32, "edited", F16, "r16"), (F16, "r16", F32, "r0")], "lost stays lost"),
    ],
)
def test_made_is_lost_where_a_cast_cannot_be_repeated(casts, why):
    m = made()
    for before, h0, after, h1 in casts:
        m.cast({"dtype": before, "hash": h0}, {"dtype": after, "hash": h1})
    assert m.lost, why
    assert m.edits({"dtype": casts[-1][2], "hash": casts[-1][3]}, ("a0", "b0")) == ["residual"]


def base(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 12)).to(dtype)


def adapted(kind: str, seed: int = 0, **kw: object) -> nn.Module:
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    quantize = "nf4" if kind == "nf4" else None
    model = minipissa.apply(base(dtype, seed), 4, ["0", "2"], quantize=quantize, **kw)  # type: ignore[arg-type]
    with torch.no_grad():  # a training step: A and B move (saved, so never an edit)
        model[0].A.add_(0.1)
    return model


def reloads(model: nn.Module, kind: str, path: Path) -> bool:
    """save -> load onto a fresh base -> the model's own dtype: True if the outputs are the live model's bit for
    bit, False if load(base="original") refused; fails the test if the reload silently differs."""
    minipissa.save(model, path)
    try:
        loaded = minipissa.load(base(torch.float32 if kind == "fp32" else torch.bfloat16), path)
    except StateError as e:
        assert "edited after apply()" in str(e)
        return False
    minipissa.unmerge(model)  # a merged layer is saved as unmerge() gives it back
    dtype = model[0].bias.dtype
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded.to(dtype)(x), model(x)), "the reload differs from the saved model, unmarked"
    return True


def _lsd(key: str) -> Callable[[nn.Module, str], None]:
    """load_state_dict of the entries ending in ``key`` of another adapted model (another base)."""

    def edit(model: nn.Module, kind: str) -> None:
        other = adapted(kind, seed=1).to(model[0].bias.dtype)
        model.load_state_dict({k: v for k, v in other.state_dict().items() if k.endswith(key)}, strict=False)

    return edit


def _in_place(fn: Callable[[torch.Tensor], object], attr: str = "weight") -> Callable[[nn.Module, str], None]:
    def edit(model: nn.Module, kind: str) -> None:
        with torch.no_grad():
            fn(getattr(model[0], attr))

    return edit


def _merged(edit: Callable[[nn.Module, str], None], unmerge: bool) -> Callable[[nn.Module, str], None]:
    def merged(model: nn.Module, kind: str) -> None:
        minipissa.merge(model)
        edit(model, kind)
        if unmerge:
            minipissa.unmerge(model)

    return merged


def _set_a0(model: nn.Module, kind: str) -> None:
    model[0].A0 = model[0].A0 * 2


def _residual_data(model: nn.Module, kind: str) -> None:
    model[0].weight.data = torch.zeros_like(model[0].weight)


def _same_state(model: nn.Module, kind: str) -> None:
    model.load_state_dict(copy.deepcopy(model.state_dict()))


def _adapter_dtype(model: nn.Module, kind: str) -> None:
    model[0].A.data, model[0].B.data = model[0].A.data.double(), model[0].B.data.double()


def _noop(model: nn.Module, kind: str) -> None:
    pass


#: name -> (edit, whether it changes what a reload rebuilds, the kinds of layer it applies to).
EDITS: dict[str, tuple[Callable[[nn.Module, str], None], bool, tuple[str, ...]]] = {
    "none": (_noop, False, ("fp32", "bf16", "nf4")),
    "load_state_dict of its own state": (_same_state, False, ("fp32", "bf16", "nf4")),
    "A and B in float64": (_adapter_dtype, False, ("fp32", "bf16", "nf4")),
    "merge, edit the merged weight, unmerge": (_merged(_in_place(torch.Tensor.zero_), True), False, ("fp32", "bf16")),
    "merge, edit the merged weight": (_merged(_in_place(torch.Tensor.zero_), False), False, ("fp32", "bf16")),
    "residual scaled in place": (_in_place(lambda w: w.mul_(1.25)), True, ("fp32", "bf16")),
    "torch.nn.init on the residual": (_in_place(nn.init.normal_), True, ("fp32", "bf16")),
    "residual .data replaced": (_residual_data, True, ("fp32", "bf16")),
    "load_state_dict of a residual only": (_lsd(".weight"), True, ("fp32", "bf16")),
    "load_state_dict of A0 and B0 only": (_lsd("0"), True, ("fp32", "bf16", "nf4")),
    "load_state_dict of another model": (_lsd(""), True, ("fp32", "bf16", "nf4")),
    "A0 scaled in place": (_in_place(lambda t: t.mul_(2), "A0"), True, ("fp32", "bf16", "nf4")),
    "A0 replaced": (_set_a0, True, ("fp32", "bf16", "nf4")),
    "merge, scale the residual kept, unmerge": (
        _merged(_in_place(lambda t: t.mul_(2), "residual_while_merged"), True), True, ("fp32", "bf16"),
    ),
    "NF4 codes edited": (_in_place(lambda w: w.codes[:4].bitwise_xor_(0x11)), True, ("nf4",)),
    "NF4 absmax edited": (_in_place(lambda w: w.absmax.mul_(2)), True, ("nf4",)),
    "load_state_dict of NF4 codes only": (_lsd(".codes"), True, ("nf4",)),
}  # fmt: skip
CASTS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
#: Chains of casts from each base dtype that load then one cast to the last dtype repeats (widening first).
REPEATED = {
    "fp32": [[], [F16], [BF16], [F64], [F64, F32], [F64, F16], [F64, BF16], [F32]],
    "bf16": [[], [F16], [F32], [F64], [F32, F16], [F64, F16], [F32, F64], [F64, F32], [BF16]],
}


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["fp32", "bf16", "nf4"]),
    edit=st.sampled_from(sorted(EDITS)),
    casts=st.lists(st.sampled_from(CASTS), max_size=2),
    where=st.integers(0, 2),
)
def test_whatever_is_done_save_then_load_reproduces_the_model_or_refuses(kind, edit, casts, where):
    """An edit (or none) drawn from the ways a residual or A0/B0 can change, before, between or after casts: the
    reload reproduces the saved model bit for bit or refuses; an edit is always refused, a cast that load then one
    cast repeats never (nor an edit that changes nothing a reload rebuilds)."""
    apply_edit, changes, kinds = EDITS[edit]
    if kind not in kinds:
        edit, (apply_edit, changes, _) = "none", EDITS["none"]
    model = adapted(kind)
    where = min(where, len(casts))
    for dtype in [*casts[:where], None, *casts[where:]]:
        if dtype is None:
            apply_edit(model, kind)
        else:
            model.to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        reloaded = reloads(model, kind, Path(tmp) / "a.safetensors")
    chain = [str(c).removeprefix("torch.") for c in casts]
    repeated = kind == "nf4" or chain in REPEATED[kind]  # an NF4 residual is not cast: its bias is
    if changes:
        assert not reloaded, f"{edit} (casts {chain}) was not refused"
    elif repeated:
        assert reloaded, f"{edit} with casts {chain} was refused"


def test_an_edit_after_half_is_refused_and_a_cast_alone_reloads_bit_exactly(tmp_path):
    model = adapted("fp32").half()
    assert reloads(copy.deepcopy(model), "fp32", tmp_path / "cast.safetensors")
    with torch.no_grad():
        model[0].weight.mul_(1.25)
    assert not reloads(model, "fp32", tmp_path / "edited.safetensors")
    with pytest.raises(StateError, match="'0': its residual was edited after apply"):
        minipissa.load(base(), tmp_path / "edited.safetensors")
    minipissa.save_residual(model, tmp_path / "residual.safetensors")
    residual_model = minipissa.load_residual(base().half(), tmp_path / "residual.safetensors")
    loaded = minipissa.load(residual_model, tmp_path / "edited.safetensors", base="residual")
    x = torch.randn(3, 16).half()
    assert torch.equal(loaded(x), model(x))


def test_a_full_state_dict_of_the_same_model_is_no_edit_and_of_another_is(tmp_path):
    model = adapted("fp32")
    state = copy.deepcopy(model.state_dict())
    fresh = minipissa.apply(base(), 4, ["0", "2"])
    fresh.load_state_dict(state)  # the same base, the same init: the same A0, B0 and residual
    assert reloads(fresh, "fp32", tmp_path / "same.safetensors")
    other = minipissa.apply(base(), 4, ["0", "2"], niter=1, seed=3)  # another init of the same base
    other.load_state_dict(state)
    assert not reloads(other, "fp32", tmp_path / "other.safetensors")


def test_a_cast_fingerprints_the_residual_twice_and_a_move_never(monkeypatch):
    calls = []
    real = seams.real("layer fingerprint")
    seams.replace(monkeypatch, "layer fingerprint", lambda t: calls.append(t.dtype) or real(t))
    model = adapted("fp32")
    model.to("cpu").float()
    assert calls == []
    model.half()
    assert calls == [torch.float32, torch.float16] * 2


def test_convert_to_lora_refuses_an_edited_residual(tmp_path):
    model = adapted("fp32")
    with torch.no_grad():
        model[2].A0.mul_(2)
    minipissa.save(model, tmp_path / "a.safetensors")
    for src in (model, tmp_path / "a.safetensors"):
        with pytest.raises(StateError, match=r"residual of module\(s\) \['2'\] was edited after apply"):
            minipissa.convert_to_lora(src, tmp_path / "lora")
        assert not (tmp_path / "lora").exists()


def test_a_layer_made_by_load_marks_later_edits_as_one_made_by_apply(tmp_path):
    minipissa.save(adapted("fp32"), tmp_path / "a.safetensors")
    loaded = minipissa.load(base(), tmp_path / "a.safetensors").half()
    assert reloads(copy.deepcopy(loaded), "fp32", tmp_path / "cast.safetensors")
    with torch.no_grad():
        loaded[2].B0.mul_(2)
    assert not reloads(loaded, "fp32", tmp_path / "edited.safetensors")
