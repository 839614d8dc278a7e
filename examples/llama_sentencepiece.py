"""PiSSA (exact SVD) vs PiSSA (randomized SVD, niter 4) vs LoRA on a Llama-style model, tokenized by SentencePiece.

The same flow as finetune_gpt.py, with a model whose modules carry Llama's names (``model.layers.N.self_attn.q_proj``,
``...mlp.gate_proj``, ``lm_head``), so targets read as users write them: ``--targets q_proj,v_proj`` or the default
``all-linear`` (every projection, not the lm_head). The tokenizer is a SentencePiece BPE model trained here, in
seconds, on the pretraining corpus.

    python examples/llama_sentencepiece.py                 # defaults: a few minutes on 2 CPU cores
    python examples/llama_sentencepiece.py --sweep         # + the learning-rate sweep
    python examples/llama_sentencepiece.py --smoke         # seconds
"""

from __future__ import annotations

import io
import time

import _corpus
import sentencepiece as spm
import torch
import torch.nn.functional as F
from _compare import (
    Method,
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
from torch import Tensor, nn

import minipissa


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding, Llama's "rotate half" form."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention: fewer key/value heads than query heads, as in Llama 2 70B and Llama 3."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Attention(dim, heads, kv_heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, kv_heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head_dim = dim // heads

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, device=idx.device) / self.head_dim)
        angles = torch.outer(torch.arange(t, device=idx.device), inv_freq).repeat(1, 2)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Module tree as in transformers: ``model.layers.N.self_attn.q_proj`` ... and an untied ``lm_head``."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.model = LlamaModel(vocab, dim, layers, heads, kv_heads, hidden)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        return self.lm_head(self.model(idx))


def train_sentencepiece(texts: list[str], vocab_size: int, max_chars: int = 2_000_000) -> spm.SentencePieceProcessor:
    """A BPE SentencePiece model trained in memory on the first ``max_chars`` of ``texts``, one line a sentence.

    Code needs its whitespace: no normalization, runs of spaces kept, and "\\n" as a piece of its own (SentencePiece
    reads one sentence per line, so it would otherwise never see a newline). Byte fallback: no <unk> ever.
    """
    lines: list[str] = []
    for text in texts:
        lines.extend(text.split("\n"))
        max_chars -= len(text)
        if max_chars <= 0:
            break
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, user_defined_symbols=["\n"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=8192, num_threads=2, minloglevel=2, character_coverage=0.995,
    )  # fmt: skip
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


def tokens_of(sp: spm.SentencePieceProcessor, texts: list[str]) -> Tensor:
    """One stream: each document's pieces followed by </s>."""
    ids: list[int] = []
    for doc in sp.encode(texts):
        ids.extend(doc)
        ids.append(sp.eos_id())
    return torch.tensor(ids, dtype=torch.long)


SIZES = {
    "full": dict(dim=192, layers=4, heads=6, kv_heads=2, hidden=512, seq=128, batch=16, vocab=1024,
                 corpus_bytes=10**9, pretrain=400, steps=200, rank=8, eval_batches=16, log_every=50, eval_every=50),
    "smoke": dict(dim=32, layers=1, heads=2, kv_heads=1, hidden=64, seq=32, batch=4, vocab=400,
                  corpus_bytes=300_000, pretrain=6, steps=6, rank=2, eval_batches=2, log_every=3, eval_every=3),
}  # fmt: skip
# Learning rates picked by `--sweep` (held-out loss after the default steps; numbers in examples/README.md).
PISSA_LR, LORA_LR = 1e-2, 3e-2
SWEEP_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def init_error(exact: nn.Module, fast: nn.Module) -> list[float]:
    """Per module: ||P_fast - P_exact||_F / ||P_exact||_F of the initial rank-r parts s·B0·A0."""
    errors = []
    fast_layers = dict(minipissa.pissa_layers(fast))
    for name, layer in minipissa.pissa_layers(exact):
        p = layer.delta_weight(layer.A0, layer.B0)
        q = fast_layers[name].delta_weight(fast_layers[name].A0, fast_layers[name].B0)
        errors.append(((q - p).norm() / p.norm()).item())
    return errors


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated, e.g. q_proj,v_proj")
    args = parser.parse_args()
    size = SIZES["smoke" if args.smoke else "full"]
    steps, rank = args.steps or size["steps"], args.rank or size["rank"]
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    setup(args)
    started = time.perf_counter()

    code, docs = _corpus.load(size["corpus_bytes"])
    sp = train_sentencepiece(code.train, size["vocab"])
    pre_train, pre_held = tokens_of(sp, code.train), tokens_of(sp, code.heldout)
    ft_data = (tokens_of(sp, docs.train), tokens_of(sp, docs.heldout))
    tokenizer = f"SentencePiece BPE, {sp.vocab_size()} pieces, trained here on the code corpus"
    describe_data(tokenizer, (pre_train, pre_held), ft_data, started)

    dims = (size["dim"], size["layers"], size["heads"], size["kv_heads"], size["hidden"])
    model = LlamaForCausalLM(sp.vocab_size(), *dims)
    original, cfg = pretrain(model, (pre_train, pre_held), size, args, steps)
    methods = [
        Method("PiSSA exact", PISSA_LR, {"init": "pissa"}, SWEEP_LRS),
        # The randomized init matches the exact one to ~1e-5 here (printed below), so it takes the exact one's lr.
        Method("PiSSA niter=4", PISSA_LR, {"init": "pissa", "niter": 4}),
        Method("LoRA", LORA_LR, {"init": "lora"}, SWEEP_LRS),
    ]
    if args.sweep:
        best = sweep(model, methods, ft_data, cfg, rank, targets)
        for m in methods:
            m.lr = best.get(m.name, best["PiSSA exact"])
    results = compare(model, methods, ft_data, cfg, rank, targets)
    print_table(results, cfg)
    write_curves(results, args.out, "llama")

    exact, fast = results[1].model, results[2].model
    assert exact is not None and fast is not None
    errors = sorted(init_error(exact, fast))
    print(
        f"\nrandomized init (niter 4, oversample 4r) vs exact SVD, relative error of the rank-{rank} part: median "
        f"{errors[len(errors) // 2]:.2g}, max {errors[-1]:.2g} over {len(errors)} modules"
    )
    sample = ft_data[1][: 2 * size["seq"]].view(2, -1).to(args.device)
    check_conversion(exact, original, sample, args.out, "llama")
    wall = time.perf_counter() - started
    write_results(results, cfg, args.out, "llama", wall)
    print(f"total wall time {wall:.1f} s on {args.device}")


if __name__ == "__main__":
    main()
