"""minipissa under torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2 training, sharded init.

Each test spawns 2 workers; they write what they measured to ``tmp_path`` and the test process compares
it with a single-process run on the same data. Models are float64, so the only difference between a
distributed and a single-process run is the order of floating-point sums (see ``LOSS_RTOL``).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_harness import (
    APPLY,
    LAYOUTS_APPLY,
    LOSS_RTOL,
    LR,
    STEPS,
    WORLD,
    cpu_mesh,
    data,
    distribute,
    error_of,
    layers_of,
    layouts_net,
    make_net,
    momentum_sgd,
    my_half,
    reference,
    save_all,
    shard_blocks,
    spawn,
    train,
)  # fmt: skip
from torch import Tensor, nn

import minipissa
from minipissa.core.dtensor import is_dtensor
from minipissa.core.weights import residual_weight, weight_matrix
from minipissa.plan.config import InitConfig
from minipissa.plan.factors import initial_factors
from minipissa.plan.settings import Settings
from minipissa.plan.sharded.factors import assign_owners
from minipissa.plan.tree import Plan, unwrap

LORA_APPLY = dict(LAYOUTS_APPLY, init="lora")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch built without gloo"
)


# ---- workers (module level: spawn pickles them by name) --------------------------------------------


def ddp_worker(rank: int, out: Path) -> None:
    model = minipissa.apply(make_net(), **APPLY)
    ddp = nn.parallel.DistributedDataParallel(model)
    losses = train(ddp, *my_half(rank), world=WORLD)
    torch.save({"losses": losses}, out / f"rank{rank}.pt")


def fsdp_worker(rank: int, out: Path) -> None:
    """apply() first, then fully_shard: A and B are sharded like any parameter."""
    model = minipissa.apply(make_net(), **APPLY)
    shard_blocks(model, cpu_mesh())
    a = model.blocks[0].lin_a.A
    sharded = is_dtensor(a) and tuple(a.to_local().shape) == (2, 15)
    losses = train(model, *my_half(rank), world=WORLD)
    torch.save({"losses": losses, "A_sharded": sharded}, out / f"rank{rank}.pt")


QPISSA_APPLY = dict(APPLY, quantize="nf4")


def qpissa_fsdp_worker(rank: int, out: Path, streamed: bool = False) -> None:
    """QPiSSA, then fully_shard: the 4-bit codes are buffers, so every rank holds them whole (FSDP2 shards
    parameters: A and B); every rank trains on the whole batch, then saves. ``streamed``: the init streamed onto
    the device (apply(device=...)), which must leave the same model for FSDP2."""
    model = minipissa.apply(make_net().float(), **QPISSA_APPLY, **({"device": "cpu"} if streamed else {}))
    shard_blocks(model, cpu_mesh())
    codes = model.blocks[0].lin_a.weight.codes
    x, y = data()
    losses = train(model, x.float(), y.float(), world=WORLD)
    minipissa.save(model, out / "qpissa_fsdp.safetensors")
    torch.save({"losses": losses, "codes_whole": not is_dtensor(codes)}, out / f"rank{rank}.pt")


def sharded_init_worker(rank: int, out: Path) -> None:
    """fully_shard first, then apply(): each weight decomposed on one rank; then train."""
    import minipissa.plan.sharded.factors

    decomposed = []  # the matrices this rank decomposes
    original = minipissa.plan.sharded.factors.initial_factors

    def counted(weight: Tensor, plan: Plan, cfg: InitConfig) -> Any:
        decomposed.append(plan.name)
        return original(weight, plan, cfg)

    minipissa.plan.sharded.factors.initial_factors = counted  # type: ignore[assignment]
    model = make_net()
    shard_blocks(model, cpu_mesh())
    weights_sharded = is_dtensor(model.blocks[0].lin_a.weight)
    minipissa.apply(model, **APPLY)
    layers = layers_of(model)
    a = model.blocks[0].lin_a.A
    sharded = weights_sharded and is_dtensor(a) and tuple(a.to_local().shape) == (2, 15)
    losses = train(model, *my_half(rank), world=WORLD)
    result = {"layers": layers, "losses": losses, "A_sharded": sharded, "decomposed": decomposed}
    torch.save(result, out / f"rank{rank}.pt")


def dtensor_worker(rank: int, out: Path) -> None:
    """apply() on hand-made DTensor weights (no FSDP2), randomized SVD; and the named errors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard

    mesh = cpu_mesh()
    model = layouts_net()
    distribute(model, mesh, {"conv": Shard(0), "cols": Shard(1), "repl": Replicate()})
    minipissa.apply(model, **LAYOUTS_APPLY)
    result: dict[str, Any] = {"layers": layers_of(model)}
    lora = layouts_net()
    distribute(lora, mesh, {"conv": Shard(0), "cols": Shard(1), "repl": Replicate()})
    result["lora"] = layers_of(minipissa.apply(lora, **LORA_APPLY))

    flat = layouts_net()
    distribute(flat, init_device_mesh("cpu", (WORLD, 1)), {"cols": (Shard(0), Replicate())})
    result["mesh2d"] = error_of(lambda: minipissa.apply(flat, **LAYOUTS_APPLY))
    result["mesh2d_untouched"] = not list(minipissa.pissa_layers(flat))

    quantized = layouts_net().float()  # quantize="nf4" takes float32 weights
    distribute(quantized, mesh, {"conv": Shard(0)})
    result["quantize"] = error_of(lambda: minipissa.apply(quantized, 3, ["conv"], quantize="nf4"))
    result["quantize_untouched"] = not list(minipissa.pissa_layers(quantized))

    itself = make_net()
    fully_shard(itself.blocks[0].lin_a, mesh=mesh)
    shard_blocks(itself, mesh)
    result["target_sharded"] = error_of(lambda: minipissa.apply(itself, **APPLY))

    ran = make_net()
    shard_blocks(ran, mesh)
    ran(torch.zeros(1, 15, dtype=torch.float64))
    result["after_forward"] = error_of(lambda: minipissa.apply(ran, **APPLY))

    minipissa.save(minipissa.apply(make_net(), **APPLY), out / "adapter.safetensors")  # plain: every rank writes
    trained = minipissa.apply(make_net(), **APPLY)
    shard_blocks(trained, mesh)
    result["merge"] = error_of(lambda: minipissa.merge(trained))
    result["unload"] = error_of(lambda: minipissa.unload(trained))
    result["load"] = error_of(lambda: minipissa.load(ran, out / "adapter.safetensors"))
    torch.save(result, out / f"rank{rank}.pt")


