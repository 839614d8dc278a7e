"""The cost of fingerprinting every target weight (an exact hash of every element and its position, plus two
moments), as apply() does twice (the weights, then the residuals) and save()/load() once: all weights queued,
one read-back, as in apply(). Median, min and max over --repeat rounds, and the share of one init it adds.

    python benchmarks/fingerprint_bench.py --setting minilm --repeat 5                 # CPU, real MiniLM
    PYTHONPATH=$PWD python benchmarks/fingerprint_bench.py --setting llama-7b --device cuda --repeat 5
"""

from __future__ import annotations

import statistics
import time

import common
import torch

import minipissa
from minipissa.core.fingerprint import fingerprint_later, read_all
from minipissa.plan.targets import find_targets


def main() -> None:
    parser = common.arguments(__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = args.device
    if args.setting == "minilm":
        model, targets = common.minilm().to(device), common.MINILM_TARGETS
    elif args.setting == "llama-small":
        model, targets = common.llama(4, 1024, 2816, 16, 4096, torch.float32, device), common.LLAMA_TARGETS
    else:
        model, targets = common.llama_7b(device), common.LLAMA_TARGETS
    weights = [module.weight for _, module in find_targets(model, targets)]
    elements = sum(w.numel() for w in weights)
    times = []
    for _ in range(args.repeat + 1):  # the first round warms the allocator and the keys' cache up
        common.sync(device)
        start = time.perf_counter()
        read_all([fingerprint_later(w) for w in weights])
        common.sync(device)
        times.append(time.perf_counter() - start)
    times = times[1:]
    common.sync(device)
    start = time.perf_counter()
    minipissa.apply(model, args.rank, targets, niter=4)
    common.sync(device)
    init = time.perf_counter() - start
    env = common.environment()
    median = statistics.median(times)
    print(
        f"fingerprints, {args.setting}: {len(weights)} weights, {elements / 1e9:.3f} G elements, {env['device']}, "
        f"torch {env['torch']}: median {median:.4f} s (min {min(times):.4f}, max {max(times):.4f}) over "
        f"{args.repeat} rounds; {elements * weights[0].element_size() / median / 1e9:.2f} GB/s read; "
        f"apply(niter=4) {init:.3f} s, of which the two fingerprint passes ~{2 * median / init:.0%}"
    )


if __name__ == "__main__":
    main()
