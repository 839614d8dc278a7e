"""The streaming init (apply(..., device=, weights=)): QPiSSA on the GPU for models too large for it in 16 bits.

(a) Llama-2-70B's shape (hidden 8192, MLP 28672, 64 heads, 8 KV heads, vocab 32000, 80 layers: 560 all-linear target
    matrices, 68.5 B parameters), built on the meta device, its weights fed through the mapping road from a pool of
    bfloat16 host tensors, 4 per shape, pinned, dealt out in turn (a 70B checkpoint fits neither the H200 machine's
    128 GiB of host memory nor its 64 GiB disk). QPiSSA r=16, niter=4: init seconds (the pool's generation reported
    beside them, not in them) and peak GPU memory; then one training step at batch 1 x 512, gradient checkpointing,
    AdamW over A and B, and its peak. One line per (--quant-iters, --double-quant) pair, the pool made once.
(b) Llama-2-7B's shape from a real safetensors checkpoint written once under --ckpt (~5 GB shards and an index,
    bfloat16, random): meta model + checkpoint streamed to the GPU, from a cold page cache and again warm, against
    the same init with the model already on the GPU; the disk read time measured apart (every tensor read once,
    cold); whether streamed and in place give the same factors and codes, bit for bit.

Each result is a JSON line (device, torch version, date); progress goes to stdout as it runs. On a GPU machine:

    python benchmarks/stream_init.py --part a --quant-iters 1 5 --double-quant both --out a.jsonl
    python benchmarks/stream_init.py --part a --layers 8          # a quick look
    python benchmarks/stream_init.py --part b --ckpt /tmp/llama7b --out b.jsonl
    python benchmarks/stream_init.py --tiny                       # both parts, tiny shapes, on the CPU in seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the helpers beside this file; this checkout's minipissa first
import _stream_models as models  # noqa: E402

import minipissa  # noqa: E402

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def emit(record: dict[str, Any], out: str | None) -> None:
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
              "torch": torch.__version__, "transformers": transformers.__version__, **record}  # fmt: skip
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def cuda(device: str) -> bool:
    return device.startswith("cuda")


def start_clock(device: str) -> float:
    """Synchronize, reset the peak counters, and the time."""
    if cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return time.perf_counter()


def stop_clock(device: str, start: float, prefix: str) -> dict[str, Any]:
    """Seconds since ``start`` and the peak GPU memory (allocated, reserved: what a card must hold) since it."""
    if cuda(device):
        torch.cuda.synchronize()
    out: dict[str, Any] = {f"{prefix}_seconds": round(time.perf_counter() - start, 2)}
    if cuda(device):
        out[f"{prefix}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out[f"{prefix}_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def free(device: str) -> None:
    gc.collect()
    if cuda(device):
        torch.cuda.empty_cache()


def host_peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # ru_maxrss: KiB on Linux


def ticker(label: str) -> Callable[[int, int], None]:
    """apply()'s progress callback: a line at each tenth of the modules."""

    def tick(done: int, total: int) -> None:
        if done * 10 // total != (done - 1) * 10 // total:
            log(f"{label}: {done}/{total} modules")

    return tick


def failed(e: BaseException, device: str) -> dict[str, Any]:
    """What a failure leaves to report (an out-of-memory error named as one), with the peak reached."""
    oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
    out: dict[str, Any] = {"error": ("OOM: " if oom else "") + f"{type(e).__name__}: {e}"[:600]}
    if cuda(device):
        out["peak_at_error_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    log(f"FAILED: {out['error']}")
    return out


def init_options(args: argparse.Namespace, quant_iters: int, double_quant: bool) -> dict[str, Any]:
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[args.adapter_dtype]
    return {"rank": args.rank, "niter": args.niter, "quantize": "nf4", "quant_iters": quant_iters,
            "double_quant": double_quant, "adapter_dtype": dtype}  # fmt: skip


def shown(options: dict[str, Any]) -> dict[str, Any]:
    return options | {"adapter_dtype": str(options["adapter_dtype"] or torch.float32).removeprefix("torch.")}


def warm_up(device: str, options: dict[str, Any]) -> None:
    """A small init of each road on ``device`` first, so that no timed init pays for the libraries' start (cuBLAS,
    cuSOLVER handles, kernels loaded)."""
    for streamed in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512)).to(torch.bfloat16)
        model = model if streamed else model.to(device)
        minipissa.apply(model, targets=["0", "1"], device=device if streamed else None, **options)
    free(device)