def save_worker(rank: int, out: Path) -> None:
    """Every rank trains on the whole batch, so FSDP2's averaged gradients are bit-identical to one
    process ((g + g) / 2 = g exactly) and so must the saved files be. Then the sharded-init flow saves
    (split data: equal to rounding only)."""
    import minipissa.interop.peft_export
    import minipissa.io.safefile

    writes = []  # the files this rank writes
    write_file, write_dir = minipissa.io.safefile.atomic_write, minipissa.interop.peft_export.atomic_write_dir

    def counted_file(path: Any, write: Any) -> None:
        writes.append(Path(path).name)
        write_file(path, write)

    def counted_dir(path: Any, files: Any) -> None:
        writes.extend(files)
        write_dir(path, files)

    minipissa.io.safefile.atomic_write = counted_file  # type: ignore[assignment]
    minipissa.interop.peft_export.atomic_write_dir = counted_dir  # type: ignore[assignment]
    model = minipissa.apply(make_net(), **APPLY)
    shard_blocks(model, cpu_mesh())
    opt = momentum_sgd(model)
    train(model, *data(), world=WORLD, opt=opt)
    save_all(model, opt, out, "fsdp")  # collective: every rank calls, rank 0 writes, all wait
    # Every rank may read the file as soon as save() returns.
    result: dict[str, Any] = {"readable": (out / "fsdp.safetensors").is_file(), "writes": writes}
    # fully_shard changes the class in place and adds no name: every name is the bare model's (files: the test).
    result["bare"] = unwrap(model, "save") is model
    names = [n for n, _ in minipissa.pissa_layers(model)]
    result["names"] = [names, [m.name for m in minipissa.summary(model).modules]]
    # Rank 0 fails to write (no such directory): every rank raises, none hangs.
    result["failure"] = error_of(lambda: minipissa.save(model, out / "missing" / "x.safetensors"))

    sharded_first = make_net()
    shard_blocks(sharded_first, cpu_mesh())
    minipissa.apply(sharded_first, **APPLY)
    train(sharded_first, *my_half(rank), world=WORLD)
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


