"""stream_init.py's models and weights: Llama shapes on the meta device, a pool of generated host tensors fed through
the mapping road, a random safetensors checkpoint written as Hugging Face shards it, and its read timing."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHAPES = {  # name: (hidden, intermediate, heads, kv heads, vocab, layers)
    "70b": (8192, 28672, 64, 8, 32000, 80),
    "7b": (4096, 11008, 32, 32, 32000, 32),
    "tiny-70b": (256, 688, 8, 2, 512, 2),
    "tiny-7b": (128, 344, 4, 4, 256, 2),
}
INDEX = "model.safetensors.index.json"


def meta_llama(shape: str, layers: int | None) -> tuple[Any, Any]:
    """LlamaForCausalLM of ``shape`` on the meta device, bfloat16, untied; its rotary embedding (computed buffers,
    which no checkpoint holds) rebuilt in host memory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hidden, inter, heads, kv, vocab, default_layers = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or default_layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096, tie_word_embeddings=False,
        use_cache=False,
    )  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    return model.eval(), config


def random_tensor(shape: tuple[int, ...], generator_device: str, seed: int) -> torch.Tensor:
    """bfloat16 N(0, 0.02^2) in host memory, made on ``generator_device`` (fast on a GPU); 1-D (norms): ones."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator(device=generator_device).manual_seed(seed)
    t = torch.randn(shape, generator=g, device=generator_device, dtype=torch.float32).mul_(0.02)
    return t.to(torch.bfloat16).cpu()


class Pool(Mapping):
    """A meta model's state dict as ``per_shape`` host tensors per 2-D shape (pinned where CUDA is), dealt out to
    the keys of that shape in turn (a key always gets the same one): a key's tensor on demand, as the mapping road
    asks for them (one at a time)."""

    def __init__(self, model: nn.Module, per_shape: int, generator_device: str) -> None:
        self.specs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        pin = generator_device.startswith("cuda")
        self.pool: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for i, shape in enumerate(sorted(set(self.specs.values()))):
            count = per_shape if len(shape) > 1 else 1
            made = [random_tensor(shape, generator_device, 1000 * i + j) for j in range(count)]
            self.pool[shape] = [t.pin_memory() if pin else t for t in made]
        seen: dict[tuple[int, ...], int] = {}
        self.choice = {}
        for key, shape in self.specs.items():
            self.choice[key] = seen.get(shape, 0) % len(self.pool[shape])
            seen[shape] = seen.get(shape, 0) + 1
        self.bytes = sum(t.numel() * t.element_size() for ts in self.pool.values() for t in ts)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.pool[self.specs[key]][self.choice[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def _shard_keys(specs: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """The keys in state-dict order, cut into shards of about ``shard_bytes`` of bfloat16."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in specs.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def write_checkpoint(model: nn.Module, path: Path, shard_bytes: int, generator_device: str) -> dict[str, Any]:
    """``model``'s state dict as random bfloat16 safetensors shards of about ``shard_bytes`` and an index, as Hugging
    Face writes them; nothing if ``path`` holds that index already."""
    from safetensors.torch import save_file

    if (path / INDEX).is_file():
        return {"checkpoint_written": False}
    path.mkdir(parents=True, exist_ok=True)
    specs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    groups = _shard_keys(specs, shard_bytes)
    start = time.perf_counter()
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: random_tensor(specs[k], generator_device, j) for j, k in enumerate(keys, start=10_000 * i)}
        save_file(tensors, str(path / f".{name}.partial"), metadata={"format": "pt"})
        os.replace(path / f".{name}.partial", path / name)
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
        print(f"  wrote {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    (path / f".{INDEX}.partial").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    os.replace(path / f".{INDEX}.partial", path / INDEX)  # last: a run cut short writes it all again
    return {"checkpoint_written": True, "write_seconds": round(time.perf_counter() - start, 2), "shards": len(groups)}


def shard_files(path: Path) -> list[Path]:
    return [path / name for name in sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))]


def evict(path: Path) -> bool:
    """Drop the checkpoint's pages from the page cache (fsync, then POSIX_FADV_DONTNEED: no root needed), so that
    the next read comes from the disk. False where the platform has no fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for file in shard_files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_every_tensor(path: Path) -> dict[str, Any]:
    """The disk read time: the page cache evicted, then every tensor of the checkpoint read once into host memory."""
    from safetensors import safe_open

    evicted = evict(path)
    start, total = time.perf_counter(), 0
    for file in shard_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is no dict
                total += f.get_tensor(key).numel() * 2
    seconds = time.perf_counter() - start
    return {"read_seconds": round(seconds, 2), "read_gib": round(total / 2**30, 2), "read_cold": evicted}


def in_place_model(path: Path, shape: str, layers: int | None, device: str) -> Any:
    """The same model with its weights already on ``device`` (read from the checkpoint), for the in-place init."""
    from safetensors.torch import load_file
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model, config = meta_llama(shape, layers)
    model.to_empty(device=device)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)  # to_empty left its buffers garbage
    loaded: set[str] = set()
    for file in shard_files(path):
        shard = load_file(str(file), device=device)
        model.load_state_dict(shard, strict=False)
        loaded |= shard.keys()
        del shard
    missing = set(model.state_dict()) - loaded
    if missing:
        raise RuntimeError(f"the checkpoint at {path} lacks {sorted(missing)[:5]}: delete it, it is written again")
    return model
