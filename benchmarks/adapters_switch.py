"""Several adapters on one model: ms per switch (set_adapter) and the forward of a mixed batch, beside the forward
of the same model with one adapter, on Llama-2-7B's shape (bf16, random weights; ``--layers`` of its 32 decoder
layers, every cost here is per layer, so it scales linearly).

Adapters: "a" (PiSSA, rank r), "b" (the same initialisation, trained otherwise: switching swaps A and B only),
"c" (rank r/2, another initialisation: it computes W_res_a + C·D + s·B·A, a correction of rank 3r/2) and the
converted LoRA of "a" loaded as "lora" (another low-rank correction). Switching must copy no weight: the CUDA memory
in use before and after a switch is reported (``switch_mem_delta_bytes``, 0 expected).

    python benchmarks/adapters_switch.py --device cuda --layers 8 --out adapters_switch_gpu.jsonl
    python benchmarks/adapters_switch.py --tiny                      # CPU smoke test, seconds

One JSON object per line (device, torch, date in each).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import common
import torch
from torch import nn

import minipissa


def environment(device: str) -> dict[str, Any]:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    return {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__}


def median_ms(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, float, float]:
    """Median, min and max wall ms of ``fn`` (the device synchronized around each call), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        common.sync(device)
        start = time.perf_counter()
        fn()
        common.sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), min(times), max(times)


def build(args: argparse.Namespace) -> nn.Module:
    if args.tiny:
        return common.llama(2, 64, 96, 4, 128, torch.float32, args.device)
    return common.llama_7b(args.device, args.layers)


def adapters_on(model: nn.Module, rank: int, lora_dir: str) -> None:
    """Adds b (shared init), c (another init) and lora (a's converted LoRA) to a model that has adapter a."""
    minipissa.apply(model, targets=common.LLAMA_TARGETS, rank=rank, niter=4, name="b")
    minipissa.apply(model, targets=common.LLAMA_TARGETS, rank=max(rank // 2, 1), niter=4, name="c")
    with torch.no_grad():  # "trained" adapters: b and c move away from their initialisation
        for _, layer in minipissa.pissa_layers(model):
            for slot in layer.adapters.values():
                slot.B.mul_(1.01)
    minipissa.convert_to_lora(model, lora_dir, name="a")
    minipissa.load_lora(model, lora_dir, name="lora")


def held(model: nn.Module, measured: int) -> dict[str, int]:
    """What the added adapters hold on the device: their A and B, the corrections C, D of those of another
    initialisation; beside ``measured``, the allocator's growth while they were added (CUDA; 0 on the CPU)."""
    slots = [slot for _, layer in minipissa.pissa_layers(model) for slot in layer.adapters.values()]
    ab = sum(t.nbytes for slot in slots for t in (slot.A, slot.B))
    cd = sum(t.nbytes for slot in slots for t in (slot.correction_a, slot.correction_b) if t is not None)
    return {"measured_bytes": measured, "a_b_bytes": ab, "correction_bytes": cd}


def memory(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    env = environment(args.device)
    model = build(args)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    minipissa.apply(model, targets=common.LLAMA_TARGETS, rank=args.rank, niter=4, name="a")
    rows: list[dict[str, Any]] = []
    shape = {"layers": 2 if args.tiny else args.layers, "rank": args.rank, "batch": args.batch, "seq": args.seq}

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    def record(what: str, ms: tuple[float, float, float], **extra: Any) -> None:
        rows.append(env | shape | {"what": what, "median_ms": ms[0], "min_ms": ms[1], "max_ms": ms[2]} | extra)
        print(json.dumps(rows[-1]), flush=True)

    record("forward, one adapter", median_ms(forward, args.device, args.repeats))
    before = memory(args.device)
    with tempfile.TemporaryDirectory() as lora_dir:
        adapters_on(model, args.rank, lora_dir)
    grown = memory(args.device) - before
    rows.append(env | shape | {"what": "device memory of adapters b, c, lora"} | held(model, grown))
    print(json.dumps(rows[-1]), flush=True)
    for name in ("a", "b", "c", "lora"):
        minipissa.set_adapter(model, name)
        record(f"forward, adapter {name} of 4", median_ms(forward, args.device, args.repeats),
               exact=minipissa.adapters(model)[name]["exact"])  # fmt: skip
    with minipissa.per_example(model, [("a", "b", "c", "lora", None)[i % 5] for i in range(args.batch)]):
        record("forward, mixed batch (a, b, c, lora, original)", median_ms(forward, args.device, args.repeats))
    for pair in (("a", "b"), ("a", "c"), ("c", "lora")):
        state = iter(pair * (args.repeats + 2))
        before = memory(args.device)
        ms = median_ms(lambda s=state: minipissa.set_adapter(model, next(s)), args.device, args.repeats)
        record(f"switch {pair[0]} <-> {pair[1]}", ms, switch_mem_delta_bytes=memory(args.device) - before)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama in fp32 on the CPU: a smoke test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of Llama-2-7B's shape")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="append the JSON lines to this file")
    args = parser.parse_args()
    if args.tiny:
        args.device, args.seq, args.repeats = "cpu", 16, 5
    rows = run(args)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
