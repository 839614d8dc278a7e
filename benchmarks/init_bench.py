"""Initialisation: minipissa vs PEFT on the same weights, in one process.

For each contender: wall time, peak extra device memory (CUDA), and the error of the principal part
P = s B0 A0 against P_r, the rank-r part of a float64 SVD of the same weight, on a sample of matrices:
``rel_err`` = ||P - P_r||_F / ||P_r||_F (median over the sample) and ``opt_excess`` =
||W - P||_F / ||W - P_r||_F - 1 (max; the exactness criterion for gap-poor random weights).

    python benchmarks/init_bench.py --setting minilm --repeat 3      # CPU, real all-MiniLM-L6-v2, r = 16
    python benchmarks/init_bench.py --setting llama-small --repeat 3 # CPU, 4 layers, hidden 1024
    python benchmarks/init_bench.py --setting llama-7b --device cuda --out init_gpu.json
"""

from __future__ import annotations

import gc
import statistics
from typing import Any

import common
import torch
from torch import nn

import minipissa
from minipissa.plan.targets import find_targets


def build(setting: str, device: str, layers: int | None = None) -> tuple[nn.Module, Any, Any, list[str]]:
    """(model, minipissa targets, PEFT targets, names of the matrices whose error is measured)."""
    if setting == "minilm":
        model = common.minilm().to(device)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "encoder" in n]
        return model, common.MINILM_TARGETS, common.MINILM_PEFT_TARGETS, names
    if setting == "llama-small":
        model = common.llama(layers or 4, 1024, 2816, 16, 4096, torch.float32, device)
        sample = [
            f"model.layers.0.{p}.{t}" for p, t in [("self_attn", "q_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj")]
        ]
        return model, common.LLAMA_TARGETS, common.LLAMA_TARGETS, sample
    model = common.llama_7b(device, layers or 32)
    sample = [
        f"model.layers.0.{p}.{t}" for p, t in [("self_attn", "q_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj")]
    ]
    return model, common.LLAMA_TARGETS, common.LLAMA_TARGETS, sample


