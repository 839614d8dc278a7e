"""The model inside torch's wrappers (tree.unwrap): every public function given ``torch.compile(model)``,
DistributedDataParallel, DataParallel or a nesting of them reads and writes the bare model's names, so its files
load onto the bare model (and PEFT loads the converted adapter). FSDP2 adds no name: tests/plan/test_distributed.py."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from models import MLP
from snapshots import assert_refused
from torch import nn

import minipissa
from minipissa.plan.tree import unwrap

DDP = nn.parallel.DistributedDataParallel
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")


def compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")  # the wrapper of every backend; eager: no code generation


def data_parallel(model: nn.Module) -> nn.Module:
    """DataParallel as it is on a machine without a GPU, a pass-through: on a GPU machine it would move the model to
    cuda:0, which these CPU tests do not follow (seen on the GPU machine)."""
    with mock.patch("torch.cuda.is_available", return_value=False):
        return nn.DataParallel(model)


#: Each wrapper alone and nested (the outermost first).
WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "compile": compiled,
    "ddp": DDP,
    "dp": data_parallel,
    "compile-ddp": lambda m: compiled(DDP(m)),
    "dp-compile": lambda m: data_parallel(compiled(m)),
    "compile-dp-compile": lambda m: compiled(data_parallel(compiled(m))),
}
WITH_DDP = [name for name in WRAPPERS if "ddp" in name]
wrappers = pytest.mark.parametrize(
    "wrapper", [pytest.param(n, marks=needs_gloo) if n in WITH_DDP else n for n in WRAPPERS]
)


@pytest.fixture(scope="module", autouse=True)
def one_process_group() -> Iterator[None]:
    """DDP needs a process group: world size 1, in this process (gloo on the CPU)."""
    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def base() -> MLP:
    torch.manual_seed(0)
    return MLP((8, 12, 10, 6))


APPLY = dict(rank=3, targets=["layers.0", "layers.1"], train_modules=["layers.2"])


def trained() -> MLP:
    """Adapted, A, B and the head moved off their init (as training would)."""
    model = minipissa.apply(base(), **APPLY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_unwrap_reaches_the_bare_model_through_each_wrapper_and_nesting() -> None:
    bare = base()
    assert unwrap(bare, "x") is bare
    for name, wrap in WRAPPERS.items():
        if name not in WITH_DDP or dist.is_initialized():
            assert unwrap(wrap(bare), "x") is bare, name


class OptimizedModule(nn.Module):
    """torch.compile's wrapper as a torch that moved it from torch._dynamo.eval_frame would have it."""

    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self._orig_mod = mod


def test_compile_wrapper_is_found_by_class_and_by_name_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """isinstance where torch has the class at torch._dynamo.eval_frame; its class name where torch moved it."""
    inner = base()
    monkeypatch.setitem(sys.modules, "torch._dynamo.eval_frame", SimpleNamespace())  # moved
    assert unwrap(OptimizedModule(inner), "x") is inner
    renamed = type("CompiledModule", (nn.Module,), {})  # renamed where it is: no class named OptimizedModule
    wrapper = renamed()
    wrapper._orig_mod = inner
    assert unwrap(wrapper, "x") is wrapper
    monkeypatch.setitem(sys.modules, "torch._dynamo.eval_frame", SimpleNamespace(OptimizedModule=renamed))
    assert unwrap(wrapper, "x") is inner
    # Neither: a module of the user's with an `_orig_mod` child, or a wrapper whose `_orig_mod` is no module.
    assert unwrap(nn.ModuleDict({"_orig_mod": inner}), "x") is not inner
    fake = OptimizedModule(inner)
    del fake._orig_mod
    fake.__dict__["_orig_mod"] = "not a module"
    assert unwrap(fake, "x") is fake


def same_files(a: Path, b: Path) -> None:
    """The same bytes: a file, or every file of a directory."""
    if a.is_dir():
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for p in a.iterdir():
            assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    else:
        assert a.read_bytes() == b.read_bytes()


