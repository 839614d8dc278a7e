"""The hand-written training loop shared by the examples: random windows of a token stream, AdamW, warmup + cosine.

Nothing here knows about PiSSA: the optimizer sees whatever parameters require grad, which after
``minipissa.apply`` are only the adapters' A and B.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TrainConfig:
    steps: int
    lr: float
    batch: int
    seq: int
    device: str = "cpu"
    seed: int = 0
    weight_decay: float = 0.0  # applied to 2-D non-adapter weights only (pretraining); never to A and B
    warmup: float = 0.05  # fraction of steps
    log_every: int = 25
    eval_every: int = 50
    eval_batches: int = 16


@dataclass
class Curve:
    """What one training run did: per-step train loss, periodic held-out loss, speed."""

    label: str
    lr: float
    steps: list[int] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    heldout: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_s: float = 0.0


def random_windows(tokens: Tensor, batch: int, seq: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(inputs, next-token targets), each (batch, seq), from random offsets of a 1-D token stream."""
    starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=generator)
    chunk = torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tensor, cfg: TrainConfig) -> float:
    """Mean next-token loss over ``cfg.eval_batches`` fixed, evenly spaced windows (same windows every call)."""
    was_training = model.training
    model.eval()
    count = cfg.eval_batches * cfg.batch
    starts = torch.linspace(0, len(tokens) - cfg.seq - 2, count).long().tolist()
    total = 0.0
    for i in range(0, count, cfg.batch):
        chunk = torch.stack([tokens[s : s + cfg.seq + 1] for s in starts[i : i + cfg.batch]]).to(cfg.device)
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten()).item()
    model.train(was_training)
    return total / cfg.eval_batches


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    warmup = max(1, int(cfg.warmup * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay pulls parameters toward zero. For LoRA's B that is the identity update, but PiSSA's A and B
    # start at the principal components, so decay would erase the pretrained knowledge they hold: no decay on
    # adapters (the spec recommends this), and none on biases / norms either (the usual convention).
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_adapter = name.endswith((".A", ".B"))
        (decay if p.ndim == 2 and not is_adapter else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))


def train(model: nn.Module, train_tokens: Tensor, heldout_tokens: Tensor, cfg: TrainConfig, label: str) -> Curve:
    """Train ``model`` in place; print step, loss, tokens/s; return the curve."""
    model.to(cfg.device).train()
    optimizer = make_optimizer(model, cfg)
    # The same seed gives every method the same batches in the same order: a like-for-like comparison.
    generator = torch.Generator().manual_seed(cfg.seed)
    curve = Curve(label, cfg.lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start = last_time = time.perf_counter()
    last_step, eval_seconds, total_eval = 0, 0.0, 0.0  # evaluation time is left out of tokens/s
    for step in range(1, cfg.steps + 1):
        x, y = random_windows(train_tokens, cfg.batch, cfg.seq, generator)
        x, y = x.to(cfg.device), y.to(cfg.device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, cfg)
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        curve.steps.append(step)
        curve.train.append(loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            eval_start = time.perf_counter()
            curve.eval_steps.append(step)
            curve.heldout.append(evaluate(model, heldout_tokens, cfg))
            eval_seconds += time.perf_counter() - eval_start
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            speed = (step - last_step) * cfg.batch * cfg.seq / (now - last_time - eval_seconds)
            recent = curve.train[-(step - last_step) :]
            held = f"  held-out {curve.heldout[-1]:.3f}" if curve.eval_steps and curve.eval_steps[-1] == step else ""
            print(
                f"  [{label}] step {step:4d}/{cfg.steps}  loss {sum(recent) / len(recent):.3f}{held}  "
                f"{speed:,.0f} tok/s",
                flush=True,
            )
            last_time, last_step, total_eval, eval_seconds = now, step, total_eval + eval_seconds, 0.0
    curve.seconds = time.perf_counter() - start
    curve.tokens_per_s = cfg.steps * cfg.batch * cfg.seq / (curve.seconds - total_eval)
    return curve
