"""Training step: frozen base vs PEFT LoRA (default fp32 adapters, and bf16 adapters) vs minipissa,
on the same weights, in one process.

A step is forward + backward (+ AdamW on the adapters, fused on CUDA). The embeddings' output
requires grad in every contender, so that the frozen base also runs a full backward (dx through
every layer). Reported: median ms/step, ratio to the frozen base's step, peak memory of the step
above the memory in use before the contender was built (its weights included).

    python benchmarks/step_bench.py --setting minilm
    python benchmarks/step_bench.py --setting llama-small
    python benchmarks/step_bench.py --setting llama-7b --device cuda --compile --out step_gpu.json
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import common
import torch
from torch import nn

import minipissa


def build(setting: str, device: str, layers: int = 32) -> tuple[nn.Module, Any, Any, tuple[int, int]]:
    """(model, minipissa targets, PEFT targets, (batch, sequence))."""
    if setting == "minilm":
        return common.minilm().to(device), common.MINILM_TARGETS, common.MINILM_PEFT_TARGETS, (8, 128)
    if setting == "llama-small":
        model = common.llama(4, 1024, 2816, 16, 4096, torch.float32, device)
        return model, common.LLAMA_TARGETS, common.LLAMA_TARGETS, (2, 256)
    return common.llama_7b(device, layers), common.LLAMA_TARGETS, common.LLAMA_TARGETS, (4, 512)


def loss_fn(model: nn.Module, ids: torch.Tensor, causal: bool) -> torch.Tensor:
    if causal:
        return model(input_ids=ids, labels=ids).loss
    return model(input_ids=ids).last_hidden_state.float().square().mean()  # an encoder: any scalar


def step_time(
    model: nn.Module, ids: torch.Tensor, causal: bool, device: str, warmup: int, steps: int, graph: bool = False
) -> dict[str, Any]:
    """Median ms per step and peak memory (GiB) above the level before the first step.

    ``graph``: capture the whole step (forward, backward, AdamW) in one CUDA graph and time its
    replays, which takes the host (Python, kernel launches) out of the step."""
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=cuda, capturable=graph) if params else None

    def eager_step() -> None:
        loss_fn(model, ids, causal).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=not graph)  # a graph keeps its gradient buffers

    step = eager_step
    if graph:  # warm up on a side stream, then capture (torch.cuda.graphs' whole-network recipe)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                eager_step()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            eager_step()
        step = captured.replay
    for _ in range(warmup):
        step()
    common.sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        common.sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    row = {"ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times), "ms_max": 1e3 * max(times)}
    row["peak_gib"] = peak
    if cuda:
        row.update(gpu_busy(step))
    return row


def gpu_busy(step: Callable[[], None]) -> dict[str, Any]:
    """Kernel time and kernel count of one step (profiler): a step much longer than its kernels
    is bound by the host (Python, launches), not by the GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    return {
        "kernel_ms": sum(e.self_device_time_total for e in events) / 1e3,
        "kernels": sum(e.count for e in events),
    }


