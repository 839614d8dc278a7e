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
from minipissa.fingerprint import fingerprint
from minipissa.layer import residual_weight, weight_matrix
from minipissa.model import initial_factors

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


def momentum_sgd(model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum: it has state (a buffer per parameter, sharded under FSDP2) for save(optimizer=)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)


def save_all(model: nn.Module, opt: torch.optim.Optimizer, out: Path, tag: str) -> None:
    minipissa.save(model, out / f"{tag}.safetensors", optimizer=opt)
    minipissa.convert_to_lora(model, out / f"{tag}_lora")
    minipissa.save_residual(model, out / f"{tag}_residual.safetensors")


def save_worker(rank: int, out: Path) -> None:
    """Every rank trains on the whole batch, so FSDP2's averaged gradients are bit-identical to one
    process ((g + g) / 2 = g exactly) and so must the saved files be. Then the sharded-init flow saves
    (split data: equal to rounding only)."""
    import minipissa.convert
    import minipissa.safefile

    writes = []
    for module in (minipissa.safefile, minipissa.convert):  # count the files this rank writes
        original = module.atomic_write

        def counted(path: Any, write: Any, original: Any = original) -> None:
            writes.append(Path(path).name)
            original(path, write)

        module.atomic_write = counted  # type: ignore[attr-defined]
    model = minipissa.apply(make_net(), **APPLY)
    _shard_blocks(model, _mesh())
    opt = momentum_sgd(model)
    train(model, *data(), world=WORLD, opt=opt)
    save_all(model, opt, out, "fsdp")  # collective: every rank calls, rank 0 writes, all wait
    # Every rank may read the file as soon as save() returns.
    result: dict[str, Any] = {"readable": (out / "fsdp.safetensors").is_file(), "writes": writes}
    # Rank 0 fails to write (no such directory): every rank raises, none hangs.
    result["failure"] = _error(lambda: minipissa.save(model, out / "missing" / "x.safetensors"))

    sharded_first = make_net()
    _shard_blocks(sharded_first, _mesh())
    minipissa.apply(sharded_first, **APPLY)
    train(sharded_first, *_my_half(rank), world=WORLD)
    minipissa.save(sharded_first, out / "sharded_init.safetensors")
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


def init_tolerance(matrix: Tensor, rank: int) -> float:
    """Max abs difference of s*B0*A0 (and so of W_res) between two float64 inits that differ only in
    rounding (apply() stacks same-shape weights into one batched decomposition, an owner rank decomposes
    one matrix, so BLAS blocks differently). Each is a backward-stable computation: an input perturbation
    of ~n*eps*|W|_2, which Wedin's theorem amplifies by |W|_2 / (sigma_r - sigma_r+1) in the principal
    subspace; x10 margin. (Measured differences: ~1e-15 here; a wrong seed or factor is O(1).)"""
    sigma = torch.linalg.svdvals(matrix)
    gap = (sigma[rank - 1] - sigma[rank]).item()
    return 10 * max(matrix.shape) * torch.finfo(matrix.dtype).eps * sigma[0].item() ** 2 / gap


def assert_same_init(layers: dict[str, dict[str, Any]], fresh: nn.Module, kwargs: dict[str, Any]) -> None:
    """A distributed init against single-process ones on the same weights.

    Bit-identical to the one-matrix path (initial_factors on the whole weight: what the owner rank
    runs), so gathering, broadcasting and scattering add nothing; against apply(), which may batch
    same-shape weights, within init_tolerance.
    """
    single = minipissa.apply(copy.deepcopy(fresh), **kwargs)
    assert set(layers) == {name for name, _ in minipissa.pissa_layers(single)}
    for name, layer in minipissa.pissa_layers(single):
        got, info = layers[name]["tensors"], layers[name]["info"]
        weight = fresh.get_submodule(name).weight.detach()
        options = {k: kwargs.get(k) for k in ("niter", "oversample")}
        a0, b0, sigma = initial_factors(
            weight, name, layer.rank, layer.scaling, fan_in_fan_out=layer.fan_in_fan_out, seed=kwargs["seed"], **options
        )
        residual = residual_weight(weight, a0, b0, layer.scaling, layer.fan_in_fan_out)
        for key, expected in dict(A0=a0, B0=b0, A=a0, B=b0, weight=residual).items():
            assert torch.equal(got[key], expected), (name, key)
        assert torch.equal(got["bias"], fresh.get_submodule(name).bias), name
        assert info["singular_values"] == sigma.tolist(), name
        assert info["residual_fingerprint"] == fingerprint(residual), name

        tol = init_tolerance(weight_matrix(weight, layer.fan_in_fan_out), layer.rank)
        part = layer.scaling * got["B0"] @ got["A0"]
        assert (part - layer.delta_weight(layer.A0, layer.B0)).abs().max().item() <= tol, name
        assert (got["weight"] - layer.weight).abs().max().item() <= tol, name
        assert (sigma - torch.tensor(layer.info["singular_values"], dtype=sigma.dtype)).abs().max().item() <= tol, name
        same = {k: v for k, v in info.items() if k not in ("singular_values", "residual_fingerprint")}
        assert same == {k: layer.info[k] for k in same} and set(info) == set(layer.info), name


