"""Adapter files parsed into validated records: whatever the metadata holds (checksums recomputed, so only the
parser stands between a crafted file and the model), load() and the CLI raise StateError or succeed, and a
refusal never changes the model. Version-1 files still load."""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bounds
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snapshots import assert_unchanged, snapshot
from torch import nn

import minipissa
from minipissa import StateError
from minipissa.interop.cli import main as cli
from minipissa.io import safefile

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures"))
import make_v1_adapter  # noqa: E402

FIXTURES = Path(__file__).parents[1] / "fixtures"


def base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 12))


def trained(path: Path) -> nn.Module:
    model = minipissa.apply(base(), 4, ["0", "2"], alpha=8.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.0)
    model(torch.randn(3, 16)).square().mean().backward()
    opt.step()
    minipissa.save(model, path, optimizer=opt)
    return model


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None]) -> None:
    """A copy of a minipissa file with ``edit`` applied to its metadata/tensors and every checksum recomputed."""
    info, tensors = safefile.read(src)
    edit(info, tensors)
    content = {k: v for k, v in info.items() if k != safefile.BLOB_SHA_FIELD}
    content["tensors_sha256"] = safefile.tensors_digest(tensors)
    content[safefile.BLOB_SHA_FIELD] = safefile._blob_sha(content)
    safefile.write_safetensors(tensors, str(dst), {safefile.BLOB_KEY: json.dumps(content, sort_keys=True)})


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("records") / "good.safetensors"
    trained(path)
    return path


def refused(path: Path, match: str) -> None:
    model = base()
    before = snapshot(model)
    with pytest.raises(StateError, match=match):
        minipissa.load(model, path)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dropout", 1.5, r"module '2' dropout must be a finite number in \[0, 1\)"),
        ("dropout", "0.1", "dropout must be a finite number"),
        ("alpha", 0, r"module '2' alpha must be a finite number in \(0, inf\]"),
        ("alpha", 1e300, "alpha must be such that s = alpha / r"),
        ("alpha", float("nan"), "alpha must be a finite number"),
        ("rank", True, "rank must be an integer >= 1"),
        ("rslora", 1, "rslora must be true or false"),
        ("base_dtype", "int8", "base_dtype must be one of"),
        ("info", None, "info must be an object"),
    ],
)
def test_a_bad_field_of_the_second_module_is_refused_before_the_first_is_touched(good, tmp_path, field, value, match):
    bad = tmp_path / "bad.safetensors"
    rewrite(good, bad, lambda info, tensors: info["modules"]["2"].__setitem__(field, value))
    refused(bad, match)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda info, t: info["modules"]["2"]["info"].pop("residual_fingerprint"), "with the keys"),
        (
            lambda info, t: info["modules"]["2"]["info"].__setitem__("singular_values", [1.0]),
            "singular_values must be 4",
        ),
        (lambda info, t: info["modules"]["2"]["info"]["base_fingerprint"].__setitem__("hash", "x"), "16 hex digits"),
        (
            lambda info, t: info["modules"]["2"]["info"]["base_fingerprint"].__setitem__("shape", [24, 12]),
            "of a float32",
        ),
        (lambda info, t: info.__setitem__("modules", {}), "modules must be a non-empty object"),
        (lambda info, t: info.__setitem__("modules", []), "modules must be an object"),
        (lambda info, t: info.__setitem__("module_order", ["2", "2"]), "module_order must be the names of 'modules'"),
        (lambda info, t: info.__setitem__("module_order", "2"), "module_order must be the names of 'modules'"),
        (lambda info, t: t.__setitem__("2.A", t["2.A"].to(torch.int32)), "dtypes of A, B, A0, B0"),
        (lambda info, t: t.__setitem__("2.B", torch.full_like(t["2.B"], float("nan"))), "must be finite"),
        (lambda info, t: t.__setitem__("2.A0", t["2.A0"][:2]), "must be of shapes"),
        (lambda info, t: info["optimizer"].__setitem__("state", []), "optimizer state's layout"),
        (lambda info, t: info["optimizer"]["param_groups"][0].__setitem__("tuples", ["nope"]), "tuples is malformed"),
    ],
)
def test_crafted_metadata_and_tensors_are_refused(good, tmp_path, edit, match):
    bad = tmp_path / "bad.safetensors"
    rewrite(good, bad, edit)
    refused(bad, match)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("seed", 2**63, r"module '2' seed must be an int in \[-2\*\*63, 2\*\*63\)"),
        ("niter", 2**63, "module '2' niter must be None"),
        ("oversample", -1, "module '2' oversample must be >= 0"),
        ("quant_iters", 2, "module '2' init='loftq' and quant_iters > 1 choose the adapter against a quantizer"),
        ("components", "minor", "module '2' components='minor' needs the exact SVD"),  # the file's niter is 2
        ("init", "gaussian", "module '2' init must be one of"),
    ],
)
def test_a_file_s_init_settings_pass_the_checks_apply_runs(tmp_path, key, value, match):
    """One validator (config.check_recorded) for apply()'s options and every module of a file."""
    good = tmp_path / "good.safetensors"
    minipissa.save(minipissa.apply(base(), 4, ["0", "2"], niter=2), good)
    bad = tmp_path / "bad.safetensors"
    rewrite(good, bad, lambda info, tensors: info["modules"]["2"]["info"].__setitem__(key, value))
    refused(bad, match)


