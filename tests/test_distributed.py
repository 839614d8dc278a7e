"""minipissa under torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2 training, sharded init.

Each test spawns 2 workers; they write what they measured to ``tmp_path`` and the test process compares
it with a single-process run on the same data. Models are float64, so the only difference between a
distributed and a single-process run is the order of floating-point sums (see ``LOSS_RTOL``).
"""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import minipissa
from minipissa import distributed

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without gloo"
)

WORLD = 2
STEPS = 6
LR = 0.05
TARGETS = ["lin_a", "lin_b"]
# Loss tolerance. Distributed and single-process runs differ only in summation order: the gradient is
# a sum over the 8 samples (DDP/FSDP2 sum two halves of 4, then all-reduce), each term itself a sum of
# <= 23 products, so each step's gradient moves by <= ~32 * eps64 = 7e-15 relative. Over STEPS small
# SGD steps on this smooth loss this stays ~1e-13 (measured: 2.6e-16). 1e-11 keeps a 100x margin and is
# still 8 orders of magnitude below what a real bug does (a rank training on the wrong half, gradients
# summed instead of averaged: the loss moves by > 1e-4 after one step; see test_tolerance_detects_bugs).
LOSS_RTOL = 1e-11


class Block(nn.Module):
    """x + lin_b(tanh(lin_a(x))): odd sizes, so shards are uneven (23 rows -> 12 + 11)."""

    def __init__(self, width: int = 15, inner: int = 23) -> None:
        super().__init__()
        self.lin_a = nn.Linear(width, inner)
        self.lin_b = nn.Linear(inner, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.lin_b(torch.tanh(self.lin_a(x)))


class Net(nn.Module):
    def __init__(self, blocks: int = 2, width: int = 15) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def data(batch: int = 8) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, batch, 15, generator=g, dtype=torch.float64), torch.randn(
        STEPS, batch, 3, generator=g, dtype=torch.float64
    )


APPLY = dict(rank=4, targets=TARGETS, alpha=8.0, seed=3)


def train(model: nn.Module, x: Tensor, y: Tensor, world: int = 1, lr: float = LR) -> list[float]:
    """SGD on each step's batch (this rank's share of it); the loss returned is the whole batch's mean."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    losses = []
    for step in range(STEPS):
        loss = nn.functional.mse_loss(model(x[step]), y[step])
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    return losses


def reference(apply: dict[str, Any] | None = None) -> tuple[Net, list[float]]:
    model = minipissa.apply(make_net(), **(apply or APPLY))
    trained = copy.deepcopy(model)
    return model, train(trained, *data())


# ---- spawning ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., None], port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 workers on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, out)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], out: Path) -> list[dict[str, Any]]:
    """Run ``fn(rank, out)`` in WORLD gloo processes; return what each saved to out/rank{r}.pt."""
    mp.spawn(_entry, args=(fn, _free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def _shard_blocks(model: Net, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _my_half(rank: int) -> tuple[Tensor, Tensor]:
    x, y = data()
    return x.chunk(WORLD, dim=1)[rank], y.chunk(WORLD, dim=1)[rank]


def _layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every PiSSA layer's tensors, whole (collective for DTensors), and info."""
    out = {}
    for name, layer in minipissa.pissa_layers(model):
        tensors = {k: distributed.full_tensor(getattr(layer, k)).detach().clone() for k in ("weight", "bias")}
        tensors |= {k: distributed.full_tensor(getattr(layer, k)).detach().clone() for k in ("A", "B", "A0", "B0")}
        out[name] = {"tensors": tensors, "info": layer.info}
    return out


# ---- workers (module level: spawn pickles them by name) --------------------------------------------


def ddp_worker(rank: int, out: Path) -> None:
    model = minipissa.apply(make_net(), **APPLY)
    ddp = nn.parallel.DistributedDataParallel(model)
    losses = train(ddp, *_my_half(rank), world=WORLD)
    torch.save({"losses": losses}, out / f"rank{rank}.pt")


def fsdp_worker(rank: int, out: Path) -> None:
    """apply() first, then fully_shard: A and B are sharded like any parameter."""
    model = minipissa.apply(make_net(), **APPLY)
    _shard_blocks(model, _mesh())
    a = model.blocks[0].lin_a.A
    sharded = distributed.is_dtensor(a) and tuple(a.to_local().shape) == (2, 15)
    losses = train(model, *_my_half(rank), world=WORLD)
    torch.save({"losses": losses, "A_sharded": sharded}, out / f"rank{rank}.pt")


def sharded_init_worker(rank: int, out: Path) -> None:
    """fully_shard first, then apply(): each weight decomposed on one rank; then train."""
    model = make_net()
    _shard_blocks(model, _mesh())
    minipissa.apply(model, **APPLY)
    layers = _layers(model)
    a = model.blocks[0].lin_a.A
    sharded = distributed.is_dtensor(a) and tuple(a.to_local().shape) == (2, 15)
    losses = train(model, *_my_half(rank), world=WORLD)
    torch.save({"layers": layers, "losses": losses, "A_sharded": sharded}, out / f"rank{rank}.pt")


