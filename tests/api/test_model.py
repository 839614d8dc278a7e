"""apply() over whole models: transformers models, seeds, checkpointing, summary, original(), unload()."""

from __future__ import annotations

import copy

import pytest
import torch
from models import MLP, tiny_gpt2, tiny_llama
from torch.utils.checkpoint import checkpoint

import minipissa

pytest.importorskip("transformers")


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def train(model: torch.nn.Module, steps: int = 3, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    x = ids(seed=1)  # one batch, so that the loss must fall
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# fp32 logits after apply: the residual split costs ~1 ulp per weight entry; through 2 tiny
# layers the logits (|l| ~ 1) move by far less than 1e-4.
LOGIT_ATOL = 1e-4


@pytest.mark.parametrize(
    ("build", "targets", "expected"),
    [
        (tiny_llama, ["q_proj", "v_proj"], 4),
        (tiny_llama, "all-linear", 14),  # 7 projections x 2 layers, not lm_head
        (tiny_gpt2, ["c_attn"], 2),  # Conv1D
        (tiny_gpt2, "all-linear", 8),  # c_attn, c_proj, c_fc, mlp.c_proj; lm_head is tied to wte
    ],
)
def test_transformers_models_keep_their_outputs_and_train(build, targets, expected):
    base = build()
    model = minipissa.apply(copy.deepcopy(base), 8, targets)
    assert len(list(minipissa.pissa_layers(model))) == expected
    x = ids()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, base(x).logits, rtol=0, atol=LOGIT_ATOL)
    model.train()
    losses = train(model, steps=5)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad(), minipissa.original(model):
        assert torch.allclose(model(x).logits, base(x).logits, rtol=0, atol=LOGIT_ATOL)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, base(x).logits, atol=1e-3)
        trained = model(x).logits
        minipissa.unload(model)
        assert not list(minipissa.pissa_layers(model))
        assert set(model.state_dict()) == set(base.state_dict())
        assert torch.allclose(model(x).logits, trained, rtol=0, atol=LOGIT_ATOL)


def test_state_dict_keys_are_the_originals_plus_the_adapter():
    base = tiny_llama()
    model = minipissa.apply(copy.deepcopy(base), 4, ["q_proj", "v_proj"])
    added = set(model.state_dict()) - set(base.state_dict())
    assert set(base.state_dict()) <= set(model.state_dict())
    assert added == {
        f"model.layers.{i}.self_attn.{p}.{t}"
        for i in (0, 1)
        for p in ("q_proj", "v_proj")
        for t in ("A", "B", "A0", "B0")
    }


