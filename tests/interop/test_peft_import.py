"""import_peft against adapters that real PEFT writes: PiSSA exact and pissa_niter_K, Llama and GPT-2 (Conv1D),
rank/alpha patterns read as PEFT reads them; and every adapter or base that is not what it claims, refused with
the model unchanged (crafted configs, tensors, initial adapters of another model, zero or swapped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import seams
import torch
from models import tiny_gpt2, tiny_llama
from peft_runs import crafted, peft_pissa_run, zero
from safetensors.torch import load_file, save_file
from snapshots import assert_refused
from torch import nn

import minipissa
from minipissa.interop.peft_config import PEFT_DEFAULTS

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    ("build", "targets", "init", "lora"),
    [
        (tiny_llama, ["q_proj", "v_proj"], "pissa", {}),
        (tiny_llama, ["q_proj", "down_proj"], "pissa_niter_4", {"use_rslora": True, "alpha_pattern": {"down_proj": 3}}),
        (tiny_gpt2, ["c_attn", "c_fc"], "pissa", {"fan_in_fan_out": True}),
        # rank/alpha pattern keys are regexes, matched as PEFT matches them (the whole name, or its end after a dot;
        # the first key in order that matches wins)
        (
            tiny_llama, ["q_proj", "k_proj", "v_proj"], "pissa",
            {"rank_pattern": {"q_proj|k_proj": 2}, "alpha_pattern": {r"layers\.1\..*": 3}},
        ),
        (
            tiny_llama, ["q_proj", "v_proj", "down_proj"], "pissa_niter_2",
            {"use_rslora": True, "rank_pattern": {r"model\.layers\.0\.mlp\.down_proj": 6},
             "alpha_pattern": {"v_proj": 2, r"mlp\.down_proj|nothing": 5, "^model.*q_proj$": 6}},
        ),
        (tiny_gpt2, ["c_attn", "c_fc"], "pissa", {"fan_in_fan_out": True, "alpha_pattern": {r"h\.0\.\w+\.c_\w+": 16}}),
    ],
)  # fmt: skip
def test_a_peft_pissa_adapter_imports_onto_the_original_model(tmp_path, build, targets, init, lora) -> None:  # type: ignore[no-untyped-def]
    served, initial, trained = peft_pissa_run(build, targets, tmp_path, init, **lora)
    model = minipissa.import_peft(build(), initial, trained)
    for name, layer in minipissa.pissa_layers(model):  # each module's rank, alpha and scaling: PEFT's
        theirs_layer = served.get_submodule(f"base_model.model.{name}")
        assert (layer.rank, layer.alpha) == (theirs_layer.r["default"], theirs_layer.lora_alpha["default"]), name
        assert layer.scaling == theirs_layer.scaling["default"], name
    assert len({layer.alpha for _, layer in minipissa.pissa_layers(model)}) > 1 or not lora.get("alpha_pattern")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = model(ids).logits, served(ids).logits
        with minipissa.original(model):
            original = model(ids).logits
        base = build()(ids).logits
    # The residuals differ by rounding only (PEFT subtracts s·B0A0 from W in its own order): the tolerance of
    # test_convert's PEFT comparisons; and original() is the untouched base model up to the same rounding.
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale
    assert (original - base).abs().max() <= 1e-4 * scale
    assert (ours - base).abs().max() > 1e-3 * scale  # the trained adapter really changes the model
    gaps = []  # minipissa's residual W - s·B0·A0 against PEFT's, relative (fp32 rounding; printed for the record)
    for name, layer in minipissa.pissa_layers(model):
        theirs_residual = served.get_submodule(f"base_model.model.{name}").base_layer.weight
        gaps.append(((layer.weight - theirs_residual).norm() / layer.weight.norm()).item())
    print(f"residual gap to PEFT's: max {max(gaps):.2e}")
    assert max(gaps) < 1e-5
    # A minipissa file of it reloads bit-exactly onto the original base, and converts.
    minipissa.save(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(minipissa.load(build(), tmp_path / "a.safetensors")(ids).logits, ours)
    info = json.loads(json.dumps(minipissa.io.adapter_file.read(tmp_path / "a.safetensors")[1][0].info))
    assert info["init"] == "pissa" and info["niter"] == (int(init.split("_")[-1]) if "niter" in init else None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path, Path]]:
    """PEFT PiSSA runs on the tiny Llama (q_proj, v_proj): exact; pissa_niter_4; exact with 3 steps at lr 1e-5
    (factors moved by less than the rounding tolerance); exact on another checkpoint (seed 1)."""
    root = tmp_path_factory.mktemp("peft_runs")
    targets = ["q_proj", "v_proj"]
    return {
        "exact": peft_pissa_run(tiny_llama, targets, root / "exact", "pissa"),
        "niter": peft_pissa_run(tiny_llama, targets, root / "niter", "pissa_niter_4"),
        "small steps": peft_pissa_run(tiny_llama, targets, root / "small", "pissa", lr=1e-5),
        "other checkpoint": peft_pissa_run(lambda: tiny_llama(1), targets, root / "other", "pissa"),
    }


Q = "base_model.model.model.layers.0.self_attn.q_proj"
MODULE = r"module 'model\.layers\.\d\.self_attn\.[qv]_proj'"


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("another checkpoint's initial adapter", f"{MODULE} are not a PiSSA init of this base weight: .* lies along"),
        ("onto another checkpoint", f"{MODULE} are not a PiSSA init of this base weight"),
        ("onto PEFT's residual model", f"{MODULE} are not a PiSSA init of this base weight"),
        ("all zero", f"{MODULE} .*keeps a singular value .* above s·B0·A0's smallest, 0;"),
        ("all zero, pissa_niter_4", f"{MODULE} .*s·B0·A0 is zero"),
        ("B0 zero (LoRA's init, relabelled)", f"{MODULE} .*lies along them"),
        ("swapped", f"{MODULE} are not a PiSSA init"),
        ("swapped after 3 steps at lr 1e-5", f"{MODULE}: the trained adapter's factors are a cleaner .*look swapped"),
        ("pissa_niter_4 relabelled 'pissa'", f"{MODULE} .*lies along them"),
        ("lora_alpha edited in both", f"{MODULE} .*lies along them"),
    ],
)
def test_an_initial_adapter_that_is_not_this_bases_pissa_init_is_refused(runs, tmp_path, case, match) -> None:  # type: ignore[no-untyped-def]
    """Refused with the module named and the model unchanged: the initial factors must be a PiSSA init (a
    projection of W, exact: its top r) of THIS base, and not the trained factors."""
    served, initial, trained = runs["exact"]
    model = tiny_llama()
    if case == "another checkpoint's initial adapter":
        initial = runs["other checkpoint"][1]
    elif case == "onto another checkpoint":
        model = tiny_llama(1)
    elif case == "onto PEFT's residual model":
        with torch.no_grad():
            for name, module in served.base_model.model.named_modules():
                if hasattr(module, "base_layer"):
                    model.get_submodule(name).weight.copy_(module.base_layer.weight)
    elif case.startswith("all zero"):
        initial = runs["niter" if "niter" in case else "exact"][1]
        _, _, trained = runs["niter" if "niter" in case else "exact"]
        initial = crafted(initial, tmp_path / "zero", tensors=zero("lora_"))
    elif case.startswith("B0 zero"):
        initial = crafted(initial, tmp_path / "b0", tensors=zero("lora_B"))
    elif case == "swapped":
        initial, trained = trained, initial
    elif case.startswith("swapped after"):
        _, trained, initial = runs["small steps"]
    elif case.startswith("pissa_niter_4 relabelled"):
        _, initial, trained = runs["niter"]
        initial = crafted(initial, tmp_path / "relabel", config=lambda c: c.update(init_lora_weights="pissa"))
    else:
        initial = crafted(initial, tmp_path / "i", config=lambda c: c.update(lora_alpha=16))
        trained = crafted(trained, tmp_path / "t", config=lambda c: c.update(lora_alpha=16))
    assert_refused(model, lambda m: minipissa.import_peft(m, initial, trained), match)


def test_the_small_steps_run_moved_less_than_the_tolerance(runs) -> None:  # type: ignore[no-untyped-def]
    """What makes the swapped case above a test of the comparison with the trained adapter, not of the tolerance."""
    from minipissa.interop.pissa_check import leak, tolerance

    served, _, _ = runs["small steps"]
    base = tiny_llama()
    for name, module in served.base_model.model.named_modules():
        if hasattr(module, "base_layer"):
            w = base.get_submodule(name).weight.double()
            a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            assert 1e-6 < leak(w, a, b, module.scaling["default"], True) < tolerance(torch.float32)


def test_a_bfloat16_peft_adapter_imports(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bfloat16 factors (a bfloat16 model, autocast_adapter_dtype=False): their rounding is within the tolerance."""
    build = lambda: tiny_llama(dtype=torch.bfloat16)  # noqa: E731
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa")
    served = peft.get_peft_model(build(), config, autocast_adapter_dtype=False)
    served.save_pretrained(tmp_path / "init")
    assert load_file(str(tmp_path / "init" / "adapter_model.safetensors"))[f"{Q}.lora_A.weight"].dtype == torch.bfloat16
    model = minipissa.import_peft(build(), tmp_path / "init", tmp_path / "init")
    assert len(list(minipissa.pissa_layers(model))) == 4


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.update({f"{Q}.lora_B.weight": torch.zeros(65, 4)}), "different modules or shapes"),
        (lambda t: t.update({f"{Q}.lora_A.weight": torch.zeros(4, 63)}), "different modules or shapes"),
        (lambda t: t.update({f"{Q}.lora_A.weight": torch.zeros(3, 64)}), r"lora_A \(3, 64\) .* and lora_B \(64, 4\)"),
        (lambda t: t.update({f"{Q}.lora_A.weight": torch.zeros(1, 4, 64)}), "a LoRA pair is float A"),
        (lambda t: t.update({f"{Q}.lora_B.weight": torch.zeros(64)}), "a LoRA pair is float A"),
        (lambda t: t.update({f"{Q}.lora_A.weight": torch.zeros(4, 64, dtype=torch.int32)}), "torch.int32"),
        (lambda t: t.pop(f"{Q}.lora_B.weight"), "no complete lora_A/lora_B pairs"),
        (lambda t: t.update({f"{Q}.lora_B.bias": torch.zeros(64)}), "not a LoRA A/B"),
        (lambda t: t[f"{Q}.lora_B.weight"].__setitem__((0, 0), float("nan")), "NaN or infinite adapter values"),
    ],
)
def test_a_mis_shaped_or_bad_trained_tensor_is_refused_before_any_layer_is_replaced(
    runs, tmp_path, edit, match
) -> None:  # type: ignore[no-untyped-def]
    _, initial, trained = runs["exact"]
    trained = crafted(trained, tmp_path / "t", tensors=edit)
    assert_refused(tiny_llama(), lambda m: minipissa.import_peft(m, initial, trained), match)