@wrappers
def test_files_of_a_wrapped_model_are_the_bare_models(wrapper: str, tmp_path: Path) -> None:
    """save, save_residual and convert_to_lora write what they write for the bare model, byte for byte."""
    bare = trained()
    wrapped = WRAPPERS[wrapper](bare)
    for name, write in (
        ("a.safetensors", minipissa.save),
        ("r.safetensors", minipissa.save_residual),
        ("lora", minipissa.convert_to_lora),
    ):
        write(bare, tmp_path / f"bare_{name}")
        write(wrapped, tmp_path / name)
        same_files(tmp_path / name, tmp_path / f"bare_{name}")


@wrappers
def test_model_verbs_on_a_wrapped_model_act_on_the_bare_one(wrapper: str) -> None:
    bare = trained()
    wrapped = WRAPPERS[wrapper](bare)
    names = ["layers.0", "layers.1"]
    assert [name for name, _ in minipissa.pissa_layers(wrapped)] == names
    summary = minipissa.summary(wrapped)
    assert [m.name for m in summary.modules] == names and summary.seconds == minipissa.summary(bare).seconds
    layers = [layer for _, layer in minipissa.pissa_layers(bare)]
    for verb in (minipissa.original, minipissa.disabled):
        with verb(wrapped) as inside:
            assert inside is wrapped and {layer.mode for layer in layers} == {verb.__name__}
    assert minipissa.merge(wrapped) is wrapped and all(layer.merged for layer in layers)
    assert minipissa.unmerge(wrapped) is wrapped and not any(layer.merged for layer in layers)
    assert minipissa.unload(wrapped) is wrapped and not list(minipissa.pissa_layers(bare))


@wrappers
def test_named_adapter_verbs_on_a_wrapped_model_act_on_the_bare_one(wrapper: str, tmp_path: Path) -> None:
    """Listing, switching, mixed batches, load_lora and delete through a wrapper; under DDP what changes which
    parameters train (switching) or adds some (load_lora) is refused, the model unchanged."""
    bare = minipissa.apply(base(), rank=3, targets=["layers.0", "layers.1"], name="a")
    minipissa.apply(bare, rank=2, targets=["layers.0"], name="b")
    minipissa.convert_to_lora(bare, tmp_path / "lora", name="b")
    wrapped = WRAPPERS[wrapper](bare)
    assert list(minipissa.adapters(wrapped)) == ["a", "b"] and minipissa.active_adapter(wrapped) == "a"
    with torch.no_grad(), minipissa.per_example(wrapped, ["a", "b", None]) as inside:
        assert inside is wrapped and {layer.mode for _, layer in minipissa.pissa_layers(bare)} == {"mixed"}
    if wrapper in WITH_DDP:
        assert_refused(wrapped, lambda m: minipissa.set_adapter(m, "b"), "minipissa.set_adapter: .*Distributed")
        assert_refused(wrapped, lambda m: minipissa.load_lora(m, tmp_path / "lora", name="c"), "load: .*Distributed")
    else:
        assert minipissa.set_adapter(wrapped, "b") is wrapped and minipissa.active_adapter(bare) == "b"
        with minipissa.adapter(wrapped, "a") as inside:
            assert inside is wrapped and minipissa.active_adapter(bare) == "a"
        assert minipissa.load_lora(wrapped, tmp_path / "lora", name="c") is wrapped
        minipissa.set_adapter(wrapped, "a")
    assert minipissa.delete_adapter(wrapped, "b") is wrapped and "b" not in minipissa.adapters(bare)


@wrappers
def test_loading_into_a_wrapped_model_loads_the_bare_one(wrapper: str, tmp_path: Path) -> None:
    """load and load_residual onto a wrapped model; under DDP load sets A and B of layers it has (resuming), as
    it cannot add layers (test_ddp_refuses_what_adds_parameters)."""
    saved = trained()
    minipissa.save(saved, tmp_path / "a.safetensors")
    minipissa.save_residual(saved, tmp_path / "r.safetensors")
    target = minipissa.apply(base(), **APPLY) if wrapper in WITH_DDP else base()
    wrapped = WRAPPERS[wrapper](target)
    assert minipissa.load(wrapped, tmp_path / "a.safetensors") is wrapped
    assert target.state_dict().keys() == saved.state_dict().keys()
    assert all(torch.equal(t, saved.state_dict()[k]) for k, t in target.state_dict().items())
    plain = base()
    wrapped = WRAPPERS[wrapper](plain)
    assert minipissa.load_residual(wrapped, tmp_path / "r.safetensors") is wrapped
    assert torch.equal(plain.layers[0].weight, saved.layers[0].weight)  # the residual


