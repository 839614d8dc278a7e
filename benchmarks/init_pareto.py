"""Init time against accuracy on real all-MiniLM-L6-v2 (36 q/k/v/dense matrices, r = 16): a grid of minipissa's
randomized settings (niter, oversample) and exact, beside PEFT's pissa_niter_4 and pissa_niter_16, in interleaved
rounds in one process. Reported per contender: median seconds over the rounds (min, max) and rel_err, the median
over the matrices of ‖P − P_r‖/‖P_r‖ (P_r: the rank-r part of a float64 SVD); then, for each PEFT setting, the
minipissa settings that take no more time, with how many times more accurate they are.

    python benchmarks/init_pareto.py --threads 1 --rounds 5
"""

from __future__ import annotations

import statistics
from typing import Any

import common
import torch
from init_bench import build, contend, references

import minipissa

# (niter, oversample); None: the default, 4r
GRID = [(1, 16), (2, 16), (2, 32), (3, 16), (3, 32), (3, 48), (4, 16), (4, 32), (4, 48), (5, 32), (4, None)]


def main() -> None:
    parser = common.arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = args.rank
    base, targets, peft_targets, names = build("minilm", "cpu")
    base.requires_grad_(False)
    refs = references(base, names, r)
    mp, pp = common.minipissa_products, common.peft_products
    contenders: list[tuple[str, Any, Any]] = [
        (f"PEFT pissa_niter_{q}", lambda m, q=q: common.peft_lora(m, peft_targets, r, f"pissa_niter_{q}"), pp)
        for q in (4, 16)
    ]
    for niter, over in GRID:
        label = f"minipissa niter={niter} oversample={'4r' if over is None else over}"
        contenders.append((label, lambda m, q=niter, o=over: minipissa.apply(m, r, targets, niter=q, oversample=o), mp))
    contenders.append(("minipissa exact", lambda m: minipissa.apply(m, r, targets), mp))
    for label, make, products in contenders:  # one untimed pass: imports, lazy kernels, allocator
        contend(label, base, make, "cpu", refs, products, {})
    seconds: dict[str, list[float]] = {label: [] for label, _, _ in contenders}
    err: dict[str, float] = {}
    errs: dict[str, str] = {}
    for _ in range(args.rounds):
        for label, make, products in contenders:
            row = contend(label, base, make, "cpu", refs, products, errs)
            if row is not None:
                seconds[label].append(row["seconds"])
                err[label] = row["rel_err"]
    rows = [
        {"contender": label, "s_median": statistics.median(t), "s_min": min(t), "s_max": max(t), "rel_err": err[label]}
        for label, t in seconds.items()
        if t
    ]
    env = common.environment()
    print(
        f"\ninit, minilm: 36 matrices, r = {r}, {args.rounds} rounds, {env['cpu_threads']} threads, "
        f"torch {env['torch']}"
    )
    print(common.table(rows, ["contender", "s_median", "s_min", "s_max", "rel_err"]))
    by = {row["contender"]: row for row in rows}
    for q in (4, 16):
        peer = by.get(f"PEFT pissa_niter_{q}")
        if peer is None:
            continue
        fits = [row for row in rows if row["contender"].startswith("minipissa") and row["s_median"] <= peer["s_median"]]
        best = min(fits, key=lambda row: row["rel_err"], default=None)
        what = (
            "none" if best is None else f"{best['contender']}: {peer['rel_err'] / best['rel_err']:.1f}x more accurate"
        )
        print(f"at no more time than PEFT pissa_niter_{q} ({peer['s_median']:.3f} s): {what}")
    for label, message in errs.items():
        print(f"FAILED {label}: {message}")
    common.save(args.out, {"setting": "minilm", "rank": r, "env": env, "rows": rows, "errors": errs})


if __name__ == "__main__":
    main()