def test_sharded_init_equals_single_process(tmp_path: Path) -> None:
    """FSDP2 first, then apply(): the factors, residual and info of a single-process init; then FSDP2
    training (A and B sharded) follows the single-process loss trajectory."""
    _, expected = reference()
    for result in spawn(sharded_init_worker, tmp_path):
        assert result["A_sharded"]
        assert_same_init(result["layers"], make_net(), APPLY)
        assert_trajectory(result["losses"], expected)


def test_assign_owners_balances_cost() -> None:
    owners = distributed.assign_owners([5.0, 1.0, 4.0, 3.0, 3.0], 2)
    loads = [sum(c for c, o in zip([5.0, 1.0, 4.0, 3.0, 3.0], owners, strict=True) if o == r) for r in (0, 1)]
    assert sorted(loads) == [8.0, 8.0]
    assert distributed.assign_owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]


def test_sharded_init_layouts_and_errors(tmp_path: Path) -> None:
    """Shard(0) of a Conv1D, Shard(1), Replicate, randomized SVD: same factors and residual as one process;
    unsupported layouts and FSDP2 misuse give named errors before anything changes."""
    for result in spawn(dtensor_worker, tmp_path):
        assert set(result["layers"]) == {"conv", "cols", "repl", "plain"}
        assert_same_init(result["layers"], layouts_net(), LAYOUTS_APPLY)
        kind, message = result["mesh2d"]
        assert kind == "NotImplementedError" and "'cols'" in message and "2-D mesh" in message, message
        assert result["mesh2d_untouched"]
        kind, message = result["target_sharded"]
        assert kind == "ValueError" and "'blocks.0.lin_a'" in message
        kind, message = result["after_forward"]
        assert kind == "RuntimeError" and "before the first forward" in message


def assert_same_file(path: Path, expected: Path) -> None:
    """Same metadata, keys, dtypes and tensor bytes. (Not the raw file bytes: safetensors writes the
    metadata map in hash order, which differs between processes even for one-process saves.)"""
    from safetensors import safe_open

    with safe_open(path, "pt") as got, safe_open(expected, "pt") as want:
        assert got.metadata() == want.metadata(), path.name
        keys = list(want.keys())
        assert list(got.keys()) == keys, path.name
        for key in keys:
            assert torch.equal(got.get_tensor(key), want.get_tensor(key)), (path.name, key)
            assert got.get_tensor(key).dtype == want.get_tensor(key).dtype, (path.name, key)


def test_save_after_fsdp2_training_gives_the_single_process_files(tmp_path: Path) -> None:
    """save(optimizer=), convert_to_lora and save_residual after FSDP2 training: byte for byte the files of
    one process; they load in one process and reproduce the trained model."""
    single = minipissa.apply(make_net(), **APPLY)
    opt = momentum_sgd(single)
    train(single, *data(), opt=opt)
    (tmp_path / "one").mkdir()
    save_all(single, opt, tmp_path / "one", "fsdp")
    results = spawn(save_worker, tmp_path)
    assert sorted(results[0]["writes"]) == sorted(
        ["fsdp.safetensors", "adapter_model.safetensors", "adapter_config.json", "fsdp_residual.safetensors",
         "x.safetensors", "sharded_init.safetensors"]
    )  # fmt: skip
    assert results[1]["writes"] == []
    assert results[0]["failure"][0] == "StateError"
    assert results[1]["failure"][0] == "RuntimeError" and "StateError" in results[1]["failure"][1]
    for result in results:
        assert result["readable"]
    for name in ("fsdp.safetensors", "fsdp_residual.safetensors", "fsdp_lora/adapter_model.safetensors"):
        assert_same_file(tmp_path / name, tmp_path / "one" / name)
    config = "fsdp_lora/adapter_config.json"
    assert (tmp_path / config).read_bytes() == (tmp_path / "one" / config).read_bytes()

    x = data()[0][0]
    loaded = minipissa.load(make_net(), tmp_path / "fsdp.safetensors")
    assert torch.equal(loaded(x), single(x))
    # The sharded-init flow trained on split data: the file loads, and the model follows the
    # single-process one to the loss tolerance.
    reference_model, _ = reference()
    trained = copy.deepcopy(reference_model)
    train(trained, *data())
    loaded = minipissa.load(make_net(), tmp_path / "sharded_init.safetensors")
    torch.testing.assert_close(loaded(x), trained(x), rtol=LOSS_RTOL, atol=LOSS_RTOL)