def references(base: nn.Module, names: list[str], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (W float64, P_r float64)}: P_r from a float64 SVD on the CPU, or on a GPU (where
    float64 SVDs of 4096 x 11008 take many seconds) from a float64 eigh of the float64 Gram W^T W."""
    out = {}
    for name in names:
        w = base.get_submodule(name).weight.detach().double()
        if w.is_cuda:
            flip = w.shape[0] < w.shape[1]
            m = w.mT if flip else w
            v = torch.linalg.eigh(m.mT @ m).eigenvectors[:, -rank:]
            p_r = (m @ v) @ v.mT
            out[name] = (w, p_r.mT if flip else p_r)
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            out[name] = (w, (u[:, :rank] * s[:rank]) @ vh[:rank])
    return out


def errors(products: dict[str, torch.Tensor], refs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    rel, opt = [], []
    for name, (w, p_r) in refs.items():
        p = products[name].to(w.device)
        rel.append(((p - p_r).norm() / p_r.norm()).item())
        opt.append(((w - p).norm() / (w - p_r).norm() - 1).item())
    return {"rel_err": statistics.median(rel), "opt_excess": max(opt)}


def contend(
    label: str, base: nn.Module, make: Any, device: str, refs: dict, products: Any, errs: dict
) -> dict[str, Any] | None:
    def run() -> dict[str, Any]:
        gc.collect()
        model = common.fresh(base).to(device)  # the base may wait on the host (one model on the GPU)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            print(f"[{label}] starts with {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated", flush=True)
        with common.Probe(device) as probe:
            model = make(model)
        row = {"contender": label, "seconds": probe.seconds, "peak_extra_gib": probe.peak_extra_gib}
        quantized = [layer for _, layer in minipissa.pissa_layers(model) if layer.quantized]
        if quantized:  # the 4-bit residuals' own storage: codes + absmax, per weight element
            stored = sum(layer.weight.bytes for layer in quantized)
            elements = sum(layer.in_features * layer.out_features for layer in quantized)
            row["residual_bytes_per_param"] = stored / elements
        row.update(errors(products(model), refs))
        print(f"[{label}] {row}", flush=True)
        del model
        gc.collect()  # reference cycles (e.g. a failed contender's traceback) must not hold device memory
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return row

    return common.guarded(label, run, errs)


def warm_up(device: str) -> None:
    """CUDA context, cuBLAS/cuSOLVER handles and lazily loaded kernels, outside every timing."""
    tiny = common.llama(1, 256, 512, 4, 256, torch.bfloat16 if device.startswith("cuda") else torch.float32, device)
    for niter in (4, None):
        minipissa.apply(common.fresh(tiny), 16, common.LLAMA_TARGETS, niter=niter)
    for init in ("pissa_niter_4", "pissa"):
        common.peft_lora(common.fresh(tiny), common.LLAMA_TARGETS, 16, init)


def main() -> None:
    parser = common.arguments(__doc__)
    parser.add_argument("--niter", type=int, default=4)
    parser.add_argument(
        "--exact-layers", type=int, default=2, help="layers of the model PEFT's exact init runs on (0: skip)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the fastest time of each is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--cprofile", action="store_true", help="host profile of one more randomized apply")
    parser.add_argument("--only", default="", help="comma-separated label fragments: run just those contenders")
    args = parser.parse_args()
    if args.threads:  # on a shared machine, 1 thread avoids OpenMP threads spinning for a busy core
        torch.set_num_threads(args.threads)
    device, r, q = args.device, args.rank, args.niter
    warm_up(device)
    base, targets, peft_targets, names = build(args.setting, device)
    base.requires_grad_(False)
    if device.startswith("cuda"):  # the model's weights alone: 12.6 GiB for the 7B shape in bf16
        print(f"model built: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated", flush=True)
    refs = references(base, names, r)
    if args.setting == "llama-7b":  # keep the base on the host: each contender copies it to the GPU
        base = base.cpu()
        gc.collect()
        torch.cuda.empty_cache()
    errs: dict[str, str] = {}
    mp, pp = common.minipissa_products, common.peft_products

    def watch(done: int, total: int) -> None:
        """Device memory every 32 modules: in use (grows by the adapters alone: a replaced weight is
        freed at once), and the peak since the last report (the decomposition's workspace)."""
        if device.startswith("cuda") and (done % 32 == 0 or done == total):
            now, peak = torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30
            print(f"  {done}/{total} modules, {now:.2f} GiB allocated, peak {peak:.2f} GiB", flush=True)

    rows = []
    contenders = [
        (f"minipissa niter={q}", lambda m: minipissa.apply(m, r, targets, niter=q, progress=watch), mp),
        (f"PEFT pissa_niter_{q}", lambda m: common.peft_lora(m, peft_targets, r, f"pissa_niter_{q}"), pp),
        ("minipissa exact", lambda m: minipissa.apply(m, r, targets, progress=watch), mp),
        (f"minipissa niter={q} QPiSSA-1 (nf4)", lambda m: minipissa.apply(m, r, targets, niter=q, quantize="nf4"), mp),
        (
            f"minipissa niter={q} QPiSSA-5 (nf4)",
            lambda m: minipissa.apply(m, r, targets, niter=q, quantize="nf4", quant_iters=5),
            mp,
        ),
    ]
    if args.setting == "llama-7b":  # the time/memory trade of a smaller workspace
        contenders.insert(
            1,
            (
                f"minipissa niter={q}, memory_budget 512 MiB",
                lambda m: minipissa.apply(m, r, targets, niter=q, memory_budget=2**29, progress=watch),
                mp,
            ),
        )
    small = args.setting != "llama-7b"
    if small:  # PEFT's more accurate setting, for the error table
        peft16 = f"pissa_niter_{4 * q}"
        contenders.insert(2, (f"PEFT {peft16}", lambda m: common.peft_lora(m, peft_targets, r, peft16), pp))
    if small:
        contenders.append(("PEFT pissa (exact)", lambda m: common.peft_lora(m, peft_targets, r, "pissa"), pp))
    if args.only:
        contenders = [c for c in contenders if any(k in c[0] for k in args.only.split(","))]
    for _ in range(args.repeat):  # rounds interleave the contenders; each keeps its fastest time
        for label, make, products in contenders:
            rows.append(contend(label, base, make, device, refs, products, errs))
    modules = len(list(find_targets(base, targets)))
    if args.cprofile:  # where the host waits: syncs show as time in .item()/.cpu()/tolist()
        import cProfile
        import pstats

        model = common.fresh(base).to(device)
        common.sync(device)
        with cProfile.Profile() as profiler:
            minipissa.apply(model, r, targets, niter=q)
            common.sync(device)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
        del model
    del base
    if (
        not small and args.exact_layers > 0
    ):  # PEFT's exact SVD takes ~1 s a matrix on an H100: compare on the first layers only
        sub, _, _, _ = build(args.setting, device, layers=args.exact_layers)
        sub_refs = references(sub, names, r)
        for label, make, products in [
            (f"minipissa exact ({args.exact_layers} layers)", lambda m: minipissa.apply(m, r, targets), mp),
            (f"PEFT pissa (exact, {args.exact_layers} layers)", lambda m: common.peft_lora(m, targets, r, "pissa"), pp),
        ]:
            rows.append(contend(label, sub, make, device, sub_refs, products, errs))
    by_label: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {}
    for row in rows:
        if row is not None:
            times.setdefault(row["contender"], []).append(row["seconds"])
    for row in rows:
        if row is not None and (
            row["contender"] not in by_label or row["seconds"] < by_label[row["contender"]]["seconds"]
        ):
            by_label[row["contender"]] = row
    rows = list(by_label.values())
    for row in rows:  # the rounds' spread beside the fastest
        spread = times[row["contender"]]
        row.update(s_median=statistics.median(spread), s_min=min(spread), s_max=max(spread), rounds=len(spread))
    peers = {
        f"minipissa niter={q}": f"PEFT pissa_niter_{q}",
        "minipissa exact": "PEFT pissa (exact)",
        f"minipissa exact ({args.exact_layers} layers)": f"PEFT pissa (exact, {args.exact_layers} layers)",
    }
    for mine, peer in peers.items():
        if mine in by_label and peer in by_label:
            by_label[mine]["time_vs_peft"] = by_label[mine]["seconds"] / by_label[peer]["seconds"]
    env = common.environment()
    print(
        f"\ninit, {args.setting}: {modules} matrices, r = {r}, {env['device']}, "
        f"torch {env['torch']}, peft {env['peft']}"
    )
    columns = ["contender", "seconds", "s_median", "s_min", "s_max", "time_vs_peft", "peak_extra_gib", "rel_err"]
    print(common.table(rows, [*columns, "opt_excess", "residual_bytes_per_param"]))
    for label, message in errs.items():
        print(f"FAILED {label}: {message}")
    common.save(
        args.out, {"setting": args.setting, "rank": r, "matrices": modules, "env": env, "rows": rows, "errors": errs}
    )


if __name__ == "__main__":
    main()