def train_step(model: Any, device: str, vocab: int, seq: int) -> dict[str, Any]:
    """One forward + backward + AdamW step over A and B at batch 1 x ``seq``, gradient checkpointing on (twice: the
    first allocates the optimizer state; the second is the steady step)."""
    model.to(device)  # what apply() left in host memory (the rotary buffers) follows; the layers move nothing
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the older name before
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda(device))
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, Any] = {"trainable_params_m": round(sum(p.numel() for p in params) / 1e6, 1)}
    for step in (1, 2):
        start = start_clock(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out |= stop_clock(device, start, f"step{step}")
        out[f"step{step}_loss"] = round(float(loss.detach()), 4)
        log(f"train step {step}: {out}")
    return out


def part_a_one(args: argparse.Namespace, device: str, pool: models.Pool, options: dict[str, Any]) -> dict[str, Any]:
    """One init of part (a) from ``pool``, then its training step; the record (a failure named in it)."""
    shape = "tiny-70b" if args.tiny else "70b"
    model, config = models.meta_llama(shape, args.layers)
    feed = "mapping road: a pool of pinned host tensors, 4 per shape"
    record: dict[str, Any] = {"bench": "stream_init", "part": "a", "shape": shape, "layers": config.num_hidden_layers,
                              **shown(options), "feed": feed}  # fmt: skip
    try:
        start = start_clock(device)
        label = f"a qi={options['quant_iters']} dq={options['double_quant']}"
        minipissa.apply(model, targets="all-linear", device=device, weights=pool, progress=ticker(label), **options)
        record |= stop_clock(device, start, "init")
        layers: dict[str, Any] = dict(minipissa.pissa_layers(model))
        record["matrices"] = len(layers)
        record["target_params_b"] = round(sum(math.prod(layer.weight.shape) for layer in layers.values()) / 1e9, 2)
        record["residual_gib"] = round(sum(layer.weight.bytes for layer in layers.values()) / 2**30, 2)
        log(f"init done: {record}")
    except Exception as e:  # noqa: BLE001 - reported, the next configuration still runs
        return record | failed(e, device)
    if not args.no_step:
        try:
            record |= train_step(model, device, config.vocab_size, 64 if args.tiny else 512)
        except Exception as e:  # noqa: BLE001
            record |= {f"step_{k}": v for k, v in failed(e, device).items()}
    record["host_peak_gib"] = host_peak_gib()
    return record


def part_a(args: argparse.Namespace, device: str) -> None:
    shape = "tiny-70b" if args.tiny else "70b"
    model, _ = models.meta_llama(shape, args.layers)
    log(f"part a: generating the pool for {shape} ...")
    start = time.perf_counter()
    pool = models.Pool(model, 4, "cuda" if cuda(device) else "cpu")
    seconds = round(time.perf_counter() - start, 2)
    generation = {"pool_gib": round(pool.bytes / 2**30, 2), "pool_generation_seconds": seconds}
    log(f"pool: {generation}")
    del model
    warm_up(device, init_options(args, 1, False))
    for quant_iters, double_quant in itertools.product(args.quant_iters, args.double_quant_values):
        record = part_a_one(args, device, pool, init_options(args, quant_iters, double_quant))
        emit(record | generation, args.out)
        free(device)  # the adapted model is gone with part_a_one's frame
    del pool
    free(device)


def same_layers(a: nn.Module, b: nn.Module) -> dict[str, Any]:
    """How many adapted layers hold the same state (A, B, A0, B0, codes and statistics, bias) bit for bit."""
    la, lb = dict(minipissa.pissa_layers(a)), dict(minipissa.pissa_layers(b))
    same = 0
    for name, layer in la.items():
        sa, sb = layer.state_dict(), lb[name].state_dict()
        same += sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)
    return {"layers_compared": len(la), "layers_bit_identical": same}


