"""Tiny models for tests: plain torch, and transformers models built from configs (no download)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def tiny_llama(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (32, 48, 24), bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:], strict=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D, re-declared so layer tests need no transformers: weight (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.reshape(*x.shape[:-1], self.nf)


def train_steps(model: nn.Module, x: torch.Tensor, steps: int, lr: float = 1e-2) -> torch.optim.Optimizer:
    """A few AdamW steps on mean(model(x)^2) over the parameters that require grad; the optimizer, for resuming."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Modules built inside have their parameters on the meta device and their buffers real (as accelerate's
    init_empty_weights() does, without accelerate): the road to ``apply(..., weights=...)`` for models whose
    constructors compute buffers (rotary inv_freq, BERT's position_ids). A parameter assigned again (a tied one)
    stays the one Parameter."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
