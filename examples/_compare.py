"""The flow both examples share: fine-tune copies of one pretrained model with each method, sweep learning rates,
print the results table, write the loss curves (CSV, and PNG when matplotlib is installed)."""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from _train import Curve, TrainConfig, evaluate, train
from torch import Tensor, nn

import minipissa


@dataclass
class Method:
    """One way to fine-tune: a name, its learning rate, and the keyword arguments for ``minipissa.apply``."""

    name: str
    lr: float
    apply_kwargs: dict[str, Any] = field(default_factory=dict)
    sweep_lrs: tuple[float, ...] = ()


@dataclass
class Result:
    name: str
    lr: float | None
    train_loss: float
    heldout_loss: float
    curve: Curve | None = None
    model: nn.Module | None = None


def pyplot() -> Any | None:
    """matplotlib.pyplot on a file-only backend, or None (said once) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipped the PNG (pip install matplotlib to get it)")
        return None
    return plt


def setup(args: argparse.Namespace) -> None:
    """Seed every RNG, create the output directory; in --smoke mode use one thread (tiny matrices gain nothing
    from more, and on a busy CI machine spare threads only fight over the cores)."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        torch.set_num_threads(1)


def common_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None, help="adapter rank (alpha = rank)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--smoke", action="store_true", help="tiny model, a handful of steps (for tests)")
    parser.add_argument("--sweep", action="store_true", help="also sweep each method's learning rate first")
    return parser


def describe_data(tokenizer: str, pretrain: tuple[Tensor, Tensor], finetune: tuple[Tensor, Tensor], t0: float) -> None:
    print(
        f"tokenizer: {tokenizer}\npretraining corpus (stdlib code, docstrings removed): {len(pretrain[0]):,} train / "
        f"{len(pretrain[1]):,} held-out tokens\nfine-tuning corpus (stdlib docstrings): {len(finetune[0]):,} train / "
        f"{len(finetune[1]):,} held-out tokens  [{time.perf_counter() - t0:.1f} s]"
    )


def pretrain(
    model: nn.Module, data: tuple[Tensor, Tensor], size: dict[str, Any], args: argparse.Namespace, steps: int
) -> tuple[nn.Module, TrainConfig]:
    """Pretrain ``model`` on code in place; return a copy of those original weights (what the converted LoRA is
    reloaded onto) and the fine-tuning config every method shares (its lr is set per method)."""
    print(f"\npretraining a model with {sum(p.numel() for p in model.parameters()):,} parameters on code")
    base_cfg = TrainConfig(
        steps=args.pretrain_steps or size["pretrain"], lr=3e-3, batch=size["batch"], seq=size["seq"],
        device=args.device, seed=args.seed, weight_decay=0.1, log_every=size["log_every"] * 2,
        eval_every=size["eval_every"] * 4, eval_batches=size["eval_batches"],
    )  # fmt: skip
    train(model, *data, base_cfg, label="pretrain")
    model.eval()
    cfg = TrainConfig(
        steps=steps, lr=0.0, batch=size["batch"], seq=size["seq"], device=args.device, seed=args.seed + 1,
        log_every=size["log_every"], eval_every=size["eval_every"], eval_batches=size["eval_batches"],
    )  # fmt: skip
    return copy.deepcopy(model), cfg


def finetune(
    pretrained: nn.Module,
    method: Method,
    lr: float,
    data: tuple[Tensor, Tensor],
    cfg: TrainConfig,
    rank: int,
    targets: Any,
    verbose: bool = False,
) -> Result:
    """Adapt a fresh copy of ``pretrained`` with ``method`` at ``lr``, train it, evaluate it."""
    model = copy.deepcopy(pretrained)
    # alpha = r (scaling 1) and dropout 0 for every method: the PiSSA paper's setting, and the same for LoRA so
    # that the two differ only in their initialisation (and the learning rate each one wants).
    minipissa.apply(model, rank, targets, alpha=rank, dropout=0.0, seed=cfg.seed, **method.apply_kwargs)
    if verbose:
        print(minipissa.summary(model))
    run_cfg = dataclasses.replace(cfg, lr=lr)
    curve = train(model, data[0], data[1], run_cfg, label=f"{method.name} lr={lr:g}")
    return Result(method.name, lr, evaluate(model, data[0], cfg), curve.heldout[-1], curve, model)


def sweep(
    pretrained: nn.Module, methods: list[Method], data: tuple[Tensor, Tensor], cfg: TrainConfig, rank: int, targets: Any
) -> dict[str, float]:
    """Each method at each of its ``sweep_lrs`` for the full step count; returns the best lr by validation loss.

    The validation set is the tail of the training stream (as long as the held-out set), cut off from training
    here, so the sweep never sees the held-out text that the final table reports.
    """
    cut = len(data[0]) - len(data[1])
    data = (data[0][:cut], data[0][cut:])
    best: dict[str, float] = {}
    rows = []
    for method in methods:
        if not method.sweep_lrs:
            continue
        scores = {}
        for lr in method.sweep_lrs:
            result = finetune(pretrained, method, lr, data, cfg, rank, targets)
            scores[lr] = result.heldout_loss
            rows.append((method.name, lr, result.train_loss, result.heldout_loss))
        best[method.name] = min(scores, key=lambda lr: scores[lr])
    print("\nlearning-rate sweep (final losses; validation = the last part of the training text, held out here)")
    print(f"{'method':<16} {'lr':>8} {'train':>8} {'valid':>9}")
    for name, lr, tr, ho in rows:
        mark = "  <- best" if best.get(name) == lr else ""
        print(f"{name:<16} {lr:>8g} {tr:>8.3f} {ho:>9.3f}{mark}")
    return best