def streamed_b(args: argparse.Namespace, device: str, path: Path, options: dict[str, Any], cold: bool) -> Any:
    """Meta model + checkpoint, streamed onto ``device`` (the page cache evicted first if ``cold``)."""
    shape = "tiny-7b" if args.tiny else "7b"
    model, _ = models.meta_llama(shape, args.layers)
    evicted = models.evict(path) if cold else False
    which = "streamed_cold" if cold else "streamed_warm"
    start = start_clock(device)
    minipissa.apply(model, targets="all-linear", device=device, weights=path, progress=ticker(f"b {which}"), **options)
    timing = stop_clock(device, start, which) | ({"streamed_cold_evicted": evicted} if cold else {})
    log(f"{which}: {timing}")
    return model, timing


def part_b(args: argparse.Namespace, device: str) -> None:
    shape = "tiny-7b" if args.tiny else "7b"
    model, config = models.meta_llama(shape, args.layers)
    path = Path(args.ckpt) / f"{shape}-{config.num_hidden_layers}layers"
    options = init_options(args, args.quant_iters[0], args.double_quant_values[0])
    record: dict[str, Any] = {"bench": "stream_init", "part": "b", "shape": shape, "layers": config.num_hidden_layers,
                              "checkpoint": str(path), **shown(options)}  # fmt: skip
    try:
        log(f"part b: checkpoint at {path} ...")
        shard = (1 << 18) if args.tiny else 5 * 10**9  # tiny: several shards all the same
        record |= models.write_checkpoint(model, path, shard, "cuda" if cuda(device) else "cpu")
        del model
        warm_up(device, options)
        record |= models.read_every_tensor(path)
        log(f"read: {record}")
        streamed, timing = streamed_b(args, device, path, options, cold=True)
        record |= timing
        streamed.to("cpu")  # kept for the comparison, off the GPU
        record |= streamed_b(args, device, path, options, cold=False)[1]
        free(device)
        start = time.perf_counter()
        reference = models.in_place_model(path, shape, args.layers, device)
        record["in_place_load_seconds"] = round(time.perf_counter() - start, 2)
        start = start_clock(device)
        minipissa.apply(reference, targets="all-linear", progress=ticker("b in place"), **options)
        record |= stop_clock(device, start, "in_place")
        record["warm_over_in_place"] = round(record["streamed_warm_seconds"] / max(record["in_place_seconds"], 1e-3), 2)
        record |= same_layers(streamed, reference)
    except Exception as e:  # noqa: BLE001 - reported with what was measured before
        record |= failed(e, device)
    record["host_peak_gib"] = host_peak_gib()
    emit(record, args.out)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="cut the models to N layers (a quick run)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--niter", type=int, default=4)
    parser.add_argument("--quant-iters", type=int, nargs="+", default=[1], help="an init each (b: the first)")
    parser.add_argument("--double-quant", nargs="?", const="on", choices=["off", "on", "both"], default="off")
    parser.add_argument("--adapter-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--ckpt", default="/tmp/minipissa_ckpt", help="part b's checkpoints go under it")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (runs on a CPU in seconds)")
    parser.add_argument("--no-step", action="store_true", help="part a without the training step")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = parser.parse_args()
    args.double_quant_values = {"off": [False], "on": [True], "both": [False, True]}[args.double_quant]
    return args


def main() -> None:
    args = arguments()
    log(f"torch {torch.__version__}, device {args.device}, args {vars(args)}")
    if args.part in ("a", "all"):
        part_a(args, args.device)
    if args.part in ("b", "all"):
        part_b(args, args.device)


if __name__ == "__main__":
    main()
