"""An optimizer's state in the adapter file (optimizer_state.py): hyperparameters of every kind an optimizer holds
(tensors such as a capturable optimizer's lr, tuples, lists) come back as they were, bit for bit, so a resumed run
takes the steps of an uninterrupted one; what the file cannot hold is refused by save(), by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models import MLP
from snapshots import editable
from torch import nn

import minipissa
from minipissa import StateError
from minipissa.io import safefile


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP((32, 48, 24))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        model(torch.randn(8, 32, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def tensor_adamw(params: list[nn.Parameter], lr: float = 1e-2) -> torch.optim.Optimizer:
    """The README's CUDA-graph recipe as the CPU takes it: a tensor lr (and betas), no foreach/fused kernels."""
    betas = (torch.tensor(0.8), torch.tensor(0.95))
    return torch.optim.AdamW(params, lr=torch.tensor(lr), betas=betas, weight_decay=0.0, foreach=False)


def test_tensor_hyperparameters_resume_bit_exactly(tmp_path: Path) -> None:
    model = minipissa.apply(mlp(), 4, ["layers.0", "layers.1"])
    opt = tensor_adamw(trainable(model))
    steps(model, opt, 3, seed=0)
    minipissa.save(model, tmp_path / "a.safetensors", optimizer=opt)
    steps(model, opt, 2, seed=1)  # the uninterrupted run

    resumed = minipissa.load(mlp(), tmp_path / "a.safetensors")
    opt2 = tensor_adamw(trainable(resumed)[::-1], lr=0.5)  # the file's values and names win
    minipissa.load(resumed, tmp_path / "a.safetensors", optimizer=opt2)
    group = opt2.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and torch.equal(group["lr"], torch.tensor(1e-2))
    assert type(group["betas"]) is tuple and all(isinstance(b, torch.Tensor) for b in group["betas"])
    assert torch.equal(torch.stack(group["betas"]), torch.tensor([0.8, 0.95]))
    steps(resumed, opt2, 2, seed=1)
    for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_the_optimizer_s_kind_of_value_is_kept_and_the_file_s_value_taken(tmp_path: Path) -> None:
    """A tensor lr saved, a float lr in the resumed optimizer (or the reverse): the value of the file, the kind of the
    optimizer."""
    model = minipissa.apply(mlp(), 4, ["layers.0"])
    minipissa.save(model, tmp_path / "t.safetensors", optimizer=tensor_adamw(trainable(model)))
    floats = torch.optim.AdamW(trainable(model), lr=0.5, betas=(0.1, 0.2), foreach=False)
    minipissa.load(model, tmp_path / "t.safetensors", optimizer=floats)
    group = floats.param_groups[0]
    assert group["lr"] == torch.tensor(1e-2).item() and type(group["lr"]) is float
    assert group["betas"] == (torch.tensor(0.8).item(), torch.tensor(0.95).item())

    minipissa.save(model, tmp_path / "f.safetensors", optimizer=torch.optim.AdamW(trainable(model), lr=0.25))
    tensors = tensor_adamw(trainable(model))
    minipissa.load(model, tmp_path / "f.safetensors", optimizer=tensors)
    group = tensors.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].dtype == torch.float32
    assert torch.equal(group["lr"], torch.tensor(0.25)) and torch.equal(group["betas"][0], torch.tensor(0.9))
    wide = torch.optim.SGD(trainable(model), lr=torch.tensor(0.5, dtype=torch.float64))
    minipissa.save(model, tmp_path / "s.safetensors", optimizer=torch.optim.SGD(trainable(model), lr=torch.tensor(0.1)))
    minipissa.load(model, tmp_path / "s.safetensors", optimizer=wide)  # a float32 tensor lr into a float64 one
    assert wide.param_groups[0]["lr"].dtype == torch.float64
    assert torch.equal(wide.param_groups[0]["lr"], torch.tensor(0.1).double())


