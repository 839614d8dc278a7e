"""GPU probe: where an adapter's time goes, per projection and per group sharing an input.

Times forward + backward (grads of x, A, B) of one Llama-2-7B projection at N = 2048 tokens in
bf16, for the frozen linear, a plain module-style adapter, and the library's adapted_linear, each eagerly
(CUDA events) and replayed from a CUDA graph (kernel time alone, no launch gaps). The gap between
the two is host overhead; the gap between the graph time and the frozen graph time is the kernels.

    PYTHONPATH=$PWD python benchmarks/adapter_probe.py
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minipissa.nn.ops import adapted_linear

N, R, DT = 2048, 16, torch.bfloat16


def plain(x: Tensor, w: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """A module-style adapter with fp32 masters: what a clean nn.Module computes."""
    return F.linear(x, w) + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))


def timed(fn: Callable[[], object], reps: int = 30) -> tuple[float, float]:
    """(eager ms, graph-replay ms), medians."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    eager = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        eager.append(start.elapsed_time(end))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    replay = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        replay.append(start.elapsed_time(end))
    return statistics.median(eager), statistics.median(replay)


def group(shapes: list[tuple[int, int]]) -> None:
    """Projections sharing one input x (N, in): q/k/v, or gate/up, or a single one."""
    in_features = shapes[0][1]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, in_features, device="cuda", dtype=DT, generator=g).requires_grad_(True)
    ws = [torch.randn(o, i, device="cuda", dtype=DT, generator=g) / i**0.5 for o, i in shapes]
    As = [(torch.randn(R, i, device="cuda", generator=g) / i**0.5).requires_grad_(True) for o, i in shapes]
    Bs = [(torch.randn(o, R, device="cuda", generator=g) / R**0.5).requires_grad_(True) for o, i in shapes]
    gys = [torch.randn(N, o, device="cuda", dtype=DT, generator=g) for o, i in shapes]
    trainable = [x, *As, *Bs]

    def frozen() -> object:
        return torch.autograd.grad([F.linear(x, w) for w in ws], [x], gys)

    def module() -> object:
        ys = [plain(x, w, a, b) for w, a, b in zip(ws, As, Bs, strict=True)]
        return torch.autograd.grad(ys, trainable, gys)

    def library() -> object:
        ys = [adapted_linear(x, None, w, None, a, b, 1.0) for w, a, b in zip(ws, As, Bs, strict=True)]
        return torch.autograd.grad(ys, trainable, gys)

    base_eager, base_graph = timed(frozen)
    label = "+".join(f"{o}x{i}" for o, i in shapes)
    print(f"{label}: frozen eager {base_eager:.3f} ms, graph {base_graph:.3f} ms")
    for name, fn in [("module", module), ("library", library)]:
        eager, graph = timed(fn)
        print(
            f"  {name:8s} eager {eager:.3f} ms (+{eager - base_eager:.3f}, x{eager / base_eager:.2f}), "
            f"graph {graph:.3f} ms (+{graph - base_graph:.3f}, x{graph / base_graph:.2f})"
        )


def kernels(shape: tuple[int, int]) -> None:
    """The kernels of adapted_linear, one projection, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    o, i = shape
    x = torch.randn(N, i, device="cuda", dtype=DT).requires_grad_(True)
    w = torch.randn(o, i, device="cuda", dtype=DT) / i**0.5
    a = torch.randn(R, i, device="cuda").requires_grad_(True)
    b = torch.randn(o, R, device="cuda").requires_grad_(True)
    gy = torch.randn(N, o, device="cuda", dtype=DT)
    for _ in range(3):
        torch.autograd.grad(adapted_linear(x, None, w, None, a, b, 1.0), [x, a, b], gy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            torch.autograd.grad(adapted_linear(x, None, w, None, a, b, 1.0), [x, a, b], gy)
        torch.cuda.synchronize()
    print(f"kernels of adapted_linear, {o}x{i}, per call (10 calls):")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))


def check() -> None:
    """The library's function on CUDA (bf16 activations, fp32 masters cast differentiably) against a
    float64 reference, forward and backward, for s = 1 and s != 1, with and without dropout input."""
    g = torch.Generator(device="cuda").manual_seed(1)
    for s, separate in [(1.0, False), (0.37, False), (2.0, True)]:
        x = torch.randn(4, 64, 256, device="cuda", dtype=DT, generator=g).requires_grad_(True)
        xa = torch.randn(4, 64, 256, device="cuda", dtype=DT, generator=g).requires_grad_(True) if separate else None
        w = torch.randn(384, 256, device="cuda", dtype=DT, generator=g) / 16
        bias = torch.randn(384, device="cuda", dtype=DT, generator=g)
        a = torch.randn(R, 256, device="cuda", generator=g).requires_grad_(True)
        b = torch.randn(384, R, device="cuda", generator=g).requires_grad_(True)
        gy = torch.randn(4, 64, 384, device="cuda", dtype=DT, generator=g)
        inputs = [x, a, b] + ([xa] if separate else [])
        y = adapted_linear(x, xa, w, bias, a, b, s)
        got = [y, *torch.autograd.grad(y, inputs, gy)]
        d = [t.detach().double().requires_grad_(True) for t in inputs]
        xd, ad, bd = d[:3]
        xad = d[3] if separate else xd
        yd = F.linear(xd, w.double(), bias.double()) + s * F.linear(F.linear(xad, ad), bd)
        want = [yd, *torch.autograd.grad(yd, d, gy.double())]
        errors = [((u.double() - v).norm() / v.norm()).item() for u, v in zip(got, want, strict=True)]
        dtypes = [t.dtype for t in got]
        print(f"check s={s} dropout-input={separate}: rel errors {[f'{e:.1e}' for e in errors]}, dtypes {dtypes}")
        assert max(errors) < 2e-2, errors


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name())
    check()
    group([(4096, 4096)])
    group([(11008, 4096)])
    group([(4096, 11008)])
    group([(4096, 4096)] * 3)
    group([(11008, 4096)] * 2)
    kernels((4096, 4096))
    kernels((11008, 4096))


if __name__ == "__main__":
    main()