@pytest.mark.parametrize("seed", [-(2**63), 2**63 - 1])
def test_the_extreme_int64_seeds_save_and_load(tmp_path, seed):
    model = minipissa.apply(base(), 4, ["0", "2"], niter=1, oversample=2**63 - 1, seed=seed)
    minipissa.save(model, tmp_path / "a.safetensors")
    x = torch.randn(3, 16)
    assert torch.equal(minipissa.load(base(), tmp_path / "a.safetensors")(x), model(x))


def test_optimizer_state_of_the_wrong_kind_is_refused_before_any_step(good, tmp_path):
    def opt_for(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.0)

    cases = {
        "str lr": lambda info, t: info["optimizer"]["param_groups"][0]["hyper"].__setitem__("lr", "0.01"),
        "shape": lambda info, t: t.__setitem__("optimizer:0.A:exp_avg", torch.zeros(3)),
        "dtype": lambda info, t: t.__setitem__("optimizer:0.A:exp_avg", t["optimizer:0.A:exp_avg"].to(torch.int64)),
        "betas": lambda info, t: info["optimizer"]["param_groups"][0]["hyper"].__setitem__("betas", [0.9]),
    }
    for label, edit in cases.items():
        bad = tmp_path / f"{label}.safetensors"
        rewrite(good, bad, edit)
        model = minipissa.load(base(), good)
        opt = opt_for(model)
        before = opt.state_dict()
        with pytest.raises(StateError):
            minipissa.load(model, bad, optimizer=opt)
        assert opt.state_dict() == before, label
    model = minipissa.load(base(), good)
    minipissa.load(model, good, optimizer=opt_for(model))  # the untouched file restores


