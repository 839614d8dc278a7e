"""Which modules apply() adapts, and the errors for what it cannot."""

from __future__ import annotations

import re

import pytest
import torch
from models import Conv1D
from snapshots import assert_unchanged, snapshot
from torch import nn

import minipissa
from minipissa.plan.targets import find_targets, matches, value_for


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), Conv1D(16, 32))


class TinyLM(nn.Module):
    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 50, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block.v_proj(block.q_proj(h)) + block.mlp(h)
        return self.head(h)


def names(model: nn.Module, targets, exclude=None) -> list[str]:
    return [n for n, _ in find_targets(model, targets, exclude)]


def test_pattern_forms():
    assert matches("blocks.0.q_proj", "q_proj") and matches("blocks.0.q_proj", "0.q_proj")
    assert matches("q_proj", "q_proj") and not matches("blocks.0.xq_proj", "q_proj")
    assert matches("blocks.1.v_proj", "re:blocks\\.1\\..*") and not matches("blocks.10.v_proj", "re:blocks\\.1")
    assert matches("blocks.1.v_proj", re.compile(r".*\.v_proj")) and not matches("blocks.1.v_proj", re.compile("v"))


def test_suffix_exact_regex_and_exclude():
    model = TinyLM()
    assert names(model, ["q_proj", "v_proj"]) == [f"blocks.{i}.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert names(model, "blocks.1.q_proj") == ["blocks.1.q_proj"]
    assert names(model, "re:blocks\\.\\d\\.mlp\\.[02]") == [
        "blocks.0.mlp.0",
        "blocks.0.mlp.2",
        "blocks.1.mlp.0",
        "blocks.1.mlp.2",
    ]
    assert names(model, ["q_proj"], exclude=["blocks.0.q_proj"]) == ["blocks.1.q_proj"]


def test_all_linear_skips_the_output_head():
    model = TinyLM(tied=True)  # the head shares the embedding's weight
    found = names(model, "all-linear")
    assert len(found) == 8 and all(n.startswith("blocks.") for n in found)
    model.lm_head = nn.Linear(16, 50)  # named like the transformers head
    assert "lm_head" not in names(model, "all-linear")


def test_all_linear_uses_get_output_embeddings():
    model = TinyLM(tied=False)
    model.get_output_embeddings = lambda: model.head  # type: ignore[method-assign]
    assert "head" not in names(model, "all-linear")
    del model.get_output_embeddings
    # An untied head that no rule identifies is an ordinary linear layer.
    assert "head" in names(model, "all-linear")


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"targets": ["q_proj", "k_proj"]}, ValueError, r"\['k_proj'\] match no module; candidates: 0, 2, head"),
        ({"targets": "embed"}, TypeError, r"'embed' .* Embedding; supported are nn.Linear"),
        ({"targets": "mlp"}, TypeError, r"'blocks.0.mlp' .* Sequential"),
        ({"targets": []}, ValueError, "targets` is empty"),
        ({"targets": "q_proj", "exclude": "q_proj"}, ValueError, "no module left"),
        (
            {"targets": "mlp.2", "rank": 17},
            ValueError,
            r"rank 17 exceeds min\(out, in\) = 16 of module 'blocks.0.mlp.2'",
        ),
        ({"targets": "q_proj", "rank": 0}, ValueError, "module 'blocks.0.q_proj' rank must be an integer >= 1"),
        ({"targets": "q_proj", "rank": {"v_proj": 4}}, ValueError, "no rank for module 'blocks.0.q_proj'"),
        (
            {"targets": "q_proj", "alpha": -1.0},
            ValueError,
            r"module 'blocks.0.q_proj' alpha must be a finite number in \(0, inf\]",
        ),
        ({"targets": "q_proj", "niter": 2, "components": "minor"}, ValueError, "minor.*exact SVD"),
        ({"targets": "q_proj", "init": "gaussian"}, ValueError, "init must be one of"),
        ({"targets": "q_proj", "components": "top"}, ValueError, "components must be"),
        ({"targets": "q_proj", "niter": -1}, ValueError, "niter must be None"),
        ({"targets": "q_proj", "dropout": 1.0}, ValueError, r"dropout must be a finite number in \[0, 1\)"),
        ({"targets": "q_proj", "oversample": -2, "niter": 1}, ValueError, "oversample must be >= 0"),
    ],
)
def test_errors_name_the_problem_and_leave_the_model_unchanged(kwargs, error, pattern):
    model = TinyLM()
    before = snapshot(model)
    kwargs = {"rank": 4, **kwargs}
    with pytest.raises(error, match=pattern):
        minipissa.apply(model, **kwargs)
    assert_unchanged(model, before)


def test_second_apply_on_an_adapted_module_is_refused():
    model = minipissa.apply(TinyLM(), 4, "q_proj")
    before = snapshot(model)
    with pytest.raises(ValueError, match="'blocks.0.q_proj' already is a PiSSALinear"):
        minipissa.apply(model, 4, ["q_proj", "v_proj"])
    assert_unchanged(model, before)
    # Other modules can still be adapted, and the adapter's own children are never matched.
    minipissa.apply(model, 4, "v_proj")
    assert len(list(minipissa.pissa_layers(model))) == 4


@pytest.mark.parametrize(
    ("weight", "pattern"),
    [
        (torch.zeros(16, 16, dtype=torch.int8), "torch.int8 weight"),
        (torch.empty(16, 16, device="meta"), "meta weight"),
    ],
)
def test_non_float_and_meta_weights_are_refused(weight, pattern):
    model = TinyLM()
    model.blocks[1].v_proj.weight = nn.Parameter(weight, requires_grad=False)
    with pytest.raises(TypeError, match=f"'blocks.1.v_proj' has a {pattern}.*dequantize"):
        minipissa.apply(model, 4, "v_proj")
    assert type(model.blocks[0].v_proj) is nn.Linear


def test_per_module_rank_and_alpha():
    model = minipissa.apply(TinyLM(), {"*": 4, "blocks.1.q_proj": 2}, "q_proj", alpha={"re:blocks\\.0\\..*": 8.0})
    first, second = model.blocks[0].q_proj, model.blocks[1].q_proj
    assert (first.rank, first.alpha, first.scaling) == (4, 8.0, 2.0)
    assert (second.rank, second.alpha, second.scaling) == (2, 2.0, 1.0)  # alpha defaults to the rank
    assert value_for("x.q_proj", {"q_proj": 1, "*": 3}, "rank") == 1
    assert value_for("x.k_proj", {"q_proj": 1, "*": 3}, "rank") == 3


def test_all_linear_that_finds_nothing_says_so_without_blaming_exclude():
    model = nn.Sequential(nn.Linear(4, 4))  # its only linear layer is its output head
    with pytest.raises(ValueError, match=r"'all-linear' found no nn.Linear .* outside the output head\(s\) \['0'\]"):
        minipissa.apply(model, 2, "all-linear")
    with pytest.raises(ValueError, match="no module left to adapt after `exclude`"):
        minipissa.apply(TinyLM(), 2, "q_proj", exclude="q_proj")


def test_a_parametrized_models_internal_modules_are_never_targets():
    """The suffix '0' used to match '<module>.parametrizations.weight.0' (torch's _WeightNorm): a TypeError about a
    module the user never named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    torch.nn.utils.parametrizations.weight_norm(model[2])
    assert [n for n, _ in find_targets(model, "0")] == ["0"]