def test_both_adapters_mis_shaped_for_the_model_are_refused(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, initial, trained = runs["exact"]
    cut = lambda t: t.update({k: v[:, :60].contiguous() for k, v in t.items() if "lora_A" in k})  # noqa: E731
    initial, trained = crafted(initial, tmp_path / "i", tensors=cut), crafted(trained, tmp_path / "t", tensors=cut)
    assert_refused(tiny_llama(), lambda m: minipissa.import_peft(m, initial, trained), r"the adapter's A0 is \(4, 60\)")


@pytest.mark.parametrize("which", ["initial", "trained"])
@pytest.mark.parametrize(
    ("config", "match"),
    [
        (lambda c: c.update(use_rslora="false"), "use_rslora must be true or false, got 'false'"),
        (lambda c: c.update(lora_alpha=True), "lora_alpha must be a finite number"),
        (lambda c: c.update(r="16"), "r must be an integer"),
        (lambda c: c.update(r=4.0), "r must be an integer"),
        (lambda c: c.update(rank_pattern={"q_proj": "4"}), r"rank_pattern\['q_proj'\] must be an integer"),
        (lambda c: c.update(alpha_pattern={"q_proj(": 8}), "alpha_pattern key must be a regular expression"),
        (lambda c: c.update(lora_alpha=16), "in the initial adapter's config and r = 4, lora_alpha = (8|16) in the"),
        (lambda c: c.update(r=8), "in the initial adapter's config and r = (4|8), lora_alpha = 8 in the trained"),
        (lambda c: c.update(rank_pattern={"q_proj|v_proj": 2}), "in the initial adapter's config and r = (2|4)"),
        (lambda c: c.update(use_rslora=True), "'use_rslora' differs"),
        (lambda c: c.update(fan_in_fan_out=True), "'fan_in_fan_out' differs"),
    ],
)
def test_a_bad_config_field_is_refused_naming_it(runs, tmp_path, which, config, match) -> None:  # type: ignore[no-untyped-def]
    _, initial, trained = runs["exact"]
    if which == "initial":
        initial = crafted(initial, tmp_path / "i", config=config)
    else:
        trained = crafted(trained, tmp_path / "t", config=config)
    assert_refused(tiny_llama(), lambda m: minipissa.import_peft(m, initial, trained), match)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (lambda c: c.update(r=8), r"module 'model\.layers\.0\.self_attn\.q_proj': the config gives r = 8 .*rank 4"),
        (lambda c: c.update(rank_pattern={"q_proj|v_proj": 2}), "the config gives r = 2"),
        (lambda c: c.update(rank_pattern={r"layers\.1\..*": 2}), r"'model\.layers\.1\..*the config gives r = 2"),
    ],
)
def test_a_rank_in_both_configs_that_is_not_the_tensors_is_refused(runs, tmp_path, config, match) -> None:  # type: ignore[no-untyped-def]
    _, initial, trained = runs["exact"]
    initial, trained = crafted(initial, tmp_path / "i", config=config), crafted(trained, tmp_path / "t", config=config)
    assert_refused(tiny_llama(), lambda m: minipissa.import_peft(m, initial, trained), match)


