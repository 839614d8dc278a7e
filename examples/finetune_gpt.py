"""PiSSA vs LoRA on a small GPT, in a plain training loop, on real text that every Python install has offline.

1. Train a byte-level BPE tokenizer (a few seconds) and wrap it in a local ``tiktoken.Encoding``.
2. Pretrain a small GPT (plain torch, about 2M parameters) on the standard library's code (docstrings removed).
3. Fine-tune copies of it on the standard library's docstrings (English prose) with PiSSA and with LoRA: same rank,
   targets, steps and batches, each at its own learning rate (``--sweep`` re-runs the sweep that picked them).
4. Print the table of final train / held-out losses (and the frozen model's), write the loss curves.
5. Save the PiSSA adapter, convert it to a LoRA for the original weights, reload it, print the output difference.

    python examples/finetune_gpt.py             # defaults: about 2-3 minutes on 2 CPU cores
    python examples/finetune_gpt.py --sweep     # + the learning-rate sweep (about 10 more minutes)
    python examples/finetune_gpt.py --smoke     # seconds: a tiny model and a handful of steps
"""

from __future__ import annotations

import math
import time

import _bpe
import _corpus
import tiktoken
import torch
import torch.nn.functional as F
from _compare import Method, common_args, compare, describe_data, pretrain, print_table, setup, sweep, write_curves
from _convert_check import check_conversion
from _train import evaluate
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm transformer block with GPT-2's layout (one fused qkv projection, 4x MLP with GELU)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        for name, p in self.named_parameters():
            if p.ndim == 2:  # GPT-2's init: N(0, 0.02), residual projections scaled down by depth
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn_out.weight", "proj.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied head: not an nn.Linear, so never an adapter target


# Sizes: (defaults, --smoke). The defaults were chosen to finish in about 2-3 minutes on 2 CPU cores.
SIZES = {
    "full": dict(dim=192, layers=4, heads=6, seq=128, batch=16, merges=1024, corpus_bytes=10**9, pretrain=400,
                 steps=200, rank=8, eval_batches=16, log_every=50, eval_every=50),
    "smoke": dict(dim=32, layers=1, heads=2, seq=32, batch=4, merges=64, corpus_bytes=300_000, pretrain=6,
                  steps=6, rank=2, eval_batches=2, log_every=3, eval_every=3),
}  # fmt: skip
# Learning rates picked by `--sweep` (held-out loss after the default 200 steps; numbers in examples/README.md).
PISSA_LR, LORA_LR = 1e-2, 3e-2
SWEEP_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
TARGETS = "all-linear"  # qkv, attn_out, fc, proj in every block


def tokens_of(enc: tiktoken.Encoding, texts: list[str]) -> Tensor:
    """One stream: the documents' tokens joined by <|endoftext|>."""
    eot = enc.eot_token
    ids: list[int] = []
    for doc in enc.encode_ordinary_batch(texts):
        ids.extend(doc)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def main() -> None:
    args = common_args(__doc__.splitlines()[0]).parse_args()
    size = SIZES["smoke" if args.smoke else "full"]
    steps = args.steps or size["steps"]
    rank = args.rank or size["rank"]
    setup(args)
    started = time.perf_counter()

    code, docs = _corpus.load(size["corpus_bytes"])
    enc = _bpe.build_encoding(code.train, size["merges"])
    pre_train, pre_held = tokens_of(enc, code.train), tokens_of(enc, code.heldout)
    ft_data = (tokens_of(enc, docs.train), tokens_of(enc, docs.heldout))
    merges = enc.n_vocab - 257
    tokenizer = f"tiktoken Encoding, {enc.n_vocab} tokens (256 bytes + {merges} merges learned here + <|endoftext|>)"
    describe_data(tokenizer, (pre_train, pre_held), ft_data, started)

    model = GPT(enc.n_vocab, size["dim"], size["layers"], size["heads"], size["seq"])
    original, cfg = pretrain(model, (pre_train, pre_held), size, args, steps)
    methods = [
        Method("PiSSA", PISSA_LR, {"init": "pissa"}, SWEEP_LRS),
        Method("LoRA", LORA_LR, {"init": "lora"}, SWEEP_LRS),
    ]
    if args.sweep:
        best = sweep(model, methods, ft_data, cfg, rank, TARGETS)
        for m in methods:
            m.lr = best[m.name]
    results = compare(model, methods, ft_data, cfg, rank, TARGETS)
    print_table(results, cfg)
    write_curves(results, args.out, "gpt")

    print()
    pissa = results[1].model
    assert pissa is not None
    check_conversion(pissa, original, ft_data[1][: 2 * size["seq"]].view(2, -1).to(args.device), args.out, "gpt")
    print(f"pretrained-model held-out loss on code: {evaluate(original, pre_held, cfg):.3f}")
    print(f"total wall time {time.perf_counter() - started:.1f} s on {args.device}")


if __name__ == "__main__":
    main()
