"""Multi-GPU check of minipissa under torch.distributed: sharded init time against the number of ranks,
FSDP2 and DDP training, and the saved adapter loading in one process.

For each world size N in --ranks, N processes (one GPU each, NCCL):
1. build a Llama-2-7B-shaped model (random bf16 weights, the same for every N) on the meta device,
   ``fully_shard`` each decoder layer and the root, materialise only each rank's shards;
2. ``minipissa.apply`` on the sharded model (all 7 projections x 32 layers, r = 16, niter 4): each
   weight is gathered to one owner rank, decomposed there, the residual scattered back; time and peak
   memory per rank are recorded;
3. a few FSDP2 training steps (AdamW, lr 2e-5), then ``minipissa.save`` (rank 0 writes) and the logits of
   a fixed batch;
4. (--ddp) the same with DDP: every rank holds the whole model and runs apply() itself.
Then, in this process: the adapter files of all N have the same A0/B0 (same seed), and the file of the
largest N loads onto the whole model in one process and reproduces the distributed logits.

    python benchmarks/distributed_check.py --ranks 1 2 4 8 --ddp     # GPUs (NCCL), 7B shape
    python benchmarks/distributed_check.py --tiny --ranks 1 2        # CPU (gloo), tiny: a smoke test

Needs transformers (``pip install -e .[bench]``). Results: a table on stdout and --out/results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import minipissa
from minipissa.core.dtensor import is_dtensor
from minipissa.plan.sharded.shards import chunk_sizes

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config(tiny: bool) -> Any:
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)  # fmt: skip
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip


def full_weight(name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The whole parameter ``name``, the same on every rank and for every N (seeded by its name)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little")
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device) * 0.02


def build(args: argparse.Namespace, device: torch.device, mesh: Any | None) -> nn.Module:
    """The Llama-shaped model in bf16 (fp32 when tiny); sharded with fully_shard when ``mesh`` is given,
    materialising only this rank's shards (the model never exists whole on a rank)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = config(args.tiny)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(args.dtype)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(device)  # buffers to_empty left empty
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = full_weight(name, param.shape, device).to(param.dtype)
            if is_dtensor(param):  # Shard(0): take this rank's rows
                sizes = chunk_sizes(param.shape[0], dist.get_world_size())
                start = sum(sizes[: dist.get_rank()])
                param.to_local().copy_(full[start : start + sizes[dist.get_rank()]])
            else:
                param.copy_(full)
    return model