@pytest.mark.parametrize("wrapper", ["compile", "dp", "dp-compile"])
def test_apply_on_a_wrapper_adapts_the_model_inside(wrapper: str) -> None:
    """Returns the wrapper; the compiled code follows the new modules and original()'s mode (re-traced)."""
    bare = base()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    wrapped = WRAPPERS[wrapper](bare)
    wrapped(x)  # compiled before apply
    assert minipissa.apply(wrapped, **APPLY) is wrapped
    assert [name for name, _ in minipissa.pissa_layers(bare)] == ["layers.0", "layers.1"]
    assert set(minipissa.pissa_layers(bare)) == set(minipissa.pissa_layers(wrapped))
    with torch.no_grad():
        bare.layers[0].B.add_(0.5)
    assert torch.equal(wrapped(x), bare(x))
    with minipissa.original(wrapped):
        assert torch.equal(wrapped(x), bare(x))
        before = bare(x)
    assert not torch.equal(wrapped(x), before)  # the trained function again, not the original one


@needs_gloo
def test_ddp_refuses_what_adds_parameters(tmp_path: Path) -> None:
    """DDP's reducer keeps the parameters it was built with: apply, import_peft and a load that builds layers
    would leave A and B unsynchronised. Refused, nested too, with the model unchanged."""
    minipissa.save(trained(), tmp_path / "a.safetensors")
    for wrap in (DDP, WRAPPERS["compile-ddp"]):
        assert_refused(wrap(base()), lambda m: minipissa.apply(m, **APPLY), "minipissa.apply: .*DistributedData")
        assert_refused(
            wrap(base()), lambda m: minipissa.load(m, tmp_path / "a.safetensors"), "minipissa.load: .*Distributed"
        )
        assert_refused(
            wrap(base()), lambda m: minipissa.import_peft(m, tmp_path, tmp_path), "minipissa.import_peft: .*Distributed"
        )


@needs_gloo
def test_peft_loads_the_adapter_converted_from_a_wrapped_model(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = trained()
    minipissa.convert_to_lora(WRAPPERS["compile-ddp"](model), tmp_path / "lora")
    served = peft.PeftModel.from_pretrained(base(), tmp_path / "lora").eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(x), served(x)
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()  # as in test_convert's PEFT comparisons
    assert (ours - base()(x)).abs().max() > 1e-2 * ours.abs().max()


#: Every public function that takes a model, and the tests above that give it a wrapped one.
TESTED = {
    "apply": "test_apply_on_a_wrapper_adapts_the_model_inside",
    "import_peft": "test_ddp_refuses_what_adds_parameters",
    "save": "test_files_of_a_wrapped_model_are_the_bare_models",
    "save_residual": "test_files_of_a_wrapped_model_are_the_bare_models",
    "convert_to_lora": "test_files_of_a_wrapped_model_are_the_bare_models",
    "load": "test_loading_into_a_wrapped_model_loads_the_bare_one",
    "load_residual": "test_loading_into_a_wrapped_model_loads_the_bare_one",
    **{
        verb: "test_named_adapter_verbs_on_a_wrapped_model_act_on_the_bare_one"
        for verb in ("adapters", "active_adapter", "set_adapter", "adapter", "per_example", "load_lora")
        + ("delete_adapter",)
    },
    **{
        verb: "test_model_verbs_on_a_wrapped_model_act_on_the_bare_one"
        for verb in ("pissa_layers", "summary", "original", "disabled", "merge", "unmerge", "unload")
    },
}


def test_every_public_function_taking_a_model_is_tested_wrapped() -> None:
    taking = {
        name
        for name in minipissa.__all__
        if inspect.isfunction(fn := getattr(minipissa, name))
        and next(iter(inspect.signature(fn).parameters), None) in ("model", "src")
    }
    assert taking == set(TESTED)
