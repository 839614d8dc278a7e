"""QPiSSA started from a 4-bit checkpoint: what re-quantizing the residual costs, on the 36 matrices of
all-MiniLM-L6-v2 quantized by bitsandbytes (NF4, blocksize 64, compress_statistics=True: QLoRA's checkpoints).

A 4-bit target is decomposed from its dequantized weight W_deq (plan/quantized_base.py); with ``quantize="nf4"`` the
residual W_deq - s B0 A0 is quantized again, a second rounding on top of the checkpoint's. Printed, per method, the
mean over the matrices of the Frobenius errors at init

    vs W:      ||W - (W_res_q + s B0 A0)|| / ||W||        (W: the 16-bit original, which a 4-bit user does not have)
    vs W_deq:  ||W_deq - (W_res_q + s B0 A0)|| / ||W_deq||  (what the adapted model changes in the model it was given)

for keeping the checkpoint (QLoRA: W_deq itself), QPiSSA with 1 and 5 iterations from the 4-bit checkpoint, PiSSA
from it with a dense residual (quantize=None: exactly W_deq, 16 bits for those layers), and QPiSSA from the 16-bit W.

    python benchmarks/qpissa_from_4bit.py [--ranks 16 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from common import MINILM_TARGETS, environment, minilm
from torch import nn

import minipissa
from minipissa.plan.quantized_base import dense_weight
from minipissa.plan.targets import matches

METHODS = {  # name -> (start from the 4-bit checkpoint, apply() options or None for the checkpoint itself)
    "4-bit checkpoint (QLoRA)": (True, None),
    "QPiSSA-1 from 4-bit": (True, {"quantize": "nf4", "quant_iters": 1}),
    "QPiSSA-5 from 4-bit": (True, {"quantize": "nf4", "quant_iters": 5}),
    "PiSSA from 4-bit, dense": (True, {"quantize": None}),
    "QPiSSA-1 from 16-bit": (False, {"quantize": "nf4", "quant_iters": 1}),
    "QPiSSA-5 from 16-bit": (False, {"quantize": "nf4", "quant_iters": 5}),
}


def four_bit(model: nn.Module) -> nn.Module:
    """``model`` with its target Linears replaced by bitsandbytes Linear4bit (quantized on the CPU at .to())."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and matches(name, MINILM_TARGETS):
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(
                module.weight.detach().clone(), quant_type="nf4", blocksize=64, compress_statistics=True, module=layer
            )
            layer.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))
    return model


def errors(rank: int, start_4bit: bool, options: dict | None) -> tuple[float, float]:
    """Mean relative errors (vs W, vs W_deq) over the target matrices."""
    original = {n: m.weight.detach().clone() for n, m in minilm().named_modules() if type(m) is nn.Linear}
    model = four_bit(minilm()) if start_4bit else minilm()
    deq = four_bit(minilm())  # the checkpoint, read back as minipissa reads it (bit-exact vs bitsandbytes)
    w_deq = {n: dense_weight(m) for n, m in deq.named_modules() if hasattr(m, "quant_state")}
    if options is None:
        approx = w_deq
    else:
        minipissa.apply(model, rank, MINILM_TARGETS, **options)
        with torch.no_grad():
            approx = {n: x.residual(torch.float32) + x.delta_weight() for n, x in minipissa.pissa_layers(model)}
    vs_w = [((original[n] - a).norm() / original[n].norm()).item() for n, a in approx.items()]
    vs_deq = [((w_deq[n] - a).norm() / w_deq[n].norm()).item() for n, a in approx.items()]
    return sum(vs_w) / len(vs_w), sum(vs_deq) / len(vs_deq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    print("all-MiniLM-L6-v2, 36 matrices, bitsandbytes NF4 (blocksize 64, nested), exact init; mean errors in %")
    print(f"{'method':<26} {'rank':>4} {'vs W':>7} {'vs W_deq':>9}")
    rows = []
    for rank in args.ranks:
        for method, (start_4bit, options) in METHODS.items():
            vs_w, vs_deq = errors(rank, start_4bit, options)
            rows.append({"method": method, "rank": rank, "vs_w": 100 * vs_w, "vs_w_deq": 100 * vs_deq})
            print(f"{method:<26} {rank:>4} {100 * vs_w:7.2f} {100 * vs_deq:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