def main() -> None:
    parser = common.arguments(__doc__)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(frozen / minipissa model)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--graph", action="store_true", help="also time whole-step CUDA graphs (frozen, minipissa)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default="", help="comma-separated label fragments: run just those contenders")
    parser.add_argument("--layers", type=int, default=32, help="llama-7b: decoder layers (fewer to compile faster)")
    parser.add_argument("--batch", type=int, default=None, help="batch size instead of the setting's")
    parser.add_argument("--qpissa", action="store_true", help="also time QPiSSA (4-bit NF4 residual), eager/compiled")
    args = parser.parse_args()
    if args.threads:  # on a shared machine, 1 thread avoids OpenMP threads spinning for a busy core
        torch.set_num_threads(args.threads)
    device, r = args.device, args.rank
    base, targets, peft_targets, (batch, seq) = build(args.setting, device, args.layers)
    batch = args.batch or batch
    base.requires_grad_(False)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    bf16 = next(base.parameters()).dtype == torch.bfloat16
    contenders: list[tuple[str, Callable[[nn.Module], nn.Module]]] = [
        ("frozen base", lambda m: m),
        ("PEFT LoRA (default: fp32 adapters)", lambda m: common.peft_lora(m, peft_targets, r, True)),
    ]
    if bf16:
        contenders.append(("PEFT LoRA bf16 adapters", lambda m: common.peft_lora(m, peft_targets, r, True, True)))
    contenders.append(("minipissa (fp32 masters)", lambda m: minipissa.apply(m, r, targets, niter=2)))
    if args.compile:
        contenders += [  # compiled against compiled: the frozen base gains from the compiler too
            ("frozen base + torch.compile", lambda m: torch.compile(m, mode=args.compile_mode)),
            (
                "minipissa + torch.compile",
                lambda m: torch.compile(minipissa.apply(m, r, targets, niter=2), mode=args.compile_mode),
            ),
        ]
    if args.qpissa:
        qpissa = {"niter": 2, "quantize": "nf4"}
        contenders.append(("minipissa QPiSSA (nf4)", lambda m: minipissa.apply(m, r, targets, **qpissa)))
        if args.compile:
            contenders.append(
                (
                    "minipissa QPiSSA (nf4) + torch.compile",
                    lambda m: torch.compile(minipissa.apply(m, r, targets, **qpissa), mode=args.compile_mode),
                )
            )
    graphed = {"frozen base, CUDA graph", "minipissa, CUDA graph"}
    if args.graph:
        contenders += [
            ("frozen base, CUDA graph", lambda m: m),
            ("minipissa, CUDA graph", lambda m: minipissa.apply(m, r, targets, niter=2)),
        ]
    if args.only:
        contenders = [(label, make) for label, make in contenders if any(k in label for k in args.only.split(","))]
    rows, errs = [], {}
    for label, make in contenders:

        def run(make: Callable[[nn.Module], nn.Module] = make, label: str = label) -> dict[str, Any]:
            before = torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None
            model = make(common.fresh(base)).train()
            row: dict[str, Any] = {"contender": label}
            graph = label in graphed
            row.update(step_time(model, ids, args.setting != "minilm", device, args.warmup, args.steps, graph))
            if before is not None:
                row["peak_gib"] -= before
            print(f"[{label}] {row}", flush=True)
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            return row

        row = common.guarded(label, run, errs)
        if row is not None:
            rows.append(row)
    by_label = {row["contender"]: row for row in rows}
    frozen = by_label.get("frozen base")
    peers = {
        "minipissa, CUDA graph": "frozen base, CUDA graph",
        "minipissa + torch.compile": "frozen base + torch.compile",
        "minipissa QPiSSA (nf4) + torch.compile": "frozen base + torch.compile",
    }
    for row in rows:
        if frozen is not None:
            row["x_frozen"] = row["ms"] / frozen["ms"]
            if row.get("peak_gib") is not None:
                row["extra_gib_vs_frozen"] = row["peak_gib"] - frozen["peak_gib"]
        peer = by_label.get(peers.get(row["contender"], ""))
        if peer is not None:  # against the frozen base run the same way (graphed / compiled)
            row["x_frozen_same_way"] = row["ms"] / peer["ms"]
    env = common.environment()
    print(f"\nstep, {args.setting}: batch {batch} x {seq}, r = {r}, AdamW, {env['device']}, torch {env['torch']}")
    columns = ["contender", "ms", "ms_min", "ms_max", "x_frozen", "x_frozen_same_way", "kernel_ms", "kernels"]
    columns.append("peak_gib")
    print(common.table(rows, columns))
    for label, message in errs.items():
        print(f"FAILED {label}: {message}")
    payload = {"setting": args.setting, "rank": r, "batch": [batch, seq], "env": env, "rows": rows, "errors": errs}
    common.save(args.out, payload)


if __name__ == "__main__":
    main()
