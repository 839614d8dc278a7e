"""Training step: frozen base vs PEFT LoRA (default fp32 adapters, and bf16 adapters) vs minipissa,
on the same weights, in one process, in interleaved rounds.

A step is forward + backward (+ AdamW on the adapters, fused on CUDA). The embeddings' output
requires grad in every contender, so that the frozen base also runs a full backward (dx through
every layer). Every contender is built first (each on its own deep copy of the base); then each round
runs every contender's timed steps in turn, so that a slow spell of the host hits all of them alike.
Reported: median ms/step over all rounds with min and max, median/min (the jitter), ratio to the
frozen base's median (run the same way: eager, compiled, graphed), kernel time and count of one step
(profiler), Python garbage collections during the timed steps (count and ms per step), and peak memory
of the step above the memory in use before the contender was built (its weights included).

    python benchmarks/step_bench.py --setting minilm
    python benchmarks/step_bench.py --setting llama-small --compile
    python benchmarks/step_bench.py --setting llama-7b --device cuda --graph --out step_gpu.json
    python benchmarks/step_bench.py --setting llama-7b --layers 8 --device cuda --compile --only compile
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


class GcClock:
    """Python's garbage collections (``gc.callbacks``): how many, of which generation, and their time."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = 0.0
        self._start = 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds += time.perf_counter() - self._start

    def read(self) -> tuple[int, int, float]:
        return sum(self.count), self.count[2], self.seconds


@dataclass
class Contender:
    label: str
    step: Step
    peer: str  # the frozen base run the same way
    built_gib: float | None  # weights and optimizer state above the memory before it was built
    times: list[float] = field(default_factory=list)
    host_times: list[float] = field(default_factory=list)  # until the step returned, before waiting for the GPU
    peak_step_gib: float = 0.0
    gcs: int = 0
    gen2: int = 0
    gc_seconds: float = 0.0