@pytest.mark.parametrize("streamed", [False, True], ids=["in place", "streamed"])
def test_qpissa_under_fsdp2_trains_and_saves_as_one_process(tmp_path: Path, streamed: bool) -> None:
    """apply(quantize="nf4") then fully_shard: the same losses and the same adapter file as one process (every
    rank on the whole batch, so the averaged gradients are exact); sharded init refuses it (test below). The
    streamed init (device=) gives the same model, so FSDP2 trains it alike."""
    single = minipissa.apply(make_net().float(), **QPISSA_APPLY)
    x, y = data()
    expected = train(single, x.float(), y.float())
    minipissa.save(single, tmp_path / "single.safetensors")
    for result in spawn(functools.partial(qpissa_fsdp_worker, streamed=streamed), tmp_path):
        assert result["codes_whole"]
        assert result["losses"] == expected
    assert_same_file(tmp_path / "qpissa_fsdp.safetensors", tmp_path / "single.safetensors")


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
        cfg = InitConfig(**{k: v for k, v in kwargs.items() if k != "targets"})
        plan = Plan(
            name, fresh.get_submodule(name), Settings(layer.rank, layer.alpha, layer.rslora, layer.fan_in_fan_out)
        )
        a0, b0, sigma = initial_factors(weight, plan, cfg)
        residual = residual_weight(weight, a0, b0, layer.scaling, layer.fan_in_fan_out)
        for key, expected in dict(A0=a0, B0=b0, A=a0, B=b0, weight=residual).items():
            assert torch.equal(got[key], expected), (name, key)
        assert torch.equal(got["bias"], fresh.get_submodule(name).bias), name
        assert info["singular_values"] == sigma.tolist(), name

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
    results = spawn(sharded_init_worker, tmp_path)
    # Each matrix decomposed once, on one rank; the ranks share the work (2 of the 4 matrices each).
    mine = [set(result["decomposed"]) for result in results]
    assert sorted(results[0]["decomposed"] + results[1]["decomposed"]) == sorted(results[0]["layers"])
    assert [len(m) for m in mine] == [2, 2]
    for result in results:
        assert result["A_sharded"]
        assert_same_init(result["layers"], make_net(), APPLY)
        assert_trajectory(result["losses"], expected)


def test_assign_owners_balances_cost() -> None:
    owners = assign_owners([5.0, 1.0, 4.0, 3.0, 3.0], 2)
    loads = [sum(c for c, o in zip([5.0, 1.0, 4.0, 3.0, 3.0], owners, strict=True) if o == r) for r in (0, 1)]
    assert sorted(loads) == [8.0, 8.0]
    assert assign_owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]