def test_metadata_too_deep_or_too_long_for_the_parser_is_a_state_error(good, tmp_path):
    info, tensors = safefile.read(good)
    for text in ('{"a":' * 3000 + "1" + "}" * 3000, '{"rank": ' + "9" * 100_000 + "}"):
        bad = tmp_path / "bomb.safetensors"
        safefile.write_safetensors(tensors, str(bad), {safefile.BLOB_KEY: text})
        # Python 3.11 cannot parse it at all; 3.12 parses the nesting, and then its checksum is wrong.
        refused(bad, "the metadata cannot be parsed|the metadata checksum does not match")
        assert cli(["inspect", str(bad)]) == 2


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in the metadata a value can be put (checksums excepted)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in (safefile.BLOB_SHA_FIELD, "tensors_sha256", "format_version", "kind"):
                found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths(item, (*prefix, i))
    return found


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=JSON, delete=st.booleans())
def test_fuzzed_metadata_gives_state_error_or_a_load_never_anything_else(good, tmp_path, data, value, delete):
    """Any JSON value in any field (or the field removed), checksums recomputed: load() and `inspect` either
    succeed or raise StateError, and a refusal leaves the model as it was."""
    info, _ = safefile.read(good)
    where = data.draw(st.sampled_from(paths(info)))

    def edit(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        parent = meta
        for step in where[:-1]:
            parent = parent[step]
        if delete and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = value

    bad = tmp_path / "fuzz.safetensors"
    rewrite(good, bad, edit)
    model = base()
    before = snapshot(model)
    try:
        minipissa.load(model, bad)
    except StateError:
        assert_unchanged(model, before)
    else:  # the drawn value was a valid one: the loaded model computes something finite
        assert torch.isfinite(model(torch.randn(2, 16))).all()
    assert cli(["inspect", str(bad)]) in (0, 2)


def test_a_residual_edited_after_apply_is_saved_as_such_and_loads_only_onto_that_residual(tmp_path):
    model = minipissa.apply(base(), 4, ["0", "2"])
    with torch.no_grad():  # e.g. fake-quantised in place
        model[0].weight.copy_((model[0].weight * 16).round() / 16)
    x = torch.randn(3, 16)
    minipissa.save(model, tmp_path / "a.safetensors")
    minipissa.save_residual(model, tmp_path / "r.safetensors")
    _, recs, _ = minipissa.io.adapter_file.read(tmp_path / "a.safetensors")
    assert [r.info.get("residual_edited", False) for r in recs] == [True, False]
    refused(tmp_path / "a.safetensors", "'0': its residual was edited after apply")
    residual_model = minipissa.load_residual(base(), tmp_path / "r.safetensors")
    loaded = minipissa.load(residual_model, tmp_path / "a.safetensors", base="residual")
    assert torch.equal(loaded(x), model(x))
    # A cast is no edit: load onto the original, then cast, reproduces it.
    half = minipissa.apply(base(), 4, ["0", "2"]).half()
    minipissa.save(half, tmp_path / "h.safetensors")
    assert not any("residual_edited" in r.info for r in minipissa.io.adapter_file.read(tmp_path / "h.safetensors")[1])


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_version_file_loads_with_its_optimizer_state(version):
    """Written by minipissa before format versions 2 (sampled fingerprints) and 3 (QPiSSA records), by
    fixtures/make_v1_adapter.py."""
    from safetensors.torch import load_file

    path = FIXTURES / f"v{version}_adapter.safetensors"
    info, _ = safefile.read(path)
    assert info["format_version"] == version
    model = minipissa.load(make_v1_adapter.base(), path)
    expected = load_file(str(FIXTURES / f"v{version}_expected.safetensors"))["y"]
    x = make_v1_adapter.inputs()
    with torch.no_grad():
        got = model(x)
    if _same_machine():  # bit for bit where the fixture was made; elsewhere within another CPU's rounding
        assert torch.equal(got, expected)
    else:
        assert bool(((got.double() - expected.double()).abs() <= bounds.rounding_only([model[0], model[2]], x)).all())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    minipissa.load(model, path, optimizer=opt)
    assert all("momentum_buffer" in s for s in opt.state.values()) and len(opt.state) == 4
    wrong = make_v1_adapter.base()
    with torch.no_grad():
        wrong[0].weight[0, 0] += 1e-3  # a sampled fingerprint still tells a different weight
    with pytest.raises(StateError, match="fingerprint differs"):
        minipissa.load(wrong, path)


def _same_machine() -> bool:
    import make_factors

    _, recorded = make_factors.read()
    return recorded == make_factors.environment()


def test_permutations_anywhere_in_a_weight_are_detected(tmp_path):
    """The fingerprint hashes every element and its position: a swap or a permutation of elements that version
    1's 4,096-element sample never saw (sums unchanged too) is caught."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64))
    minipissa.save(minipissa.apply(_copy(model), 4, "0"), tmp_path / "a.safetensors")
    n = model[0].weight.numel()
    sampled = set((torch.arange(4096) * (n - 1) // 4095).tolist())
    unsampled = torch.tensor([i for i in range(n) if i not in sampled])
    g = torch.Generator().manual_seed(1)
    for count in (2, 2000):
        other = _copy(model)
        with torch.no_grad():
            flat = other[0].weight.view(-1)
            where = unsampled[torch.randperm(len(unsampled), generator=g)[:count]]
            flat[where] = flat[where.roll(1)]
        assert not torch.equal(other[0].weight, model[0].weight)
        with pytest.raises(StateError, match="fingerprint differs"):
            minipissa.load(other, tmp_path / "a.safetensors")
    minipissa.load(_copy(model), tmp_path / "a.safetensors")


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@pytest.mark.parametrize(
    ("where", "key", "value", "apply_kwargs", "tail"),
    [
        ("info", "seed", 2**63, {"seed": 2**63}, f"seed must be an int in [-2**63, 2**63) (int64), got {2**63}"),
        ("info", "init", "gaussian", {"init": "gaussian"}, "init must be one of ['pissa', 'lora', 'loftq'], got 'g"),
        ("module", "rank", 0, {"rank": {"*": 4, "2": 0}}, "module '2' rank must be an integer >= 1, got 0"),
        ("module", "alpha", -1.0, {"alpha": {"*": 8.0, "2": -1.0}}, "module '2' alpha must be a finite number in (0"),
        ("module", "dropout", 1.0, {"dropout": 1.0}, "dropout must be a finite number in [0, 1), got 1.0"),
    ],
)  # fmt: skip
def test_a_file_s_option_and_the_same_apply_option_are_refused_by_one_check(
    good, tmp_path, where, key, value, apply_kwargs, tail
):
    """core/checks.Check, through config.check_recorded and plan/settings: the same words for apply()'s argument
    (a ValueError) and for a file's field (a StateError naming the file)."""
    with pytest.raises(ValueError, match="minipissa: .*" + re.escape(tail)) as by_apply:
        minipissa.apply(base(), **{"rank": 4, "targets": ["0", "2"], "alpha": 8.0, **apply_kwargs})
    assert not isinstance(by_apply.value, StateError)
    bad = tmp_path / "bad.safetensors"
    meta = (lambda info: info["modules"]["2"]["info"]) if where == "info" else (lambda info: info["modules"]["2"])
    rewrite(good, bad, lambda info, tensors: meta(info).__setitem__(key, value))
    refused(bad, f"minipissa: '{re.escape(str(bad))}': .*" + re.escape(tail) + ".*; the file is corrupted or crafted")
