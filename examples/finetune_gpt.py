"""PiSSA vs LoRA on a small GPT, in a plain training loop, on real text that every Python install has offline.

1. Train a byte-level BPE tokenizer (a few seconds) and wrap it in a local ``tiktoken.Encoding``.
2. Pretrain a small GPT (plain torch, about 2M parameters) on the standard library's code (docstrings removed).
3. Fine-tune copies of it on the standard library's docstrings (English prose) with PiSSA and with LoRA: same rank,
   targets, steps and batches, each at its own learning rate (``--sweep`` re-runs the sweep that picked them).
4. Print the table of final train / held-out losses (and the frozen model's), write the loss curves.
5. Save the PiSSA adapter, convert it to a LoRA for the original weights, reload it, print the output difference.
6. With ``--quantized``, also QPiSSA and QLoRA (the frozen base in 4-bit NF4), and for those two the base's memory,
   the quantization error at init against QLoRA's, and how far the step-0 model is from the unquantized one.

    python examples/finetune_gpt.py             # defaults: about 2-3 minutes on 2 CPU cores
    python examples/finetune_gpt.py --sweep     # + the learning-rate sweep (about 10 more minutes)
    python examples/finetune_gpt.py --quantized # + QPiSSA and QLoRA (about 1-2 more minutes)
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
from _compare import (
    Method,
    Result,
    common_args,
    compare,
    describe_data,
    pretrain,
    print_table,
    setup,
    sweep,
    write_curves,
    write_results,
)
from _convert_check import check_conversion
from _train import TrainConfig, evaluate
from torch import Tensor, nn

import minipissa


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
QPISSA_LR, QLORA_LR = 1e-2, 3e-2  # --quantized (picked by `--sweep --quantized`)
QPISSA_ITERS = 5  # the authors' multi-iteration QPiSSA: the adapter chosen 5 times against the quantizer
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


@torch.no_grad()
def mean_kl(reference: nn.Module, model: nn.Module, tokens: Tensor, cfg: TrainConfig) -> float:
    """Mean per-token KL(reference || model) in nats, over the same fixed windows as ``evaluate``."""
    count = cfg.eval_batches * cfg.batch
    starts = torch.linspace(0, len(tokens) - cfg.seq - 2, count).long().tolist()
    total = 0.0
    for i in range(0, count, cfg.batch):
        x = torch.stack([tokens[s : s + cfg.seq] for s in starts[i : i + cfg.batch]]).to(cfg.device)
        p, q = (F.log_softmax(m(x).float(), dim=-1) for m in (reference, model))
        total += F.kl_div(q.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean").item()
    return total / cfg.eval_batches


def quantized_report(results: list[Result], original: nn.Module, heldout: Tensor, cfg: TrainConfig) -> dict[str, float]:
    """For each method with a 4-bit base: the frozen base's memory, the quantization error at init against
    QLoRA's, and the step-0 model (``minipissa.original``: deq(nf4(W_res)) + s·B0·A0) against the unquantized
    one. Returns the step-0 held-out loss by method name (for the curves)."""
    frozen = results[0].heldout_loss
    print(
        "\n4-bit base at init, over the adapted layers' frozen weights (biases aside); error = ||W - W_init||_F / "
        "||W||_F,\nreduction = 1 - error / QLoRA's error, averaged over layers; step 0 = the model before any "
        "training,\nKL = mean per-token KL(unquantized model || step-0 model) on the held-out windows"
    )
    print(
        f"{'method':<16} {'fp32 MiB':>8} {'NF4 MiB':>8} {'error':>7} {'QLoRA':>7} {'reduction':>9} "
        f"{'held-out@0':>10} {'vs frozen':>9} {'KL@0':>9}"
    )
    start = {}
    for r in results:
        layers = [layer for _, layer in minipissa.pissa_layers(r.model)] if r.model is not None else []
        if not layers or not all(layer.quantized for layer in layers):
            continue
        dense = sum(math.prod(layer.weight.shape) * layer.weight.dtype.itemsize for layer in layers) / 2**20
        nf4 = sum(layer.weight.bytes for layer in layers) / 2**20
        error = sum(layer.info["nf4_error"] for layer in layers) / len(layers)
        qlora = sum(layer.info["qlora_error"] for layer in layers) / len(layers)
        reduction = sum(1 - layer.info["nf4_error"] / layer.info["qlora_error"] for layer in layers) / len(layers)
        with minipissa.original(r.model):
            start[r.name] = evaluate(r.model, heldout, cfg)
            kl = mean_kl(original, r.model, heldout, cfg)
        print(
            f"{r.name:<16} {dense:>8.3f} {nf4:>8.3f} {error:>7.4f} {qlora:>7.4f} {reduction:>9.3f} "
            f"{start[r.name]:>10.4f} {start[r.name] - frozen:>+9.4f} {kl:>9.2e}"
        )
    print(f"{'frozen (fp32)':<16} {'':>8} {'':>8} {'':>7} {'':>7} {'':>9} {frozen:>10.4f} {0.0:>+9.4f} {0.0:>9.2e}")
    return start


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--quantized", action="store_true", help="also QPiSSA and QLoRA (4-bit NF4 base)")
    args = parser.parse_args()
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
    if args.quantized:
        methods += [
            Method("QPiSSA", QPISSA_LR, {"init": "pissa", "quantize": "nf4", "quant_iters": QPISSA_ITERS}, SWEEP_LRS),
            Method("QLoRA", QLORA_LR, {"init": "lora", "quantize": "nf4"}, SWEEP_LRS),
        ]
    if args.sweep:
        best = sweep(model, methods, ft_data, cfg, rank, TARGETS)
        for m in methods:
            m.lr = best[m.name]
    results = compare(model, methods, ft_data, cfg, rank, TARGETS)
    print_table(results, cfg)
    start = quantized_report(results, original, ft_data[1], cfg) if args.quantized else None
    write_curves(results, args.out, "gpt", start)

    print()
    pissa = results[1].model
    assert pissa is not None
    check_conversion(pissa, original, ft_data[1][: 2 * size["seq"]].view(2, -1).to(args.device), args.out, "gpt")
    print(f"pretrained-model held-out loss on code: {evaluate(original, pre_held, cfg):.3f}")
    wall = time.perf_counter() - started
    write_results(results, cfg, args.out, "gpt", wall)
    print(f"total wall time {wall:.1f} s on {args.device}")


if __name__ == "__main__":
    main()
