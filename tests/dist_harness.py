"""The harness of the distributed tests: tiny float64 models, data, SGD, and spawning gloo workers.

Workers write what they measured to a directory; the test process compares it with a single-process
run. Kept apart from the tests so that test_distributed.py holds only workers and checks.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import minipissa
from minipissa.core.dtensor import full_tensor

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


def train(
    model: nn.Module, x: Tensor, y: Tensor, world: int = 1, lr: float = LR, opt: torch.optim.Optimizer | None = None
) -> list[float]:
    """SGD on each step's batch (this rank's share of it); the loss returned is the whole batch's mean."""
    opt = opt or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
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
    fn(rank, out)  # an exception ends this process with it: mp.spawn reports it
    dist.barrier()  # every rank has finished its work and written its results
    leave()


def leave() -> None:
    """End a worker that finished its work, without tearing gloo down: gloo's teardown aborted the process
    ("terminate called without an active exception", SIGABRT) in about 1 run in 10 on the 2-core CI machine,
    after every rank had passed the final barrier."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[..., None], out: Path) -> list[dict[str, Any]]:
    """Run ``fn(rank, out)`` in WORLD gloo processes; return what each saved to out/rank{r}.pt.

    The results hold only tensors, lists, dicts, strings and numbers: read with ``weights_only=True``
    (no arbitrary unpickling).
    """
    mp.spawn(_entry, args=(fn, _free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def cpu_mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def shard_blocks(model: Net, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def my_half(rank: int) -> tuple[Tensor, Tensor]:
    x, y = data()
    return x.chunk(WORLD, dim=1)[rank], y.chunk(WORLD, dim=1)[rank]


def layers_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every PiSSA layer's tensors, whole (collective for DTensors), and info."""
    out = {}
    for name, layer in minipissa.pissa_layers(model):
        tensors = {k: full_tensor(getattr(layer, k)).clone() for k in ("weight", "bias", "A", "B", "A0", "B0")}
        out[name] = {"tensors": tensors, "info": layer.info}
    return out


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


def distribute(model: nn.Module, mesh: Any, placements: dict[str, Any]) -> None:
    from torch.distributed.tensor import distribute_tensor

    for name, placement in placements.items():
        module = model.get_submodule(name)
        placements_ = list(placement) if isinstance(placement, tuple) else [placement]
        module.weight = nn.Parameter(distribute_tensor(module.weight.detach(), mesh, placements_))


def error_of(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test process checks type and message
        return type(e).__name__, str(e)
    return "none", ""


def momentum_sgd(model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum: it has state (a buffer per parameter, sharded under FSDP2) for save(optimizer=)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)


def save_all(model: nn.Module, opt: torch.optim.Optimizer, out: Path, tag: str) -> None:
    minipissa.save(model, out / f"{tag}.safetensors", optimizer=opt)
    minipissa.convert_to_lora(model, out / f"{tag}_lora")
    minipissa.save_residual(model, out / f"{tag}_residual.safetensors")