def batch(args: argparse.Namespace, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config(args.tiny).vocab_size, (args.batch, args.seq), generator=generator).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def train(args: argparse.Namespace, model: nn.Module, device: torch.device) -> dict[str, Any]:
    """AdamW steps on each rank's own batch; loss (mean over ranks) and median step time after 2 warm-ups."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)
    losses, times = [], []
    for step in range(args.steps):
        sync(device)
        start = time.perf_counter()
        ids = batch(args, device, seed=1000 * step + dist.get_rank())
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        mean = loss.detach().float()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    return {"losses": losses, "step_s": sorted(times[2:] or times)[len(times[2:] or times) // 2]}


def worker(rank: int, args: argparse.Namespace, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=world, device_id=device if cuda else None)
    from torch.distributed.device_mesh import init_device_mesh

    out = Path(args.out) / f"n{world}"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"world": world}
    try:
        model = build(args, device, init_device_mesh(device.type, (world,)))
        sync(device)
        before = torch.cuda.memory_allocated(device) if cuda else 0  # in use now (not the build's peak)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        minipissa.apply(model, rank=args.rank, targets=PROJECTIONS, niter=args.niter, seed=0)
        sync(device)
        result["init_s"] = time.perf_counter() - start
        result["init_peak_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if cuda else None
        result["fsdp"] = train(args, model, device)
        minipissa.save(model, out / "adapter.safetensors")  # every rank calls; rank 0 writes
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch(args, device, seed=7)).logits.float().cpu()
        if rank == 0:
            save_file({"logits": logits}, out / "logits.safetensors")
        del model
        if args.ddp:
            if cuda:
                torch.cuda.empty_cache()
            whole = build(args, device, None)
            start = time.perf_counter()
            minipissa.apply(whole, rank=args.rank, targets=PROJECTIONS, niter=args.niter, seed=0)
            result["ddp_init_s"] = time.perf_counter() - start
            ddp = nn.parallel.DistributedDataParallel(whole, device_ids=[rank] if cuda else None)
            result["ddp"] = train(args, ddp, device)
        if rank == 0:
            (out / "result.json").write_text(json.dumps(result, indent=1))
        dist.barrier()  # no rank leaves while another still uses the group
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing gloo down: its teardown aborted the process (SIGABRT) in ~1 run in 10 on CPU,
    # after every rank had passed the final barrier.
    sys.stdout.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_files(args: argparse.Namespace, worlds: list[int]) -> dict[str, Any]:
    """A0/B0 equal across N; the largest N's file loads onto the whole model in this process."""
    files = {n: load_file(Path(args.out) / f"n{n}" / "adapter.safetensors") for n in worlds}
    first = files[worlds[0]]
    factor_keys = [k for k in first if k.endswith((".A0", ".B0"))]
    diff = max((files[n][k].float() - first[k].float()).abs().max().item() for n in worlds for k in factor_keys)
    device = torch.device("cuda", 0) if args.backend == "nccl" else torch.device("cpu")
    whole = build(args, device, None)
    minipissa.load(whole, Path(args.out) / f"n{worlds[-1]}" / "adapter.safetensors")
    whole.eval()
    with torch.no_grad():
        logits = whole(input_ids=batch(args, device, seed=7)).logits.float().cpu()
    expected = load_file(Path(args.out) / f"n{worlds[-1]}" / "logits.safetensors")["logits"]
    rel = ((logits - expected).norm() / expected.norm()).item()
    return {"factor_max_abs_diff_across_N": diff, "loaded_logits_rel_diff": rel, "factor_tensors": len(factor_keys)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8], help="world sizes to run")
    parser.add_argument("--tiny", action="store_true", help="tiny Llama, fp32, CPU/gloo: a smoke test")
    parser.add_argument("--backend", choices=["nccl", "gloo"], help="default: nccl, gloo with --tiny")
    parser.add_argument("--ddp", action="store_true", help="also train with DDP (each rank holds the whole model)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--niter", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--out", default="distributed_check_out")
    args = parser.parse_args()
    args.backend = args.backend or ("gloo" if args.tiny else "nccl")
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        args.seq, args.rank = min(args.seq, 16), min(args.rank, 4)
    if args.backend == "nccl" and torch.cuda.device_count() < max(args.ranks):
        raise SystemExit(f"--ranks {max(args.ranks)} needs as many GPUs; found {torch.cuda.device_count()}")
    results = []
    for world in args.ranks:
        mp.spawn(worker, args=(args, world, free_port()), nprocs=world, join=True)
        results.append(json.loads((Path(args.out) / f"n{world}" / "result.json").read_text()))
    print(f"{'ranks':>5} {'init s':>8} {'init peak GiB':>13} {'fsdp step s':>11} {'ddp step s':>10}  fsdp losses")
    for r in results:
        peak = "-" if r["init_peak_gib"] is None else f"{r['init_peak_gib']:.2f}"
        ddp = f"{r['ddp']['step_s']:.3f}" if "ddp" in r else "-"
        losses = " ".join(f"{x:.4f}" for x in r["fsdp"]["losses"])
        print(f"{r['world']:>5} {r['init_s']:>8.2f} {peak:>13} {r['fsdp']['step_s']:>11.3f} {ddp:>10}  {losses}")
    checks = check_files(args, args.ranks)
    print(json.dumps(checks, indent=1))
    (Path(args.out) / "results.json").write_text(json.dumps({"runs": results, "checks": checks}, indent=1))


if __name__ == "__main__":
    main()