class Conv1D(nn.Module):
    """transformers-style Conv1D (weight stored (in, out)), detected by minipissa by its structure."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(nf, dtype=torch.float64))


def layouts_net() -> nn.Module:
    """One target per DTensor layout: Shard(0) of a Conv1D, Shard(1), Replicate (23 and 15: uneven), and a
    plain weight."""
    torch.manual_seed(5)
    return nn.ModuleDict(
        {
            "conv": Conv1D(23, 15),
            "cols": nn.Linear(15, 23).double(),
            "repl": nn.Linear(23, 15).double(),
            "plain": nn.Linear(15, 15).double(),  # not distributed: apply() handles it as in one process
        }
    )


LAYOUTS_APPLY = dict(rank=3, targets=["conv", "cols", "repl", "plain"], niter=2, oversample=2, seed=11)


def _distribute(model: nn.Module, mesh: Any, placements: dict[str, Any]) -> None:
    from torch.distributed.tensor import distribute_tensor

    for name, placement in placements.items():
        module = model.get_submodule(name)
        placements_ = list(placement) if isinstance(placement, tuple) else [placement]
        module.weight = nn.Parameter(distribute_tensor(module.weight.detach(), mesh, placements_))


def _error(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test process checks type and message
        return type(e).__name__, str(e)
    return "none", ""


def dtensor_worker(rank: int, out: Path) -> None:
    """apply() on hand-made DTensor weights (no FSDP2), randomized SVD; and the named errors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard

    mesh = _mesh()
    model = layouts_net()
    _distribute(model, mesh, {"conv": Shard(0), "cols": Shard(1), "repl": Replicate()})
    minipissa.apply(model, **LAYOUTS_APPLY)
    result: dict[str, Any] = {"layers": _layers(model)}

    flat = layouts_net()
    _distribute(flat, init_device_mesh("cpu", (WORLD, 1)), {"cols": (Shard(0), Replicate())})
    result["mesh2d"] = _error(lambda: minipissa.apply(flat, **LAYOUTS_APPLY))
    result["mesh2d_untouched"] = not list(minipissa.pissa_layers(flat))

    itself = make_net()
    fully_shard(itself.blocks[0].lin_a, mesh=mesh)
    _shard_blocks(itself, mesh)
    result["target_sharded"] = _error(lambda: minipissa.apply(itself, **APPLY))

    ran = make_net()
    _shard_blocks(ran, mesh)
    ran(torch.zeros(1, 15, dtype=torch.float64))
    result["after_forward"] = _error(lambda: minipissa.apply(ran, **APPLY))
    torch.save(result, out / f"rank{rank}.pt")


# ---- tests ---------------------------------------------------------------------------------------


def assert_trajectory(losses: list[float], expected: list[float]) -> None:
    assert len(losses) == len(expected) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=LOSS_RTOL, atol=0)


def test_tolerance_detects_bugs() -> None:
    """The trajectory check can fail: training moves the loss, and the plausible bugs (half the data,
    un-averaged gradients = doubled lr) move it far beyond LOSS_RTOL."""
    _, expected = reference()
    x, y = data()
    assert expected[-1] < expected[0] * 0.99
    one_half = train(copy.deepcopy(reference()[0]), x.chunk(2, dim=1)[0], y.chunk(2, dim=1)[0])
    doubled = train(copy.deepcopy(reference()[0]), x, y, lr=2 * LR)
    for wrong in (one_half, doubled):
        assert max(abs(a - b) / b for a, b in zip(wrong[1:], expected[1:], strict=True)) > 1e6 * LOSS_RTOL


def test_ddp_training_matches_single_process(tmp_path: Path) -> None:
    _, expected = reference()
    results = spawn(ddp_worker, tmp_path)
    for result in results:
        assert_trajectory(result["losses"], expected)


def test_fsdp2_training_matches_single_process(tmp_path: Path) -> None:
    _, expected = reference()
    results = spawn(fsdp_worker, tmp_path)
    for result in results:
        assert result["A_sharded"]
        assert_trajectory(result["losses"], expected)


def test_sharded_init_equals_single_process(tmp_path: Path) -> None:
    single, expected = reference()
    results = spawn(sharded_init_worker, tmp_path)
    for result in results:
        assert result["A_sharded"]
        layers = result["layers"]
        assert set(layers) == {name for name, _ in minipissa.pissa_layers(single)}
        for name, layer in minipissa.pissa_layers(single):
            assert layers[name]["info"] == layer.info, name
            for key, tensor in layers[name]["tensors"].items():
                assert torch.equal(tensor, getattr(layer, key)), (name, key)
        assert_trajectory(result["losses"], expected)


def test_assign_owners_balances_cost() -> None:
    owners = distributed.assign_owners([5.0, 1.0, 4.0, 3.0, 3.0], 2)
    loads = [sum(c for c, o in zip([5.0, 1.0, 4.0, 3.0, 3.0], owners, strict=True) if o == r) for r in (0, 1)]
    assert sorted(loads) == [8.0, 8.0]
    assert distributed.assign_owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]


def test_sharded_init_layouts_and_errors(tmp_path: Path) -> None:
    """Shard(0) of a Conv1D, Shard(1), Replicate, randomized SVD: same factors and residual as one process;
    unsupported layouts and FSDP2 misuse give named errors before anything changes."""
    single = minipissa.apply(layouts_net(), **LAYOUTS_APPLY)
    for result in spawn(dtensor_worker, tmp_path):
        assert set(result["layers"]) == {"conv", "cols", "repl", "plain"}
        for name, layer in minipissa.pissa_layers(single):
            assert result["layers"][name]["info"] == layer.info, name
            for key, tensor in result["layers"][name]["tensors"].items():
                assert torch.equal(tensor, getattr(layer, key)), (name, key)
        kind, message = result["mesh2d"]
        assert kind == "NotImplementedError" and "'cols'" in message and "2-D mesh" in message, message
        assert result["mesh2d_untouched"]
        kind, message = result["target_sharded"]
        assert kind == "ValueError" and "'blocks.0.lin_a'" in message
        kind, message = result["after_forward"]
        assert kind == "RuntimeError" and "before the first forward" in message
