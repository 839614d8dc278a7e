"""Where a randomized init's time goes on one device: wall time of ``apply(niter=4)`` over rounds (median, min,
max), then one more apply under cProfile (the host's view: a function waiting for the device shows as time in a
sync such as ``.tolist()``), with the kernels launched counted by the torch profiler on CUDA.

    python benchmarks/init_profile.py --setting llama-7b --device cuda --rounds 5
    python benchmarks/init_profile.py --setting minilm --threads 1
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time

import common
import torch
from init_bench import build, warm_up

import minipissa


def main() -> None:
    parser = common.arguments(__doc__)
    parser.add_argument("--niter", type=int, default=4)
    parser.add_argument("--oversample", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--lines", type=int, default=30)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    warm_up(device)
    base, targets, _, _ = build(args.setting, device)
    base.requires_grad_(False)

    def once() -> float:
        model = common.fresh(base)
        common.sync(device)
        start = time.perf_counter()
        minipissa.apply(model, args.rank, targets, niter=args.niter, oversample=args.oversample)
        common.sync(device)
        return time.perf_counter() - start

    seconds = [once() for _ in range(args.rounds)]
    summary = (
        f"apply(niter={args.niter}, oversample={args.oversample}) on {args.setting}/{device}: median "
        f"{statistics.median(seconds):.3f} s (min {min(seconds):.3f}, max {max(seconds):.3f}) over {args.rounds} "
        f"rounds; {common.environment()}"
    )
    print(summary, flush=True)
    model = common.fresh(base)
    common.sync(device)
    with cProfile.Profile() as profiler:
        minipissa.apply(model, args.rank, targets, niter=args.niter, oversample=args.oversample)
        common.sync(device)
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(args.lines)
    stats.sort_stats("tottime").print_stats(args.lines)
    if device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile

        model = common.fresh(base)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            minipissa.apply(model, args.rank, targets, niter=args.niter, oversample=args.oversample)
            common.sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"kernels launched: {len(kernels)}, kernel time {sum(e.device_time for e in kernels) / 1e3:.1f} ms")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    print(summary)


if __name__ == "__main__":
    main()