def test_sharded_init_layouts_and_errors(tmp_path: Path) -> None:
    """Shard(0) of a Conv1D, Shard(1), Replicate, randomized SVD: same factors and residual as one process;
    unsupported layouts and FSDP2 misuse give named errors before anything changes."""
    for result in spawn(dtensor_worker, tmp_path):
        assert set(result["layers"]) == {"conv", "cols", "repl", "plain"}
        assert_same_init(result["layers"], layouts_net(), LAYOUTS_APPLY)
        single = minipissa.apply(layouts_net(), **LORA_APPLY)  # init="lora": the base stays, B0 = 0
        for name, layer in minipissa.pissa_layers(single):
            assert result["lora"][name]["info"] == layer.info
            for key, tensor in result["lora"][name]["tensors"].items():
                assert torch.equal(tensor, getattr(layer, key)), (name, key)
        kind, message = result["mesh2d"]
        assert kind == "NotImplementedError" and "'cols'" in message and "2-D mesh" in message, message
        assert result["mesh2d_untouched"]
        kind, message = result["quantize"]
        assert kind == "ValueError" and "quantize='nf4' on FSDP2-sharded weights" in message, message
        assert result["quantize_untouched"]
        kind, message = result["target_sharded"]
        assert kind == "ValueError" and "'blocks.0.lin_a'" in message
        kind, message = result["after_forward"]
        assert kind == "RuntimeError" and "before the first forward" in message
        for what in ("merge", "unload", "load"):
            kind, message = result[what]
            assert kind == "NotImplementedError" and f"minipissa.{what}: the model is sharded" in message


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
        ["fsdp.safetensors", "adapter_model.safetensors", "adapter_config.json", "README.md",
         "fsdp_residual.safetensors", "x.safetensors", "sharded_init.safetensors"]
    )  # fmt: skip
    assert results[1]["writes"] == []
    assert results[0]["failure"][0] == "StateError"
    assert results[1]["failure"][0] == "RuntimeError" and "StateError" in results[1]["failure"][1]
    names = [n for n, _ in minipissa.pissa_layers(single)]
    for result in results:
        assert result["readable"] and result["bare"] and result["names"] == [names, names]
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


def test_distributed_check_script_runs_tiny(tmp_path: Path) -> None:
    """benchmarks/distributed_check.py (the multi-GPU check) in its CPU/gloo smoke configuration, so that
    it cannot rot between GPU runs: FSDP2 sharded init, FSDP2 and DDP training, the file loads in one
    process and reproduces the distributed logits."""
    pytest.importorskip("transformers")
    import json
    import subprocess
    import sys

    script = Path(__file__).parents[2] / "benchmarks" / "distributed_check.py"
    cmd = [sys.executable, "-W", "ignore", str(script), "--tiny", "--ranks", "2", "--ddp", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    run = results["runs"][0]
    assert run["world"] == 2 and len(run["fsdp"]["losses"]) == len(run["ddp"]["losses"]) == 5
    assert results["checks"]["factor_tensors"] == 2 * 7 * 2  # A0 and B0 of 7 projections x 2 layers
    # The same weights, factors and A/B in one process; fp32, so at most the rounding of differently
    # ordered sums (~sqrt(96) * eps32 per layer, 1e-6) may differ: measured 0.0.
    assert results["checks"]["loaded_logits_rel_diff"] < 1e-5


def test_fsdp2_internals_of_each_tested_torch_layout_and_a_named_error_for_others() -> None:
    """FSDP2 keeps its parameter groups as a list (torch 2.13) or as one optional group (torch 2.11); any other
    layout is refused with what to do instead, before anything changes."""
    from types import SimpleNamespace

    from minipissa.plan.sharded.fsdp import _param_groups

    group = object()
    assert _param_groups(SimpleNamespace(_fsdp_param_groups=[group])) == [group]  # 2.13
    assert _param_groups(SimpleNamespace(_fsdp_param_group=group)) == [group]  # 2.11
    assert _param_groups(SimpleNamespace(_fsdp_param_group=None)) == []  # 2.11, a module without parameters
    with pytest.raises(NotImplementedError, match="apply before fully_shard"):
        _param_groups(SimpleNamespace(_groups={}))
