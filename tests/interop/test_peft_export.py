"""PiSSA -> LoRA conversion: the identity on plain layers (hypothesis), PEFT as the oracle on tiny
transformers models, rank re-compression error, and that nothing is modified."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from models import MLP, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn

import minipissa
from minipissa import StateError

EPS32 = torch.finfo(torch.float32).eps


def perturb(model: nn.Module, seed: int = 1, size: float = 0.1) -> nn.Module:
    """Move A and B off their init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in minipissa.pissa_layers(model):
            layer.A.add_(size * torch.randn(layer.A.shape, generator=g))
            layer.B.add_(size * torch.randn(layer.B.shape, generator=g))
    return model


def read_lora(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / "adapter_config.json").read_text()), load_file(out / "adapter_model.safetensors")


def peft_scaling(config: dict, rank: int) -> float:
    """How PEFT turns the config into the layer scaling (lora_alpha / r, or / sqrt(r) with rsLoRA)."""
    return config["lora_alpha"] / (math.sqrt(rank) if config["use_rslora"] else rank)


@given(
    n_in=st.integers(2, 40),
    n_out=st.integers(2, 40),
    rank=st.integers(1, 8),
    alpha=st.floats(0.5, 64),
    rslora=st.booleans(),
    conv1d=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(n_in=32, n_out=3, rank=3, alpha=1.0, rslora=True, conv1d=True, seed=0)  # 2r > out: B' is wide
def test_conversion_identity(tmp_path_factory, n_in, n_out, rank, alpha, rslora, conv1d, seed) -> None:  # type: ignore[no-untyped-def]
    from transformers.pytorch_utils import Conv1D

    rank = min(rank, n_in, n_out)
    torch.manual_seed(seed)
    layer = Conv1D(n_out, n_in) if conv1d else nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    w, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = perturb(minipissa.apply(nn.Sequential(layer), rank, ["0"], alpha=alpha, rslora=rslora), seed)
    out = tmp_path_factory.mktemp("lora")
    report = minipissa.convert_to_lora(model, out)
    config, tensors = read_lora(out)
    a, b = tensors["base_model.model.0.lora_A.weight"], tensors["base_model.model.0.lora_B.weight"]
    assert (a.shape, b.shape) == ((2 * rank, n_in), (n_out, 2 * rank))
    # Serving-safe: the module's scaling folded into B', scaling 1 for every loader, no rsLoRA, no patterns.
    assert config["r"] == config["lora_alpha"] == report.rank == 2 * rank and config["use_rslora"] is False
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    assert config["fan_in_fan_out"] == conv1d and config["init_lora_weights"] is True
    assert config["target_modules"] == ["0"] and report.relative_error == 0.0

    x = torch.randn(6, n_in)
    w_oi = w.T if conv1d else w  # (out, in)
    s = peft_scaling(config, 2 * rank)
    lora = x @ w_oi.T + bias + s * (x @ a.T) @ b.T  # the LoRA on the ORIGINAL weight, as PEFT computes it
    pissa = model(x).detach()
    # Both sides are sums of fp32 dot products of length <= n_in + 2r, plus the one rounding of W_res and the one
    # of the fold s·B': |error| <= (n_in + 2r + 5) * eps * (|x||W|^T + |b| + s|x||A|^T|B|^T + s|x||A0|^T|B0|^T)
    # elementwise (Higham's gamma_n bound, taken for each side).
    layer_p = model[0]
    mags = [(w_oi, None), (layer_p.A, layer_p.B), (layer_p.A0, layer_p.B0)]
    bound = bias.abs().double().expand(6, n_out).clone()
    for f, g in mags:
        f64 = f.detach().abs().double()
        term = x.abs().double() @ f64.T
        bound += term if g is None else layer_p.scaling * term @ g.detach().abs().double().T
    assert ((lora.double() - pissa.double()).abs() <= (n_in + 2 * rank + 5) * EPS32 * bound).all()


def _compare_with_peft(tmp_path: Path, build, targets, model_kw=None, prefix=None, inner=None):  # type: ignore[no-untyped-def]
    peft = pytest.importorskip("peft")
    adapted_root = build()
    root = adapted_root if inner is None else getattr(adapted_root, inner)
    minipissa.apply(root, 4, targets, **(model_kw or {}))
    perturb(root)
    kwargs = {} if prefix is None else {"prefix": prefix}
    out = tmp_path / "lora"
    minipissa.convert_to_lora(root, out, **kwargs)
    served = peft.PeftModel.from_pretrained(build(), out).eval()  # the ORIGINAL model + the LoRA
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ours, theirs = adapted_root(x).logits, served(x).logits
    # Per adapted product the two computations differ by <= (n_in + 2r + 4) eps relative (see the identity
    # test): 84 * 1.2e-7 = 1e-5; with 2 layers x <= 3 adapted products and O(1) gains between them, 1e-4.
    scale = ours.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale
    # and the adapter really changes the model: the comparison is not vacuous
    assert (ours - build()(x).logits).abs().max() > 1e-3 * scale
    return out


def test_peft_loads_llama(tmp_path: Path) -> None:
    out = _compare_with_peft(tmp_path, tiny_llama, ["q_proj", "v_proj"], {"alpha": 8})
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and config["task_type"] is None
    assert "model.layers.1.self_attn.v_proj" in config["target_modules"]


def test_peft_loads_llama_rslora_randomized(tmp_path: Path) -> None:
    _compare_with_peft(tmp_path, tiny_llama, ["q_proj", "v_proj"], {"alpha": 3, "rslora": True, "niter": 2})


def test_peft_loads_gpt2_conv1d(tmp_path: Path) -> None:
    out = _compare_with_peft(tmp_path, tiny_gpt2, ["c_attn"])
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_prefix_for_other_module_paths(tmp_path: Path) -> None:
    """Adapter trained on the bare LlamaModel (paths 'layers.0...'), served as LlamaForCausalLM ('model.layers...')."""
    _compare_with_peft(tmp_path, tiny_llama, ["q_proj"], prefix="base_model.model.model.", inner="model")


def test_per_module_ranks_are_padded_to_one_rank(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    def build() -> nn.Module:
        torch.manual_seed(0)
        return MLP((32, 48, 24, 16))

    model = perturb(minipissa.apply(build(), {"layers.0": 2, "*": 4}, ["layers.0", "layers.1", "layers.2"], alpha=6))
    out = tmp_path / "lora"
    minipissa.convert_to_lora(model, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (8, 8, {}, {})
    _, tensors = read_lora(out)
    a, b = tensors["base_model.model.layers.0.lora_A.weight"], tensors["base_model.model.layers.0.lora_B.weight"]
    assert a.shape == (8, 32) and b.shape == (48, 8)  # rank 2 -> 4 rows of [A ; A0], then 4 rows of zeros
    assert not a[4:].any() and not b[:, 4:].any() and a[:4].any()
    served = peft.PeftModel.from_pretrained(build(), out)
    x = torch.randn(4, 32)
    ours, theirs = model(x), served(x)
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()  # tolerance as in _compare_with_peft


def test_rank_recompression_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = perturb(minipissa.apply(MLP((32, 48, 24)), 4, ["layers.0", "layers.1"], alpha=2, rslora=True))
    full = {}  # the exact update dW = s (B A - B0 A0) of each module, in float64
    for name, layer in minipissa.pissa_layers(model):
        d = layer.B.double() @ layer.A.double() - layer.B0.double() @ layer.A0.double()
        full[name] = layer.scaling * d.detach()
    for k in (3, 6, 8, 50):
        out = tmp_path / f"k{k}"
        report = minipissa.convert_to_lora(model, out, rank=k)
        config, tensors = read_lora(out)
        tails, totals = 0.0, 0.0
        for name, dw in full.items():
            sigma = torch.linalg.svdvals(dw)
            tail = sigma[min(k, 8) :].square().sum().item()
            tails, totals = tails + tail, totals + sigma.square().sum().item()
            a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
            assert a.shape[0] == min(k, 8)
            written = peft_scaling(config, a.shape[0]) * (b.double() @ a.double())
            # Eckart-Young: the best rank-k error; the written factors must reach it (fp32 factors: 1e-6)
            best = math.sqrt(tail / sigma.square().sum().item())
            assert (written - dw).norm().item() / dw.norm().item() == pytest.approx(best, abs=1e-6)
            assert report.module_errors.get(name, 0.0) == pytest.approx(best, abs=1e-9)
        assert report.relative_error == pytest.approx(math.sqrt(tails / totals), abs=1e-9)
        assert report.rank == min(k, 8)
    assert minipissa.convert_to_lora(model, tmp_path / "k3", rank=3).relative_error > 0.05  # really truncates


def test_untrained_adapter_converts_to_zero_update(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = minipissa.apply(MLP(), 4, ["layers.0"])
    report = minipissa.convert_to_lora(model, tmp_path / "lora", rank=2)
    assert report.relative_error == 0.0  # B A - B0 A0 = 0 exactly: nothing is lost by truncating it


def test_conversion_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = perturb(minipissa.apply(MLP(), 4, ["layers.0", "layers.1"]))
    path = tmp_path / "a.safetensors"
    minipissa.save(model, path)
    before_file = path.read_bytes()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report_file = minipissa.convert_to_lora(path, tmp_path / "from_file")
    report_model = minipissa.convert_to_lora(model, tmp_path / "from_model", rank=5)
    assert path.read_bytes() == before_file
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert report_file.rank == 8 and report_model.rank == 5
    # the file and the live model give the same adapter
    minipissa.convert_to_lora(model, tmp_path / "from_model")
    _, t_file = read_lora(tmp_path / "from_file")
    _, t_model = read_lora(tmp_path / "from_model")
    assert t_file.keys() == t_model.keys() and all(torch.equal(t_file[k], t_model[k]) for k in t_file)


def test_conversion_refusals(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = perturb(minipissa.apply(MLP(), 4, ["layers.0"]))
    (tmp_path / "file").write_text("x")
    cases = [
        (dict(src=model, out_dir=tmp_path / "file"), "not a directory"),
        (dict(src=model, out_dir=tmp_path / "o", rank=0), "rank must be an int"),
        (dict(src=MLP(), out_dir=tmp_path / "o"), "no PiSSA layers"),
        (dict(src=tmp_path / "file", out_dir=tmp_path / "o"), "not a readable safetensors"),
    ]
    for kwargs, message in cases:
        with pytest.raises(StateError, match=message):
            minipissa.convert_to_lora(**kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "o").exists()


def vllm_output(original: nn.Module, out: Path, x: torch.Tensor, max_lora_rank: int) -> torch.Tensor:
    """What a serving stack that reads only r, lora_alpha, use_rslora and target_modules computes (vLLM's
    PEFTHelper): ONE scaling for every module, rank_pattern and alpha_pattern ignored, every A/B padded with zeros
    to max_lora_rank; W x + scaling * B (A x) on the ORIGINAL model, in float64."""
    config, tensors = read_lora(out)
    assert config["r"] <= max_lora_rank and not config["use_dora"] and config["bias"] == "none"
    assert config["modules_to_save"] is None
    scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    served = copy.deepcopy(original).double()
    with torch.no_grad():
        for name in config["target_modules"]:
            a = tensors[f"base_model.model.{name}.lora_A.weight"].double()
            b = tensors[f"base_model.model.{name}.lora_B.weight"].double()
            a = torch.cat([a, a.new_zeros(max_lora_rank - a.shape[0], a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], max_lora_rank - b.shape[1])], 1)
            served.get_submodule(name).weight += scaling * (b @ a)
    return served(x.double())


@given(
    ranks=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
    alphas=st.tuples(st.floats(0.5, 64), st.floats(0.5, 64), st.floats(0.5, 64)),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(ranks=(1, 6, 3), alphas=(0.5, 64.0, 7.0), rslora=True, seed=0)
def test_serving_stacks_and_peft_compute_the_trained_model(tmp_path_factory, ranks, alphas, rslora, seed) -> None:  # type: ignore[no-untyped-def]
    """Per-module ranks and alphas, rsLoRA or not: vLLM's arithmetic (patterns ignored, padded to max_lora_rank)
    on the original model equals the trained PiSSA model up to float32 rounding (the bound of the identity test
    per layer, summed through the 3 layers with their gains)."""
    names = ["layers.0", "layers.1", "layers.2"]

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return MLP((24, 32, 20, 16))

    model = minipissa.apply(
        build(), dict(zip(names, ranks, strict=True)), names, alpha=dict(zip(names, alphas, strict=True)), rslora=rslora
    )
    perturb(model, seed)
    out = tmp_path_factory.mktemp("lora")
    report = minipissa.convert_to_lora(model, out)
    assert report.rank == 2 * max(ranks) and report.serving_rank is not None
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(seed))
    want = model(x).detach().double()
    got = vllm_output(build(), out, x, report.serving_rank)
    # Each layer: <= (n_in + 2r + 5) eps relative to its magnitudes (identity test); three layers with
    # tanh-free ReLU-free linear chains in MLP (ReLU between: gain <= 1), so a 3 * 45 * eps bound on the
    # output's magnitude, x10 margin for the magnitudes of the intermediate sums.
    scale = want.abs().max().item() + 1.0
    assert (got - want).abs().max().item() <= 10 * 3 * (32 + 12 + 5) * EPS32 * scale


def test_peft_loads_per_module_ranks_alphas_and_rslora(tmp_path: Path) -> None:
    out = _compare_with_peft(
        tmp_path, tiny_llama, ["q_proj", "v_proj", "down_proj"],
        {"alpha": {"*": 3.0, "v_proj": 20.0}, "rslora": True},
    )  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == config["alpha_pattern"] == {} and config["use_rslora"] is False


def test_config_fields_and_model_card(tmp_path: Path) -> None:
    model = perturb(minipissa.apply(MLP(), {"*": 4, "layers.1": 2}, "all-linear", quantize="nf4"))
    report = minipissa.convert_to_lora(
        model, tmp_path / "lora", rank=6, base_model_name_or_path="org/base", task_type="CAUSAL_LM"
    )
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["task_type"]) == ("org/base", "CAUSAL_LM")
    assert report.rank == 6 and report.serving_rank == 8 and set(report.quantization_errors) == {"layers.0", "layers.1"}
    card = (tmp_path / "lora" / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/base\nlibrary_name: peft\n")
    assert "--max-lora-rank 8" in card and f"{report.relative_error:.3g}" in card and "QPiSSA" in card
    assert [minipissa.interop.peft_export.snap_rank(k) for k in (1, 7, 16, 31, 320, 1000)] == [1, 1, 16, 16, 320, 512]
    assert minipissa.interop.peft_export.serving_rank(513) is None
    with pytest.raises(StateError, match="task_type must be a string"):
        minipissa.convert_to_lora(model, tmp_path / "x", task_type=3)