class Step:
    """A warmed-up training step of ``model``; it holds the model and its optimizer, which a captured graph reads.

    ``graph``: the whole step (forward, backward, AdamW) captured in one CUDA graph and replayed
    (torch.cuda.graphs' whole-network recipe; README "A whole training step in a CUDA graph")."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, causal: bool, device: str, warmup: int, graph: bool):
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        params = [p for p in model.parameters() if p.requires_grad]
        cuda = device.startswith("cuda")
        self.model, self.ids, self.causal, self.keep_grads = model, ids, causal, graph  # a graph keeps its grads
        self.optimizer = (
            torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=cuda, capturable=graph) if params else None
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:  # warm up on a side stream, then capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.eager()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.eager()
        for _ in range(warmup):
            self()
        common.sync(device)

    def eager(self) -> None:
        loss_fn(self.model, self.ids, self.causal).backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=not self.keep_grads)

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.eager()


def gpu_busy(step: Callable[[], None], top: int = 0) -> dict[str, Any]:
    """Kernel time and kernel count of one step (profiler): a step much longer than its kernels
    is bound by the host (Python, launches), not by the GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted(
        (e for e in prof.key_averages() if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total
    )
    return {
        "kernel_ms": sum(e.self_device_time_total for e in events) / 1e3,
        "kernels": sum(e.count for e in events),
        "top_kernels": [(e.key[:90], e.count, round(e.self_device_time_total / 1e3, 3)) for e in events[:top]],
    }


def timed_round(c: Contender, steps: int, device: str, clock: GcClock) -> None:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    gcs, gen2, seconds = clock.read()
    for _ in range(steps):
        start = time.perf_counter()
        c.step()
        queued = time.perf_counter()  # the host's own time: a step whose host time nears its wall time is host-bound
        common.sync(device)
        c.times.append(time.perf_counter() - start)
        c.host_times.append(queued - start)
    after = clock.read()
    c.gcs, c.gen2, c.gc_seconds = c.gcs + after[0] - gcs, c.gen2 + after[1] - gen2, c.gc_seconds + after[2] - seconds
    if cuda:
        c.peak_step_gib = max(c.peak_step_gib, (torch.cuda.max_memory_allocated() - before) / 2**30)


def contenders_of(args: Any, r: int, targets: Any, peft_targets: Any, bf16: bool) -> list[tuple[str, str, Callable]]:
    """(label, label of its frozen peer, make(model) -> model) for the contenders the flags ask for."""
    mini: Callable[[nn.Module], nn.Module] = lambda m: minipissa.apply(m, r, targets, niter=2)  # noqa: E731
    peft_bf16: Callable[[nn.Module], nn.Module] = lambda m: common.peft_lora(m, peft_targets, r, True, True)  # noqa: E731
    rows: list[tuple[str, str, Callable]] = [
        ("frozen base", "frozen base", lambda m: m),
        ("PEFT LoRA (default: fp32 adapters)", "frozen base", lambda m: common.peft_lora(m, peft_targets, r, True)),
    ]
    if bf16:
        rows.append(("PEFT LoRA bf16 adapters", "frozen base", peft_bf16))
    rows.append(("minipissa (fp32 masters)", "frozen base", mini))
    if bf16:  # PEFT-bf16's peer in memory: no float32 masters
        mini_bf16 = lambda m: minipissa.apply(m, r, targets, niter=2, adapter_dtype=torch.bfloat16)  # noqa: E731
        rows.append(("minipissa bf16 adapters", "frozen base", mini_bf16))
    mode, compiled_peer = args.compile_mode, f"frozen base + compile ({args.compile_mode})"
    if args.compile:  # compiled against compiled: the frozen base gains from the compiler too
        peer = compiled_peer
        rows.append((peer, peer, lambda m: torch.compile(m, mode=mode)))
        if bf16:
            rows.append((f"PEFT LoRA bf16 + compile ({mode})", peer, lambda m: torch.compile(peft_bf16(m), mode=mode)))
        rows.append((f"minipissa + compile ({mode})", peer, lambda m: torch.compile(mini(m), mode=mode)))
    if args.qpissa:
        qpissa: Callable[[nn.Module], nn.Module] = lambda m: minipissa.apply(m, r, targets, niter=2, quantize="nf4")  # noqa: E731
        rows.append(("minipissa QPiSSA (nf4)", "frozen base", qpissa))
        if args.compile:
            rows.append((f"QPiSSA + compile ({mode})", compiled_peer, lambda m: torch.compile(qpissa(m), mode=mode)))
    if args.graph:
        rows += [
            ("frozen base, CUDA graph", "frozen base, CUDA graph", lambda m: m),
            ("minipissa, CUDA graph", "frozen base, CUDA graph", mini),
        ]
    if args.only:
        keep = args.only.split(",")
        rows = [row for row in rows if any(k in row[0] for k in keep) or row[0] == row[1]]
    return rows


def main() -> None:
    parser = common.arguments(__doc__)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(frozen / PEFT / minipissa)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--graph", action="store_true", help="also time whole-step CUDA graphs (frozen, minipissa)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default="", help="comma-separated label fragments: just those (and their peers)")
    parser.add_argument("--layers", type=int, default=32, help="llama-7b: decoder layers (fewer to compile faster)")
    parser.add_argument("--batch", type=int, default=None, help="batch size instead of the setting's")
    parser.add_argument("--kernels", type=int, default=0, help="list each contender's N longest kernels (time, count)")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after building, before the timing")
    parser.add_argument("--qpissa", action="store_true", help="also time QPiSSA (4-bit NF4 residual), eager/compiled")
    args = parser.parse_args()
    if args.threads:  # on a shared machine, 1 thread avoids OpenMP threads spinning for a busy core
        torch.set_num_threads(args.threads)
    device, r = args.device, args.rank
    cuda = device.startswith("cuda")
    base, targets, peft_targets, (batch, seq) = build(args.setting, device, args.layers)
    batch = args.batch or batch
    base.requires_grad_(False)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    bf16 = next(base.parameters()).dtype == torch.bfloat16
    causal = args.setting != "minilm"
    built: list[Contender] = []
    errs: dict[str, str] = {}
    for label, peer, make in contenders_of(args, r, targets, peft_targets, bf16):

        def setup(make: Callable = make, label: str = label, peer: str = peer) -> Contender:
            before = torch.cuda.memory_allocated() if cuda else 0
            model = make(common.fresh(base)).train()
            step = Step(model, ids, causal, device, args.warmup, "CUDA graph" in label)
            gib = (torch.cuda.memory_allocated() - before) / 2**30 if cuda else None
            print(f"[{label}] built, {gib} GiB", flush=True)
            return Contender(label, step, peer, gib)

        c = common.guarded(label, setup, errs)
        if c is not None:
            built.append(c)
    if args.gc_freeze:  # everything built so far out of the collector's sight: full collections stay short
        gc.collect()
        gc.freeze()
    clock = GcClock()
    for round_ in range(args.rounds):
        for c in built:
            common.guarded(c.label, lambda c=c: timed_round(c, args.steps, device, clock), errs)
        print(
            f"round {round_ + 1}/{args.rounds}: "
            + ", ".join(f"{c.label} {1e3 * statistics.median(c.times[-args.steps :]):.1f}" for c in built if c.times),
            flush=True,
        )
    rows = []
    for c in built:
        if not c.times:
            continue
        n = len(c.times)
        row: dict[str, Any] = {"contender": c.label, "ms": 1e3 * statistics.median(c.times)}
        row.update(ms_min=1e3 * min(c.times), ms_max=1e3 * max(c.times))
        row["median/min"] = row["ms"] / row["ms_min"]
        row["host_ms"] = 1e3 * statistics.median(c.host_times)
        row.update(gc_per_step=c.gcs / n, gen2=c.gen2, gc_ms_per_step=1e3 * c.gc_seconds / n)
        if cuda:
            row.update(gpu_busy(c.step, args.kernels))
            row["peak_gib"] = (c.built_gib or 0.0) + c.peak_step_gib
        row["times_ms"] = [round(1e3 * t, 2) for t in c.times]
        rows.append(row)
    by_label = {row["contender"]: row for row in rows}
    peers = {c.label: c.peer for c in built}
    for row in rows:
        peer = by_label.get(peers[row["contender"]])
        if peer is not None:
            row["x_frozen"] = row["ms"] / peer["ms"]
            if row.get("peak_gib") is not None and peer.get("peak_gib") is not None:
                row["extra_gib_vs_frozen"] = row["peak_gib"] - peer["peak_gib"]
    env = common.environment()
    print(f"\nstep, {args.setting}: batch {batch} x {seq}, r = {r}, AdamW, {args.rounds} interleaved rounds x "
          f"{args.steps} steps, gc.freeze() {args.gc_freeze}, {env['device']}, torch {env['torch']}, "
          f"python {env['python']}")  # fmt: skip
    columns = ["contender", "ms", "ms_min", "ms_max", "median/min", "x_frozen", "host_ms", "kernel_ms", "kernels"]
    columns += ["gc_per_step", "gen2", "gc_ms_per_step", "peak_gib"]
    print(common.table(rows, columns))
    print("(x_frozen: median against the frozen base's median run the same way: eager, compiled or graphed)")
    for row in rows if args.kernels else []:
        print(f"\n{row['contender']}: the {args.kernels} kernels with the most time in one step (name, count, ms)")
        for name, count, ms in row["top_kernels"]:
            print(f"  {ms:8.3f} ms  {count:5d}  {name}")
    for label, message in errs.items():
        print(f"FAILED {label}: {message}")
    payload = {"setting": args.setting, "rank": r, "batch": [batch, seq], "env": env, "rows": rows, "errors": errs}
    common.save(args.out, payload)


if __name__ == "__main__":
    main()