def test_tuples_stay_tuples_and_lists_lists(tmp_path: Path) -> None:
    model = minipissa.apply(mlp(), 4, ["layers.0"])
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    opt.param_groups[0].update(schedule=[1, 2.5, None], pair=(0.5, "x"), lrs=[torch.tensor(0.1, dtype=torch.float64)])
    minipissa.save(model, tmp_path / "a.safetensors", optimizer=opt)
    opt2 = torch.optim.SGD(trainable(model), lr=0.3)
    opt2.param_groups[0].update(schedule=[0, 0.0, None], pair=(1.0, "y"))  # the file's values, in the file's containers
    minipissa.load(model, tmp_path / "a.safetensors", optimizer=opt2)
    group = opt2.param_groups[0]
    assert group["schedule"] == [1, 2.5, None] and type(group["schedule"]) is list
    assert group["pair"] == (0.5, "x") and type(group["pair"]) is tuple
    assert type(group["lrs"]) is list and group["lrs"][0].dtype == torch.float64
    assert torch.equal(group["lrs"][0], torch.tensor(0.1, dtype=torch.float64))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda group: group.update(hook=print),
            "param group 0's hyperparameter 'hook' holds <built-in function print>",
        ),
        (lambda group: group.update(clip=float("inf")), "param group 0's hyperparameter 'clip' holds inf"),
        (lambda group: group.update(nested=[(1, 2)]), r"param group 0's hyperparameter 'nested' holds \(1, 2\)"),
        (lambda group: group.update({3: 1.0}), "param group 0 has a hyperparameter named 3"),
    ],
)
def test_what_the_file_cannot_hold_is_refused_by_save(tmp_path: Path, edit: Callable[[dict], None], match: str) -> None:
    model = minipissa.apply(mlp(), 4, ["layers.0"])
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    edit(opt.param_groups[0])
    with pytest.raises(StateError, match=f"minipissa.save\\(optimizer=\\): {match}"):
        minipissa.save(model, tmp_path / "a.safetensors", optimizer=opt)
    assert not (tmp_path / "a.safetensors").exists()


def _set(place: Any) -> Callable[[dict, dict], None]:
    return lambda info, tensors: info["optimizer"]["param_groups"][0].__setitem__("tensors", place)


def _lr(value: torch.Tensor) -> Callable[[dict, dict], None]:
    return lambda info, tensors: tensors.__setitem__("optimizer:param_groups:0:0", value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set([["lr", 0]]), "param group's tensors is malformed"),  # lr is no list
        (_set([["eps"]]), "param group's tensors is malformed"),  # eps is a number, not a tensor's place
        (_set([["lr"], ["lr"]]), "param group's tensors is malformed"),
        (_set("lr"), "param group's tensors is malformed"),
        (lambda info, tensors: tensors.pop("optimizer:param_groups:0:0"), "tensor of param group 0's 'lr' is missing"),
        (_lr(torch.tensor(float("nan"))), "'optimizer:param_groups:0:0' holds NaN or infinite values"),
        (_lr(torch.ones(2)), r"param group 0's \['lr'\] do not fit the optimizer's"),
        (lambda info, tensors: tensors.__setitem__("optimizer:param_groups:0:9", torch.ones(())), "no parameter"),
    ],
)
def test_crafted_tensor_hyperparameters_are_refused(tmp_path: Path, edit: Callable[[dict, dict], None], match: str):
    model = minipissa.apply(mlp(), 4, ["layers.0"])
    opt = tensor_adamw(trainable(model))
    steps(model, opt, 1, seed=0)
    minipissa.save(model, tmp_path / "good.safetensors", optimizer=opt)
    payload, tensors = editable(tmp_path / "good.safetensors")
    edit(payload, tensors)
    safefile.write(tmp_path / "bad.safetensors", tensors, "adapter", payload)
    resumed = tensor_adamw(trainable(model), lr=0.5)
    before = resumed.state_dict()
    with pytest.raises(StateError, match=match):
        minipissa.load(model, tmp_path / "bad.safetensors", optimizer=resumed)
    after = resumed.state_dict()
    assert after["state"] == before["state"] == {} and torch.equal(after["param_groups"][0]["lr"], torch.tensor(0.5))