def test_transformers_gradient_checkpointing():
    model = minipissa.apply(tiny_llama(), 4, "all-linear")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    grads = [layer.A.grad for _, layer in minipissa.pissa_layers(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_torch_checkpoint_gives_the_same_gradients():
    model = minipissa.apply(MLP((16, 32, 32, 8)), 4, "all-linear")
    x = torch.randn(5, 16)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    checkpoint(model, x, use_reentrant=False).square().sum().backward()
    again = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(plain, again, strict=True))


@pytest.mark.parametrize("niter", [None, 2])
def test_same_seed_is_bit_identical_and_the_global_rng_is_untouched(niter):
    def run(seed: int, disturb: bool) -> dict[str, torch.Tensor]:
        if disturb:
            torch.randn(1000)  # move the global RNG: the init must not care
        model = minipissa.apply(MLP((24, 40, 16)), 6, "all-linear", niter=niter, seed=seed)
        return {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(0)
    state = torch.get_rng_state()
    MLP((24, 40, 16))  # consumes the global RNG exactly like run()'s model construction
    after_build = torch.get_rng_state()
    torch.set_rng_state(state)
    first = run(0, disturb=False)
    assert torch.equal(torch.get_rng_state(), after_build)
    torch.manual_seed(0)
    second = run(0, disturb=False)
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(0)
    other_seed = run(1, disturb=False)
    differs = any(not torch.equal(first[k], other_seed[k]) for k in first if k.endswith(".A"))
    assert differs == (niter is not None)  # exact SVD ignores the seed


def test_lora_init_leaves_the_base_weight_and_output_untouched():
    base = MLP((24, 40, 16))
    model = minipissa.apply(copy.deepcopy(base), 6, "all-linear", init="lora")
    for (_, layer), original in zip(minipissa.pissa_layers(model), base.layers, strict=True):
        assert torch.equal(layer.weight, original.weight)
        assert torch.count_nonzero(layer.B) == 0
        assert layer.A.abs().max() <= 1 / layer.in_features**0.5
    x = torch.randn(3, 24)
    assert torch.equal(model(x), base(x))


def test_summary_reports_energy_dead_components_and_counts():
    torch.manual_seed(0)
    model = MLP((24, 40, 16))
    with torch.no_grad():  # make layer 1 rank 3 so that rank 6 leaves 3 dead components
        w = model.layers[1].weight
        w.copy_(w[:, :3] @ torch.randn(3, 40))
    minipissa.apply(model, 6, "all-linear")
    report = minipissa.summary(model)
    first, second = report.modules
    torch.manual_seed(0)
    w0 = MLP((24, 40, 16)).layers[0].weight.double()  # same seed: the same original weight
    s = torch.linalg.svdvals(w0)
    assert first.explained_energy == pytest.approx((s[:6].square().sum() / s.square().sum()).item(), rel=1e-5)
    assert (first.dead_components, second.dead_components) == (0, 3)
    assert second.explained_energy == pytest.approx(1.0, rel=1e-5)
    assert report.trainable == 6 * (24 + 40) + 6 * (40 + 16)
    assert report.total == report.trainable + sum(p.numel() for p in MLP((24, 40, 16)).parameters())
    assert report.seconds is not None and report.seconds > 0
    text = str(report)
    assert "layers.0" in text and "2 adapted modules" in text
    model.layers[0].bias.requires_grad_(True)  # a user who also trains a bias: counted, as requires_grad says
    model.layers[1].B.requires_grad_(False)
    assert minipissa.summary(model).trainable == report.trainable + 40 - 16 * 6
    minipissa.unload(model)
    assert minipissa.summary(model).seconds is None


# ---- InitConfig: every init option in one public value, apply(model, config=...) ----------------------------------


def seeded_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP()


def test_apply_with_a_config_is_apply_with_its_keywords_bit_for_bit() -> None:
    options = dict(
        rank={"*": 4, "layers.1": 2},
        alpha=8.0,
        rslora=True,
        niter=2,
        seed=3,
        dropout=0.1,
        quantize="nf4",
        quant_iters=2,
        adapter_dtype=torch.float64,
    )
    by_keywords = minipissa.apply(seeded_mlp(), targets="all-linear", **options)
    config = minipissa.InitConfig(**options)
    by_config = minipissa.apply(seeded_mlp(), config=config, targets="all-linear")
    mine, theirs = dict(minipissa.pissa_layers(by_config)), dict(minipissa.pissa_layers(by_keywords))
    assert mine.keys() == theirs.keys()
    for name, layer in mine.items():
        assert layer.info == theirs[name].info
        for key, tensor in layer.state_dict().items():
            assert torch.equal(tensor, theirs[name].state_dict()[key]), (name, key)
    x = torch.randn(3, 32)
    by_config.eval(), by_keywords.eval()
    assert torch.equal(by_config(x), by_keywords(x))
    assert minipissa.apply(MLP(), config=config, targets="all-linear", alpha=None, seed=0)  # defaults: no clash


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"config": minipissa.InitConfig(4), "rank": 4}, TypeError, r"\['rank'\] given beside config="),
        ({"config": minipissa.InitConfig(4), "seed": 1, "quantize": "nf4"}, TypeError, r"\['seed', 'quantize'\]"),
        ({"config": {"rank": 4}}, TypeError, "config must be a minipissa.InitConfig"),
        ({}, TypeError, "pass rank="),
        ({"rank": 4, "targets": None}, TypeError, "targets is required"),
    ],
)
def test_a_config_beside_init_keywords_or_no_rank_is_a_named_error(kwargs, error, match) -> None:
    model = MLP()
    before = copy.deepcopy(model.state_dict())
    kwargs = {"targets": "all-linear", **kwargs}
    with pytest.raises(error, match=match):
        minipissa.apply(model, **kwargs)
    assert not list(minipissa.pissa_layers(model))
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_apply_keywords_are_init_config_s_options_with_its_defaults() -> None:
    """One set of defaults: every init keyword of apply() is an InitConfig option, with the same default."""
    import dataclasses
    import inspect

    params = inspect.signature(minipissa.apply).parameters
    for field in dataclasses.fields(minipissa.InitConfig):
        if field.name not in ("rank", "stack"):
            assert params[field.name].default == field.default, field.name
