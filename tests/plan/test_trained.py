"""Modules trained in full beside the adapters (train_modules, PEFT's modules_to_save): they train, save, load
(checked first), export to PEFT, and bad input is refused with the model unchanged."""

from __future__ import annotations

import copy
import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from models import MLP, train_steps
from snapshots import assert_refused, assert_unchanged, editable, snapshot
from torch import nn

import minipissa
from minipissa import StateError
from minipissa.io import safefile


def base(head: int = 4) -> MLP:
    torch.manual_seed(0)
    return MLP((32, 48, 24, head))


def trained_model() -> tuple[MLP, torch.optim.Optimizer]:
    model = minipissa.apply(base(), 4, ["layers.0", "layers.1"], train_modules=["layers.2"])
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    return model, train_steps(model, x, 3)


def test_a_head_trained_in_full_saves_loads_and_exports(tmp_path: Path) -> None:
    model, opt = trained_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layers.0.A", "layers.0.B", "layers.1.A", "layers.1.B", "layers.2.weight", "layers.2.bias"}
    assert not torch.equal(model.layers[2].weight, base().layers[2].weight)  # the head really trained
    minipissa.save(model, tmp_path / "a.safetensors", optimizer=opt)
    x = torch.randn(5, 32)
    loaded = minipissa.load(base(), tmp_path / "a.safetensors")
    assert torch.equal(loaded(x), model(x))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    resumed = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    minipissa.load(loaded, tmp_path / "a.safetensors", optimizer=resumed)
    assert len(resumed.state) == 6  # A, B of two layers and the head's weight and bias

    peft = pytest.importorskip("peft")
    report = minipissa.convert_to_lora(tmp_path / "a.safetensors", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["layers.2"] == report.modules_to_save
    served = peft.PeftModel.from_pretrained(base(), tmp_path / "lora").eval()
    with torch.no_grad():
        ours, theirs = model(x), served(x)
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()  # as in test_convert's PEFT comparisons
    assert (ours - base()(x)).abs().max() > 1e-2 * ours.abs().max()
    assert "modules_to_save" in (tmp_path / "lora" / "README.md").read_text()


def test_bad_train_modules_and_files_are_refused_and_change_nothing(tmp_path: Path) -> None:
    for kwargs, match in [
        ({"train_modules": ["nothing"]}, "matches no module"),
        ({"train_modules": ["layers"]}, "both trained in full .* and adapted"),
        ({"train_modules": ["layers.0"]}, "both trained in full"),
        ({"train_modules": 3}, "train_modules"),
    ]:
        model = base()
        before = snapshot(model)
        with pytest.raises((ValueError, TypeError), match=match):
            minipissa.apply(model, 4, ["layers.0", "layers.1"], **kwargs)
        assert_unchanged(model, before)

    model, _ = trained_model()
    minipissa.save(model, tmp_path / "a.safetensors")
    other = base(head=5)  # another head size
    before = snapshot(other)
    with pytest.raises(StateError, match="'layers.2' \\(trained in full\\) has parameters"):
        minipissa.load(other, tmp_path / "a.safetensors")
    assert_unchanged(other, before)

    payload, tensors = editable(tmp_path / "a.safetensors")
    for change, match in [
        (lambda p, t: t.update({"trained:layers.2.weight": torch.full_like(t["trained:layers.2.weight"], torch.nan)}),
         "finite floating-point"),
        (lambda p, t: t.pop("trained:layers.2.bias"), "lacks tensors"),
        (lambda p, t: p.update(trained={"layers.2": "weight"}), "must map module names"),
        (lambda p, t: p.update(trained={}), "no module accounts for"),
        (lambda p, t: t.pop("trained0:layers.2.bias"), "initial values for some parameters only"),
        (lambda p, t: t.update({"trained0:layers.2.weight": t["trained0:layers.2.weight"][:, :3]}),
         "has parameters .* but .* before training"),
        (lambda p, t: t.update({"trained0:layers.2.bias": torch.full_like(t["trained0:layers.2.bias"], torch.inf)}),
         "finite floating-point"),
        (lambda p, t: t.update({"trained0:layers.1.bias": t["trained0:layers.2.bias"]}), "no module accounts for"),
    ]:  # fmt: skip
        crafted_payload, crafted = json.loads(json.dumps(payload)), dict(tensors)
        change(crafted_payload, crafted)
        safefile.write(tmp_path / "c.safetensors", crafted, "adapter", crafted_payload)
        assert_refused(base(), lambda m: minipissa.load(m, tmp_path / "c.safetensors"), match)


# ---- state held by the layers: every copy and wrapper keeps it ------------------------------------------------------


def _ddp(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": lambda m: torch.load(_saved(m), weights_only=False),  # our own pickle, just made
    "ModuleDict": lambda m: nn.ModuleDict({"m": m}),
    "DDP": _ddp,
    "submodule": lambda m: m.layers,
}


def _saved(model: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    """A gloo group of world size 1 in this process, for DDP on the CPU."""
    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("no gloo, or a process group exists already")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _holder(path: Path, module: nn.Module) -> nn.Module:
    """``module`` under the prefix the file's names have (a wrapper's: "m.", "module."), to load the file onto."""
    names = list(safefile.read(path)[0]["modules"])
    prefix = names[0].removesuffix("layers.0").removesuffix("0")  # "layers.0" under MLP, "0" under MLP.layers
    for part in reversed(prefix.rstrip(".").split(".") if prefix else []):
        module = nn.ModuleDict({part: module})
    return module


@pytest.mark.parametrize("kind", list(COPIES))
def test_copies_and_wrappers_keep_modules_trained_in_full_and_init_time(kind: str, tmp_path: Path, request) -> None:
    if kind == "DDP":
        request.getfixturevalue("process_group")
    model, _ = trained_model()
    seconds = minipissa.summary(model).seconds
    assert seconds is not None and seconds > 0
    other = COPIES[kind](model)
    assert minipissa.summary(other).seconds == seconds
    minipissa.save(other, tmp_path / "a.safetensors")
    info = safefile.read(tmp_path / "a.safetensors")[0]
    (head,) = info["trained"]  # the head, under the name the adapters have in this file
    assert head.endswith("2") and head.removesuffix("2") == next(iter(info["modules"])).removesuffix("0")
    fresh = base()
    loaded = minipissa.load(_holder(tmp_path / "a.safetensors", fresh.layers if kind == "submodule" else fresh),
                            tmp_path / "a.safetensors")  # fmt: skip
    assert loaded.get_submodule(head).weight.requires_grad
    x = torch.randn(5, 32)
    assert torch.equal(fresh(x), model(x))
    with torch.no_grad(), minipissa.original(fresh), minipissa.original(model):
        assert torch.equal(fresh(x), model(x))  # the values before training came along too
    assert minipissa.summary(minipissa.unload(copy.deepcopy(model))).seconds is None


def test_a_layer_moved_away_from_its_root_is_a_named_error(tmp_path: Path) -> None:
    model, _ = trained_model()
    for moved, match in [
        (nn.Sequential(model.layers[0], nn.Tanh(), model.layers[1]), "made as 'layers.1' is now at '2'.*cannot be"),
        (nn.Sequential(model.layers[1], model.layers[0]), "made as 'layers.1' is now at '0'.*cannot be told"),
        (nn.Sequential(model.layers[0]), "module '2' is trained in full .* no longer in the model"),
        (
            nn.ModuleDict({"a": nn.ModuleDict({"layers": nn.ModuleList([model.layers[0]])}), "1": model.layers[1]}),
            "made as 'layers.1' is now at '1'.*cannot be told",
        ),  # each fits alone, as a wrapper and a submodule
    ]:  # where is layers.2 now?
        with pytest.raises(StateError, match=match):
            minipissa.save(moved, tmp_path / "a.safetensors")
        assert not (tmp_path / "a.safetensors").exists()
    untrained = minipissa.apply(base(), 4, ["layers.0", "layers.1"])  # nothing trained in full: nothing to find
    minipissa.save(nn.Sequential(untrained.layers[0], nn.Tanh(), untrained.layers[1]), tmp_path / "b.safetensors")


# ---- original() / disabled(): the modules trained in full as they were before training ----------------------------


class Tied(nn.Module):
    """An embedding whose weight the output head shares (tied), and a hidden layer to adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(ids))))


@pytest.mark.parametrize("mode", ["original", "disabled"])
def test_original_and_disabled_use_the_values_before_training(mode: str, tmp_path: Path) -> None:
    model, opt = trained_model()
    head = model.layers[2]
    params, x = (head.weight, head.bias), torch.randn(5, 32)
    trained_out = model(x)  # its graph holds the trained head: must stay valid through the context
    context = getattr(minipissa, mode)
    with context(model):
        assert torch.equal(head.weight, base().layers[2].weight) and torch.equal(head.bias, base().layers[2].bias)
        reference = model(x)
        if mode == "original":  # the pre-PiSSA model: W_res + s·B0·A0 = W up to rounding, the head exactly
            assert (reference - base()(x)).abs().max() <= 1e-5 * base()(x).abs().max()
    assert head.weight is params[0] and head.bias is params[1]  # the trained Parameters, untouched, are back
    assert not torch.equal(head.weight, base().layers[2].weight)
    (trained_out - reference.detach()).square().sum().backward()  # autograd across the context works
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0

    minipissa.save(model, tmp_path / "a.safetensors")
    other = base()
    with torch.no_grad():
        other.layers[2].weight.normal_()  # a fresh random head, as from_pretrained gives a new classifier
    minipissa.load(other, tmp_path / "a.safetensors")
    with torch.no_grad(), context(other):
        assert torch.equal(other(x), reference)  # from the file's initial values, not the base's head


def test_original_of_a_tied_head_restores_every_name_of_its_weight() -> None:
    torch.manual_seed(0)
    before = Tied()
    model = minipissa.apply(copy.deepcopy(before), 4, ["hidden"], train_modules=["head"])
    with torch.no_grad():
        model.head.weight.add_(1.0)  # "trained": the tied embedding moves with it
    ids = torch.arange(12)
    with torch.no_grad(), minipissa.original(model):
        assert torch.equal(model.emb.weight, before.emb.weight) and model.emb.weight is model.head.weight
        assert (model(ids) - before(ids)).abs().max() <= 1e-5 * before(ids).abs().max()
    assert model.emb.weight is model.head.weight and not torch.equal(model.emb.weight, before.emb.weight)


def test_a_format_3_file_with_modules_trained_in_full_loads_but_refuses_original(tmp_path) -> None:
    model, _ = trained_model()
    minipissa.save(model, tmp_path / "a.safetensors")
    payload, tensors = editable(tmp_path / "a.safetensors")
    # As minipissa wrote it before (format 3): no trained0: tensors.
    safefile.write(tmp_path / "v3.safetensors", {k: t for k, t in tensors.items() if "trained0:" not in k},
                   "adapter", payload | {"format_version": 3})  # fmt: skip
    loaded = minipissa.load(base(), tmp_path / "v3.safetensors")
    x = torch.randn(3, 32)
    assert torch.equal(loaded(x), model(x))
    for context in (minipissa.original, minipissa.disabled):
        assert_refused(loaded, lambda m, c=context: c(m).__enter__(), "'layers.2'.*format version 3")
        assert all(layer.mode == "adapter" for _, layer in minipissa.pissa_layers(loaded))
    minipissa.save(loaded, tmp_path / "again.safetensors")  # what it has, as it has it: reloads the same way
    again = minipissa.load(base(), tmp_path / "again.safetensors")
    assert torch.equal(again(x), model(x))
    assert_refused(again, lambda m: minipissa.original(m).__enter__(), "format version 3")


def test_save_inside_original_is_refused(tmp_path: Path) -> None:
    model, _ = trained_model()
    with minipissa.original(model), pytest.raises(StateError, match="save outside the context"):
        minipissa.save(model, tmp_path / "a.safetensors")


# ---- nested train_modules, and files naming adapted modules ---------------------------------------------------------


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 8)
        self.skip = nn.Linear(8, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.inp(x) + self.skip(x))


@pytest.mark.parametrize("patterns", [["body", "body.0"], ["body.0", "body"], ["re:body.*"], ["re:body(\\.2)?"]])
def test_nested_train_modules_keep_the_outermost_and_round_trip(patterns, tmp_path: Path) -> None:
    model = minipissa.apply(Nested(), 2, ["inp"], train_modules=patterns)
    assert minipissa.plan.trained.names(model) == ("body",)
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"body.0.weight", "body.2.bias"}
    with torch.no_grad():
        model.body[0].weight.add_(0.5)
    minipissa.save(model, tmp_path / "a.safetensors")
    x = torch.randn(3, 8)
    assert torch.equal(minipissa.load(Nested(), tmp_path / "a.safetensors")(x), model(x))


def test_a_file_listing_nested_modules_loads_as_the_outermost_or_is_refused(tmp_path: Path) -> None:
    model = minipissa.apply(Nested(), 2, ["inp"], train_modules=["body"])
    minipissa.save(model, tmp_path / "a.safetensors")
    payload, tensors = editable(tmp_path / "a.safetensors")
    payload["trained"]["body.0"] = ["bias", "weight"]  # as older saves wrote nested train_modules: the same tensors
    safefile.write(tmp_path / "old.safetensors", tensors, "adapter", payload)
    x = torch.randn(3, 8)
    assert torch.equal(minipissa.load(Nested(), tmp_path / "old.safetensors")(x), model(x))
    payload["trained"]["body.0"] = ["bias", "weight", "scale"]  # not among the outer module's parameters
    safefile.write(tmp_path / "bad.safetensors", tensors, "adapter", payload)
    assert_refused(Nested(), lambda m: minipissa.load(m, tmp_path / "bad.safetensors"), "inside 'body'")


@pytest.mark.parametrize("onto", ["base", "adapted"])
@pytest.mark.parametrize(("name", "match"), [
    ("inp", "adapted module 'inp'"),  # the adapted module itself
    ("body", "adapted module 'body.0'"),  # a parent of one
    ("", "not a module path"),  # the root
])  # fmt: skip
def test_trained_metadata_naming_an_adapted_module_its_parent_or_the_root_is_refused(
    onto: str, name: str, match: str, tmp_path: Path
) -> None:
    """Such a file, crafted with every parameter the victim has there (A and B too), would overwrite a residual."""
    minipissa.save(minipissa.apply(Nested(), 2, ["inp", "body.0"]), tmp_path / "a.safetensors")
    payload, tensors = editable(tmp_path / "a.safetensors")
    victim = Nested() if onto == "base" else minipissa.apply(Nested(), 2, ["inp", "body.0"])
    params = dict(victim.get_submodule(name).named_parameters())
    payload["trained"] = {name: sorted(params)}
    tensors.update({f"trained:{name}.{p}": torch.zeros_like(t) for p, t in params.items()})  # as save writes keys
    safefile.write(tmp_path / "c.safetensors", tensors, "adapter", payload)
    assert_refused(victim, lambda m: minipissa.load(m, tmp_path / "c.safetensors"), match)


def test_loading_a_file_without_the_models_modules_trained_in_full_is_refused(tmp_path: Path) -> None:
    minipissa.save(minipissa.apply(base(), 4, ["layers.0", "layers.1"]), tmp_path / "plain.safetensors")
    model, _ = trained_model()  # the same A0/B0 (same seed), and layers.2 trained in full
    assert_refused(model, lambda m: minipissa.load(m, tmp_path / "plain.safetensors"), r"trains \['layers.2'\] in full")


def test_a_second_apply_keeps_the_first_ones_modules_trained_in_full_and_time() -> None:
    model = minipissa.apply(Nested(), 2, ["inp"], train_modules=["body"])
    first = minipissa.summary(model).seconds
    with pytest.raises(ValueError, match="'inp' is both trained in full"):  # a PiSSA layer now
        minipissa.apply(model, 2, ["skip"], train_modules=["inp"])
    with pytest.raises(ValueError, match="'body' is both trained in full .* adapted \\('body.2'\\)"):
        minipissa.apply(model, 2, ["body.2"])  # inside the first apply's module trained in full
    with torch.no_grad():
        model.body[0].weight.add_(1.0)  # trained since the first apply
    minipissa.apply(model, 2, ["skip"], train_modules=["body.0"])  # inside it: the first apply's "body" stays
    assert minipissa.plan.trained.names(model) == ("body",)
    second = model.skip.origin.run.seconds
    assert minipissa.summary(model).seconds == first + second
    with minipissa.original(model):
        assert torch.equal(model.body[0].weight, Nested().body[0].weight)  # as before the first apply


def test_load_onto_adapted_layers_takes_the_files_modules_trained_in_full(tmp_path: Path) -> None:
    model, _ = trained_model()
    minipissa.save(model, tmp_path / "a.safetensors")
    plain = minipissa.apply(base(), 4, ["layers.0", "layers.1"])  # the same A0/B0, nothing trained in full
    seconds = minipissa.summary(plain).seconds
    minipissa.load(plain, tmp_path / "a.safetensors")
    assert minipissa.plan.trained.names(plain) == ("layers.2",) and plain.layers[2].weight.requires_grad
    assert minipissa.summary(plain).seconds == seconds  # the layers' own init time stays
    x = torch.randn(3, 32)
    with torch.no_grad(), minipissa.original(plain), minipissa.original(model):
        assert torch.equal(plain(x), model(x))


def test_the_context_never_changes_the_stored_values_and_follows_dtype_casts() -> None:
    model, _ = trained_model()
    head = model.layers[2]
    with torch.no_grad(), minipissa.original(model):
        head.weight.add_(1.0)  # written in the context: a copy of the values before training, not them
    with torch.no_grad(), minipissa.original(model):
        assert torch.equal(head.weight, base().layers[2].weight)
    model.double()
    with torch.no_grad(), minipissa.disabled(model):
        assert head.weight.dtype == torch.float64 and torch.equal(head.weight, base().double().layers[2].weight)


def test_a_module_reshaped_since_apply_is_a_named_error(tmp_path: Path) -> None:
    model, _ = trained_model()
    model.layers[2].bias = nn.Parameter(torch.zeros(7))
    with pytest.raises(StateError, match="save: module 'layers.2' .*has parameters .* before training"):
        minipissa.save(model, tmp_path / "a.safetensors")
    with pytest.raises(StateError, match=r"original\(\): module 'layers.2' .*has parameters .* before training"):
        minipissa.original(model).__enter__()
    assert all(layer.mode == "adapter" for _, layer in minipissa.pissa_layers(model))


def test_original_under_fsdp2_with_a_sharded_module_trained_in_full_is_refused(process_group: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, _ = trained_model()
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model.layers[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert minipissa.plan.trained.names(model) == ("layers.2",)
    with pytest.raises(StateError, match="'layers.2.weight' .* is sharded"):
        minipissa.original(model).__enter__()


def test_a_module_trained_in_full_then_deleted_is_named_not_an_attribute_error(tmp_path: Path) -> None:
    """`del model.head` after apply(train_modules=[...]): save and convert say which module is gone (they used to
    raise AttributeError) and write nothing."""
    model, _ = trained_model()
    del model.layers[2]  # an MLP's head: layers.2
    for call in (
        lambda m: minipissa.save(m, tmp_path / "a.safetensors"),
        lambda m: minipissa.convert_to_lora(m, tmp_path / "lora"),
    ):
        assert_refused(model, call, r"module 'layers.2' is trained in full \(train_modules\) but is no longer")
    assert not list(tmp_path.iterdir())


def test_a_second_apply_after_a_module_trained_in_full_was_deleted_does_not_stop_midway() -> None:
    torch.manual_seed(0)
    model = minipissa.apply(MLP((32, 48, 24, 4)), 4, "layers.0", train_modules=["layers.2"])
    del model.layers[2]
    minipissa.apply(model, 4, "layers.1")  # freezing and unfreezing skips the module that is gone
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.{k}" for i in (0, 1) for k in ("A", "B")
    }