def compare(
    pretrained: nn.Module,
    methods: list[Method],
    data: tuple[Tensor, Tensor],
    cfg: TrainConfig,
    rank: int,
    targets: Any,
) -> list[Result]:
    """The frozen model, then each method at its own lr."""
    results = [Result("frozen", None, evaluate(pretrained, data[0], cfg), evaluate(pretrained, data[1], cfg))]
    for i, method in enumerate(methods):
        print(f"\nfine-tuning with {method.name} (lr {method.lr:g}, rank {rank}, targets {targets})")
        results.append(finetune(pretrained, method, method.lr, data, cfg, rank, targets, verbose=i == 0))
    return results


def print_table(results: list[Result], cfg: TrainConfig) -> None:
    print(f"\nfinal losses after {cfg.steps} fine-tuning steps (mean next-token cross-entropy, lower is better)")
    print(f"{'method':<16} {'lr':>8} {'train':>8} {'held-out':>9} {'seconds':>8} {'tok/s':>8}")
    for r in results:
        lr = "-" if r.lr is None else f"{r.lr:g}"
        secs = "-" if r.curve is None else f"{r.curve.seconds:.1f}"
        speed = "-" if r.curve is None else f"{r.curve.tokens_per_s:,.0f}"
        print(f"{r.name:<16} {lr:>8} {r.train_loss:>8.3f} {r.heldout_loss:>9.3f} {secs:>8} {speed:>8}")


def machine() -> dict[str, Any]:
    """Where a run was measured: CPU model, cores, torch threads, versions, date (printed beside its figures)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_results(results: list[Result], cfg: TrainConfig, out: str, stem: str, seconds: float) -> None:
    """``<stem>_results.json``: the final table, each held-out curve, the wall time and :func:`machine` (the
    figures in the READMEs are rendered from it by benchmarks/figures.py, not typed)."""
    rows = [
        {
            "method": r.name,
            "lr": r.lr,
            "train_loss": r.train_loss,
            "heldout_loss": r.heldout_loss,
            "seconds": None if r.curve is None else r.curve.seconds,
            "tokens_per_s": None if r.curve is None else r.curve.tokens_per_s,
            "heldout_curve": None if r.curve is None else dict(zip(r.curve.eval_steps, r.curve.heldout, strict=True)),
        }
        for r in results
    ]
    path = os.path.join(out, f"{stem}_results.json")
    run = {"steps": cfg.steps, "batch": cfg.batch, "seq": cfg.seq, "wall_seconds": seconds}
    with open(path, "w") as f:
        json.dump({"machine": machine(), "run": run, "rows": rows}, f, indent=1)
    print(f"wrote {path}")


def write_curves(results: list[Result], out: str, stem: str, start: dict[str, float] | None = None) -> None:
    """``<stem>_curves.csv`` (method, step, train_loss, heldout_loss) and ``<stem>_curves.png``.

    ``start``: held-out loss at step 0 by method name, for inits that change the function (QPiSSA / QLoRA: the
    4-bit base); a method not in it starts at the frozen model's loss."""
    curves = [r.curve for r in results if r.curve is not None]
    path = os.path.join(out, f"{stem}_curves.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "lr", "step", "train_loss", "heldout_loss"])
        for c in curves:
            held = dict(zip(c.eval_steps, c.heldout, strict=True))
            for step, loss in zip(c.steps, c.train, strict=True):
                heldout = f"{held[step]:.5f}" if step in held else ""
                writer.writerow([c.label.rsplit(" lr=", 1)[0], c.lr, step, f"{loss:.5f}", heldout])
    print(f"wrote {path}")
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    frozen = results[0].heldout_loss
    for c in curves:
        k = max(1, len(c.train) // 20)  # moving average: single-batch losses are noisy
        windows = [c.train[max(0, i - k + 1) : i + 1] for i in range(len(c.train))]
        smooth = [sum(w) / len(w) for w in windows]
        axes[0].plot(c.steps, smooth, label=c.label)
        # Step 0 is the frozen model for every unquantized method: PiSSA's and LoRA's inits leave the function as is.
        step0 = (start or {}).get(c.label.rsplit(" lr=", 1)[0], frozen)
        axes[1].plot([0, *c.eval_steps], [step0, *c.heldout], marker="o", label=c.label)
    axes[1].axhline(frozen, color="gray", linestyle="--", label="frozen")
    axes[0].set_title("train loss (moving average)")
    axes[1].set_title("held-out loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    axes[0].set_ylabel("cross-entropy")
    fig.tight_layout()
    path = os.path.join(out, f"{stem}_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
