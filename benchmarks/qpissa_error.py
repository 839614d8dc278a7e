"""QPiSSA's quantization error on real weights: the paper's metric, on the 36 matrices of all-MiniLM-L6-v2.

    reduction = 1 - ||W - (deq(nf4(W_res)) + s B0 A0)||_* / ||W - deq(nf4(W))||_*      (nuclear norms)

per matrix, averaged over the 36 query/key/value/dense matrices, for QLoRA (0 by definition), QPiSSA with 1 and
5 iterations and LoftQ with 5, at r = 16 and 64, through ``minipissa.apply(..., quantize="nf4")`` itself. The
anchors measured with bitsandbytes' NF4 and an exact SVD (../shared/reference/qpissa.md) are printed beside.

    python benchmarks/qpissa_error.py                       # exact init (the anchors' setting)
    python benchmarks/qpissa_error.py --niter 4             # randomized init, warm-started iterations
    python benchmarks/qpissa_error.py --double-quant        # the absmax in 8 bits (QLoRA's double quantization)

With ``--double-quant`` nf4 is the double-quantized quantizer on both sides of the ratio (the residual and QLoRA's
weight alike), as the ``qlora_error`` the layers record.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch
from common import MINILM_TARGETS, environment, minilm
from torch import nn

import minipissa
from minipissa.core import qpissa

#: (method, rank) -> mean reduction in %, measured with bitsandbytes 0.50.2 NF4 and an exact SVD.
ANCHORS = {
    ("QPiSSA-1", 16): 12.7, ("LoftQ-5", 16): 16.4, ("QPiSSA-5", 16): 22.8,
    ("QPiSSA-1", 64): 34.2, ("LoftQ-5", 64): 38.1, ("QPiSSA-5", 64): 53.9,
}  # fmt: skip
METHODS = {  # name -> apply() options
    "QLoRA": {"init": "lora"},
    "QPiSSA-1": {"init": "pissa", "quant_iters": 1},
    "LoftQ-5": {"init": "loftq", "quant_iters": 5},
    "QPiSSA-5": {"init": "pissa", "quant_iters": 5},
}


def nuclear(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.double(), ord="nuc"))


def reductions(base: nn.Module, rank: int, niter: int | None, options: dict[str, Any]) -> tuple[list[float], float]:
    """Per-matrix reduction (fraction) against QLoRA for one method, and the apply() time in seconds."""
    weights = {name: module.weight.detach().float().clone() for name, module in base.named_modules()
               if isinstance(module, nn.Linear)}  # fmt: skip
    model = copy.deepcopy(base)
    start = time.perf_counter()
    minipissa.apply(model, rank, MINILM_TARGETS, niter=niter, quantize="nf4", **options)
    seconds = time.perf_counter() - start
    out = []
    for name, layer in minipissa.pissa_layers(model):
        w = weights[name]
        approx = layer.residual(torch.float32) + layer.scaling * (layer.B0 @ layer.A0)
        qlora = qpissa.roundtrip(w, options.get("double_quant", False), torch.float32)
        out.append(1.0 - nuclear(w - approx) / nuclear(w - qlora))
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--niter", type=int, default=None, help="randomized init with this many power iterations")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--double-quant", action="store_true", help="double-quantized absmax (8 bits)")
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    base = minilm()
    rows = []
    dq = {"double_quant": True} if args.double_quant else {}
    print(f"all-MiniLM-L6-v2, 36 matrices, NF4 blocksize 64{' double-quantized' * args.double_quant}, init "
          f"{'exact' if args.niter is None else args.niter}")  # fmt: skip
    print(f"{'method':<10} {'rank':>4} {'mean %':>7} {'min %':>6} {'max %':>6} {'anchor %':>8} {'apply s':>8}")
    for rank in args.ranks:
        for method, options in METHODS.items():
            values, seconds = reductions(base, rank, args.niter, options | dq)
            mean = 100 * sum(values) / len(values)
            anchor = ANCHORS.get((method, rank), 0.0)
            row = {"method": method, "rank": rank, "mean": mean, "min": 100 * min(values), "max": 100 * max(values)}
            rows.append(row | {"anchor": anchor, "seconds": seconds, "matrices": len(values)})
            print(f"{method:<10} {rank:>4} {mean:7.2f} {100 * min(values):6.2f} {100 * max(values):6.2f} "
                  f"{anchor:8.1f} {seconds:8.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "niter": args.niter, "double_quant": args.double_quant,
                       "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