def test_missing_config_keys_mean_peft_s_defaults(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The run used PEFT's default lora_alpha (8), no rsLoRA, no patterns: configs with only peft_type, r and
    init_lora_weights import to the same model."""
    _, initial, trained = runs["exact"]
    keep = ("peft_type", "r", "init_lora_weights", "target_modules")
    strip = lambda c: [c.pop(k) for k in list(c) if k not in keep]  # noqa: E731
    assert PEFT_DEFAULTS["lora_alpha"] == 8
    stripped = [crafted(d, tmp_path / d.name, config=strip) for d in (initial, trained)]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = minipissa.import_peft(tiny_llama(), initial, trained)(ids).logits
        assert torch.equal(minipissa.import_peft(tiny_llama(), *stripped)(ids).logits, full)


def test_patterns_that_disagree_on_a_module_are_refused_as_peft_itself_reloads_them_otherwise(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """alpha_pattern {"v_proj": 2, "self_attn.v_proj|down_proj": 5}: PEFT inits v_proj with the first (2), saves
    the keys sorted, and reloads v_proj with 5. Which one trained is not in the files: refused."""
    patterns = {"v_proj": 2, "self_attn.v_proj|down_proj": 5}
    served, initial, trained = peft_pissa_run(
        tiny_llama, ["v_proj", "down_proj"], tmp_path, "pissa", alpha_pattern=patterns
    )
    v_proj = "base_model.model.model.layers.0.self_attn.v_proj"
    assert served.get_submodule(v_proj).lora_alpha["default"] == 2
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), trained)
    assert reloaded.get_submodule(v_proj).lora_alpha["default"] == 5  # PEFT's own round trip changes the model
    match = r"module 'model\.layers\.0\.self_attn\.v_proj' matches several alpha_pattern keys .*reloads it with 5"
    assert_refused(tiny_llama(), lambda m: minipissa.import_peft(m, initial, trained), match)


def test_missing_or_unreadable_adapter_directories_are_refused(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, initial, trained = runs["exact"]
    _, other_initial, _ = peft_pissa_run(tiny_llama, ["v_proj"], tmp_path / "b", "pissa")
    lora_init = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora_init.save_pretrained(tmp_path / "plain")
    garbage = crafted(trained, tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"not safetensors")
    bad_json = crafted(trained, tmp_path / "json")
    (bad_json / "adapter_config.json").write_text("{'r': 4,")
    for first, second, match in [
        (tmp_path / "missing", trained, "not a readable PEFT adapter directory.*The initial adapter .*is needed"),
        (other_initial, trained, "different modules or shapes"),
        (tmp_path / "plain", trained, "init_lora_weights=True; the initial adapter must be PEFT's PiSSA init"),
        (initial, tmp_path / "missing", "not a readable PEFT adapter directory: .*No such file"),
        (initial, garbage, "is not a readable safetensors file .the adapter's tensors."),
        (initial, bad_json, "not a readable PEFT adapter directory: Expecting property name"),
    ]:
        assert_refused(tiny_llama(), lambda m, a=first, b=second: minipissa.import_peft(m, a, b), match)
    assert_refused(tiny_gpt2(), lambda m: minipissa.import_peft(m, initial, trained), "do not fit the model")


@pytest.mark.parametrize(
    ("build", "targets", "lora"), [(tiny_llama, ["q_proj"], {}), (tiny_gpt2, ["c_attn"], {"fan_in_fan_out": True})]
)
def test_the_command_line_imports_from_the_base_checkpoint_alone(tmp_path, build, targets, lora) -> None:  # type: ignore[no-untyped-def]
    """`python -m minipissa import-peft INITIAL TRAINED BASE OUT` needs no model: the file it writes loads onto the
    base model and gives what import_peft gives there, bit for bit."""

    from minipissa.interop.cli import main

    _, initial, trained = peft_pissa_run(build, targets, tmp_path, "pissa", **lora)
    weights = {k: v.contiguous() for k, v in build().state_dict().items() if any(t in k for t in targets)}
    save_file(weights, str(tmp_path / "base.safetensors"))
    assert (
        main(["import-peft", str(initial), str(trained), str(tmp_path / "base.safetensors"), str(tmp_path / "a.st")])
        == 0
    )
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        from_file = minipissa.load(build(), tmp_path / "a.st")(ids).logits
        direct = minipissa.import_peft(build(), initial, trained)(ids).logits
    assert torch.equal(from_file, direct)


def test_sharded_weights_are_refused_before_any_change(runs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """FSDP2 (DTensor) weights: refused, import onto the unsharded model first (is_dtensor stubbed: no process
    group needed to test the guard)."""
    _, initial, trained = runs["exact"]
    seams.replace(monkeypatch, "import sees a DTensor", lambda tensor: True)
    assert_refused(tiny_llama(), lambda m: minipissa.import_peft(m, initial, trained), "is sharded .FSDP2.")
