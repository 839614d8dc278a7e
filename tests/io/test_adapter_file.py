"""save() / load(): bit-exact reload with no SVD, every refusal leaves the model unchanged, corrupted files,
atomic writes, optimizer resume."""

from __future__ import annotations

import copy
import json
import re
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import MLP, tiny_gpt2, tiny_llama
from snapshots import assert_unchanged, editable, snapshot
from torch import nn

import minipissa
from minipissa import StateError
from minipissa.core.dtypes import SAFETENSORS
from minipissa.io import safefile

X = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))


def mlp(seed: int = 0, sizes: tuple[int, ...] = (32, 48, 24), dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(sizes).to(dtype)


def perturb(model: nn.Module, seed: int = 1, size: float = 0.05) -> nn.Module:
    """Move A and B as a few training steps would (the saved state must differ from the init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in minipissa.pissa_layers(model):
            layer.A.add_(size * torch.randn(layer.A.shape, generator=g).to(layer.A.dtype))
            layer.B.add_(size * torch.randn(layer.B.shape, generator=g).to(layer.B.dtype))
    return model


def adapted(seed: int = 0, **kw: object) -> nn.Module:
    kw = {"rank": 4, "targets": ["layers.0", "layers.1"], **kw}
    return perturb(minipissa.apply(mlp(seed), **kw))  # type: ignore[arg-type]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("build", "targets", "niter"),
    [(tiny_llama, ["q_proj", "v_proj"], None), (tiny_llama, ["q_proj", "v_proj"], 2), (tiny_gpt2, ["c_attn"], 1)],
)
def test_round_trip_bit_exact(tmp_path: Path, build, targets, niter) -> None:  # type: ignore[no-untyped-def]
    model = perturb(minipissa.apply(build(), 4, targets, niter=niter, alpha=8))
    path = tmp_path / "adapter.safetensors"
    minipissa.save(model, path)
    torch.manual_seed(12345)  # a different global RNG state must not matter (PEFT re-runs its SVD here)
    loaded = minipissa.load(build(), path)
    assert torch.equal(model(ids()).logits, loaded(ids()).logits)
    assert_same_state(model, loaded)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]


@given(
    sizes=st.tuples(st.integers(2, 24), st.integers(2, 24)),
    rank=st.integers(1, 6),
    alpha=st.floats(0.25, 64),
    rslora=st.booleans(),
    conv1d=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    init=st.sampled_from(["exact", "randomized 0", "randomized 2", "minor", "lora"]),
    adapter_bf16=st.booleans(),
)
def test_round_trip_property(tmp_path_factory, sizes, rank, alpha, rslora, conv1d, dtype, init, adapter_bf16) -> None:  # type: ignore[no-untyped-def]
    from transformers.pytorch_utils import Conv1D

    n_in, n_out = sizes
    rank = min(rank, n_in, n_out)

    def build() -> nn.Module:
        torch.manual_seed(0)
        layer = Conv1D(n_out, n_in) if conv1d else nn.Linear(n_in, n_out)
        nn.init.normal_(layer.weight)
        return nn.Sequential(layer).to(dtype)

    how = {"init": "lora"} if init == "lora" else {"components": "minor"} if init == "minor" else {}
    if init.startswith("randomized"):
        how["niter"] = int(init.split()[1])
    model = minipissa.apply(
        build(), rank, ["0"], alpha=alpha, rslora=rslora, adapter_dtype=torch.bfloat16 if adapter_bf16 else None, **how
    )
    perturb(model)
    path = tmp_path_factory.mktemp("rt") / "a.safetensors"
    minipissa.save(model, path)
    loaded = minipissa.load(build(), path)
    x = torch.randn(3, n_in).to(dtype)
    assert torch.equal(model(x), loaded(x))
    assert_same_state(model, loaded)


def test_residual_base_round_trip(tmp_path: Path) -> None:
    """GPT-2: residual weights saved once (tied lm_head/wte written once, restored tied), adapter on top."""
    model = perturb(minipissa.apply(tiny_gpt2(), 4, ["c_attn"]))
    minipissa.save(model, tmp_path / "a.safetensors")
    minipissa.merge(model)  # a merged model must still write the exact residual
    minipissa.save_residual(model, tmp_path / "res.safetensors")
    minipissa.unmerge(model)
    info, tensors = safefile.read(tmp_path / "res.safetensors")
    names = list(tensors)
    assert info["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in names and not any(n.endswith((".A", ".B", ".A0", ".B0")) for n in names)

    fresh = tiny_gpt2(seed=7)  # other weights: everything must come from the file
    minipissa.load_residual(fresh, tmp_path / "res.safetensors")
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    before = snapshot(fresh)
    with pytest.raises(StateError, match="base='residual'"):
        minipissa.load(fresh, tmp_path / "a.safetensors")  # default base="original" on a residual model
    assert_unchanged(fresh, before)
    minipissa.load(fresh, tmp_path / "a.safetensors", base="residual")
    assert torch.equal(model(ids()).logits, fresh(ids()).logits)
    assert_same_state(model, fresh)

    with pytest.raises(StateError, match="base='original'"):
        minipissa.load(tiny_gpt2(), tmp_path / "a.safetensors", base="residual")
    with pytest.raises(StateError, match="already has PiSSA layers"):
        minipissa.load_residual(fresh, tmp_path / "res.safetensors")
    other = tiny_gpt2(layers=1)
    before = snapshot(other)
    with pytest.raises(StateError, match="state-dict keys differ"):
        minipissa.load_residual(other, tmp_path / "res.safetensors")
    assert_unchanged(other, before)


def _refusals(tmp_path: Path) -> list[tuple[str, nn.Module, dict, str]]:
    """(case, model, load kwargs, expected message) for every refusal of load()."""
    path = tmp_path / "a.safetensors"
    minipissa.save(adapted(), path)
    residual = copy.deepcopy(adapted())  # its weights are W_res: a base that is already residual
    minipissa.save_residual(residual, tmp_path / "res.safetensors")
    res_model = minipissa.load_residual(mlp(), tmp_path / "res.safetensors")
    other_adapter = minipissa.apply(mlp(), 2, ["layers.0", "layers.1"])
    return [
        ("wrong base", mlp(seed=1), {}, "fingerprint differs"),
        ("already residual", res_model, {}, "pass base='residual'"),
        ("shape", mlp(sizes=(32, 40, 24)), {}, "shape"),
        ("dtype", mlp(dtype=torch.float64), {}, "Cast the model to float32"),
        ("missing module", mlp(sizes=(32, 48)), {}, "'layers.1' of .* is not in the model"),
        ("other adapter", other_adapter, {}, "different adapter"),
        ("merged", minipissa.merge(adapted()), {}, "is merged; call minipissa.unmerge"),
        ("stray adapter", minipissa.apply(mlp(sizes=(32, 48, 24, 8)), 4, ["layers.2"]), {}, r"layers.2.*does not"),
        ("base arg", mlp(), {"base": "merged"}, "base must be"),
        ("optimizer first", mlp(), {"optimizer": torch.optim.SGD(mlp().parameters())}, "call load"),
    ]


def test_refusals_leave_model_unchanged(tmp_path: Path) -> None:
    for _case, model, kwargs, message in _refusals(tmp_path):
        before = snapshot(model)
        with pytest.raises(StateError, match=message):
            minipissa.load(model, tmp_path / "a.safetensors", **kwargs)
        assert_unchanged(model, before)


def test_bad_files(tmp_path: Path) -> None:
    model = mlp()
    before = snapshot(model)
    good = tmp_path / "a.safetensors"
    minipissa.save(adapted(), good)
    (tmp_path / "text.safetensors").write_bytes(b"not a safetensors file at all" * 10)
    from safetensors.torch import save_file

    save_file({"x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "peft.safetensors", metadata={"format": "pt"})
    minipissa.save_residual(adapted(), tmp_path / "res.safetensors")
    cases = {
        "missing.safetensors": "does not exist",
        "text.safetensors": "not a readable safetensors",
        "peft.safetensors": "without minipissa metadata",
        "res.safetensors": "of kind 'residual', expected kind 'adapter'",
    }
    for name, message in cases.items():
        with pytest.raises(StateError, match=message):
            minipissa.load(model, tmp_path / name)
    assert_unchanged(model, before)


def test_unknown_format_version(tmp_path: Path) -> None:
    future = safefile.FORMAT_VERSION + 1
    minipissa.save(adapted(), tmp_path / "now.safetensors")
    payload, tensors = editable(tmp_path / "now.safetensors")  # rewritten as a "future" minipissa would, checksummed
    safefile.write(tmp_path / "future.safetensors", tensors, "adapter", payload | {"format_version": future})
    model = mlp()
    before = snapshot(model)
    readable = re.escape(str(list(safefile.READABLE_VERSIONS)))
    with pytest.raises(StateError, match=rf"format version {future}; this minipissa reads versions {readable}"):
        minipissa.load(model, tmp_path / "future.safetensors")
    assert_unchanged(model, before)


def test_corrupted_files_fuzz(tmp_path: Path) -> None:
    """Truncation anywhere and a flipped bit at many offsets (every header byte region, data bytes)
    give a StateError and nothing else; the model is untouched. The one flip allowed to load is one
    that changes no value: the 17th digit of a float in the JSON can parse to the same double."""
    good = tmp_path / "a.safetensors"
    minipissa.save(adapted(), good)
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    offsets = sorted(set(range(0, header_end, 3)) | set(range(header_end, len(data), 97)) | {len(data) - 1})
    bad = tmp_path / "bad.safetensors"
    model = mlp()
    before = snapshot(model)
    reference = minipissa.load(mlp(), good)
    for offset in offsets:
        flipped = bytearray(data)
        flipped[offset] ^= 1 << (offset % 8)
        bad.write_bytes(bytes(flipped))
        try:
            minipissa.load(model, bad)
        except StateError:
            continue
        assert offset < header_end, f"a flipped data byte at {offset} loaded"
        loaded = minipissa.load(mlp(), bad)
        assert_unchanged(loaded, snapshot(reference))
        assert [layer.info for _, layer in minipissa.pissa_layers(loaded)] == [
            layer.info for _, layer in minipissa.pissa_layers(reference)
        ], f"the flip at {offset} loaded a different value"
        model, before = mlp(), snapshot(mlp())
    for length in list(range(0, len(data), max(1, len(data) // 150))):
        bad.write_bytes(data[:length])
        with pytest.raises(StateError):
            minipissa.load(model, bad)
    assert_unchanged(model, before)
    minipissa.load(model, good)  # and the good file still loads


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits (resource.RLIMIT_FSIZE)")
def test_interrupted_save_keeps_old_file(tmp_path: Path) -> None:
    model = adapted()
    path = tmp_path / "a.safetensors"
    minipissa.save(model, path)
    expected = model(X)
    perturb(model, seed=2)

    # A real disk-full midway: with the file-size limit at 500 bytes, the write of the new file's header stops
    # there (EFBIG: an OSError, as SIGXFSZ is ignored meanwhile), half-written, and the save fails.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (500, hard))
    try:
        with pytest.raises(OSError):
            minipissa.save(model, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind
    assert torch.equal(minipissa.load(mlp(), path)(X), expected)


def test_save_refuses_model_without_adapters(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no PiSSA layers"):
        minipissa.save(mlp(), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 32, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_optimizer_resume_gives_same_steps(tmp_path: Path) -> None:
    model = minipissa.apply(mlp(), 4, ["layers.0", "layers.1"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.0)
    _steps(model, opt, 3, seed=0)
    path = tmp_path / "a.safetensors"
    minipissa.save(model, path, optimizer=opt)
    _steps(model, opt, 2, seed=1)  # the uninterrupted run

    resumed = minipissa.load(mlp(), path)
    # other hyperparameters and reversed parameter order: the file's values and names must win
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad][::-1], lr=0.5)
    minipissa.load(resumed, path, optimizer=opt2)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.8, 0.95)
    _steps(resumed, opt2, 2, seed=1)
    assert_same_state(model, resumed)

    before = snapshot(resumed)
    sgd = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(StateError, match="for a AdamW, the optimizer is a SGD"):
        minipissa.load(resumed, path, optimizer=sgd)
    minipissa.save(model, tmp_path / "plain.safetensors")
    with pytest.raises(StateError, match="no optimizer state"):
        minipissa.load(resumed, tmp_path / "plain.safetensors", optimizer=opt2)
    assert_unchanged(resumed, before)
    with pytest.raises(StateError, match="not a PiSSA A/B"):
        minipissa.save(model, path, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(3))]))
    with pytest.raises(StateError, match="not the model's PiSSA A/B"):
        minipissa.load(resumed, path, optimizer=torch.optim.AdamW([nn.Parameter(torch.zeros(3))]))


def test_metadata_records_the_run(tmp_path: Path) -> None:
    model = perturb(minipissa.apply(mlp(), 4, ["layers.0", "layers.1"], niter=2, oversample=3, seed=5, alpha=8))
    minipissa.save(model, tmp_path / "a.safetensors")
    info, _ = safefile.read(tmp_path / "a.safetensors", "adapter")
    assert info["config"] == {
        "rank": 4, "alpha": 8.0, "rslora": False, "init": "pissa", "niter": 2, "oversample": 3, "seed": 5,
        "components": "principal", "quantize": None, "quant_iters": 1,
    }  # fmt: skip
    m = info["modules"]["layers.0"]
    weight = mlp().layers[0].weight.double()
    assert (m["out_features"], m["in_features"], m["fan_in_fan_out"]) == (48, 32, False)
    # Row norms accumulate in float32 (rows of 32 here): relative error at most 32 * 2**-24.
    assert m["info"]["weight_norm"] == pytest.approx(weight.norm().item(), rel=32 * 2**-24)
    top = torch.linalg.svdvals(weight)[:4]  # niter 2, oversample 3 on a 48x32 Gaussian: within a few %
    assert torch.allclose(torch.tensor(m["info"]["singular_values"], dtype=torch.float64), top, rtol=0.1)
    json.dumps(info)  # and the whole blob is plain JSON


def test_cast_after_apply_reloads_on_the_original_dtype(tmp_path: Path) -> None:
    """apply() in fp32, then model.half(): the file needs the fp32 base (the residual was made from it)."""
    model = adapted().half()
    path = tmp_path / "a.safetensors"
    minipissa.save(model, path)
    half_base = mlp().half()
    before = snapshot(half_base)
    with pytest.raises(StateError, match="Cast the model to float32"):
        minipissa.load(half_base, path)
    assert_unchanged(half_base, before)
    loaded = minipissa.load(mlp(), path).half()
    assert torch.equal(model(X.half()), loaded(X.half()))


def test_saved_file_has_ordinary_permissions(tmp_path: Path) -> None:
    minipissa.save(adapted(), tmp_path / "a.safetensors")
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "a.safetensors").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_saving_the_same_model_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    # safetensors writes metadata keys in hash order: with more than one key the bytes would vary.
    model = adapted()
    contents = set()
    for i in range(4):
        minipissa.save(model, tmp_path / f"a{i}.safetensors")
        contents.add((tmp_path / f"a{i}.safetensors").read_bytes())
    assert len(contents) == 1


@pytest.mark.parametrize("dtype", sorted(SAFETENSORS, key=str))
def test_own_safetensors_writer_is_read_back_by_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.matrix": (torch.randn(3, 5, generator=g) * 50).to(dtype),
        "a.vector": (torch.randn(7, generator=g) * 50).to(dtype),
        "c.empty": torch.zeros(0, 4, dtype=dtype),
        "d.scalar": torch.tensor(3, dtype=dtype),
    }
    path = tmp_path / "t.safetensors"
    safefile.write_safetensors(tensors, str(path), {"note": "x"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "x"}
        back = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


def test_save_load_convert_need_no_numpy(tmp_path: Path) -> None:
    # numpy is no dependency of minipissa (nor of torch or safetensors), but safetensors.torch.save_file imports it.
    script = f"""
import sys
sys.modules["numpy"] = None  # any import of numpy now fails
import torch, minipissa
torch.manual_seed(0)
model = minipissa.apply(torch.nn.Sequential(torch.nn.Linear(8, 6)), 2, "0")
minipissa.save(model, r"{tmp_path}/a.safetensors")
minipissa.convert_to_lora(r"{tmp_path}/a.safetensors", r"{tmp_path}/lora")
minipissa.save_residual(model, r"{tmp_path}/r.safetensors")
fresh = minipissa.load_residual(torch.nn.Sequential(torch.nn.Linear(8, 6)), r"{tmp_path}/r.safetensors")
minipissa.load(fresh, r"{tmp_path}/a.safetensors", base="residual")
assert torch.equal(fresh(torch.ones(1, 8)), model(torch.ones(1, 8)))
print("ok")
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_saved_file_fingerprints_the_residual_also_when_merged(tmp_path: Path) -> None:
    """apply() fingerprints the base weight and the residual; save() writes the residual's as it is then (W_res,
    even while merged), which load(base="residual") checks a residual model against."""
    from minipissa.core.fingerprint import fingerprint

    model = adapted()
    expected = {name: fingerprint(layer.weight) for name, layer in minipissa.pissa_layers(model)}
    assert {name: layer.info["residual_fingerprint"] for name, layer in minipissa.pissa_layers(model)} == expected
    minipissa.merge(model)
    minipissa.save(model, tmp_path / "a.safetensors")
    _, records, _ = minipissa.io.adapter_file.read(tmp_path / "a.safetensors")
    assert {r.name: r.info["residual_fingerprint"] for r in records} == expected
    assert not any("residual_edited" in r.info for r in records)
