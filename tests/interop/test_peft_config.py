"""peft_config: adapter_config.json fields of PEFT's types only, PEFT's defaults, and pattern keys matched exactly
as PEFT matches them (its own get_pattern_key is the oracle)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipissa import StateError
from minipissa.interop.peft_config import PEFT_DEFAULTS, lookup, lora_settings, module_value

peft = pytest.importorskip("peft")
from peft.utils.other import get_pattern_key  # noqa: E402

GOOD = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": "pissa"}


def test_the_defaults_are_peft_s() -> None:
    """A key missing from adapter_config.json means what PEFT's LoraConfig defaults to (the installed PEFT)."""
    defaults = peft.LoraConfig().to_dict()
    assert {k: defaults[k] for k in PEFT_DEFAULTS} == PEFT_DEFAULTS
    assert lora_settings({"peft_type": "LORA"}, "w") == PEFT_DEFAULTS


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("use_rslora", "false", "true or false"),
        ("use_rslora", 0, "true or false"),
        ("fan_in_fan_out", "true", "true or false"),
        ("use_dora", None, "true or false"),
        ("use_dora", True, "false (DoRA"),
        ("lora_alpha", True, "a finite number in (0, inf]"),
        ("lora_alpha", "8", "a finite number"),
        ("lora_alpha", 0, "a finite number in (0, inf]"),
        ("lora_alpha", float("nan"), "a finite number"),
        ("lora_alpha", float("inf"), "a finite number"),
        ("lora_alpha", None, "a finite number"),
        ("r", "16", "an integer >= 1"),
        ("r", 16.0, "an integer >= 1"),
        ("r", True, "an integer >= 1"),
        ("r", 0, "an integer >= 1"),
        ("r", 2**63, "an integer >= 1"),
        ("lora_dropout", "0.1", "a finite number in [0, 1)"),
        ("lora_dropout", 1.0, "a finite number in [0, 1)"),
        ("lora_dropout", -0.1, "a finite number in [0, 1)"),
        ("rank_pattern", [], "an object"),
        ("rank_pattern", None, "an object"),
        ("alpha_pattern", "q_proj", "an object"),
        ("init_lora_weights", 1, "true, false or a string"),
        ("init_lora_weights", None, "true, false or a string"),
        ("peft_type", "LOHA", "'LORA'"),
    ],
)
def test_values_not_of_peft_s_type_are_refused_naming_the_field(field, value, expected) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StateError, match=f"^where: {field} must be {re.escape(expected)}.*, got "):
        lora_settings(GOOD | {field: value}, "where")


@pytest.mark.parametrize(
    ("field", "patterns", "named"),
    [
        ("rank_pattern", {"q_proj": "4"}, "rank_pattern['q_proj'] must be an integer"),
        ("rank_pattern", {"q_proj": 4.0}, "rank_pattern['q_proj'] must be an integer"),
        ("rank_pattern", {"q_proj": True}, "rank_pattern['q_proj'] must be an integer"),
        ("rank_pattern", {"q_proj": 0}, "rank_pattern['q_proj'] must be an integer >= 1"),
        ("alpha_pattern", {"v_proj": True}, "alpha_pattern['v_proj'] must be a finite number"),
        ("alpha_pattern", {"v_proj": "2"}, "alpha_pattern['v_proj'] must be a finite number"),
        ("alpha_pattern", {"v_proj": -1}, "alpha_pattern['v_proj'] must be a finite number"),
        ("alpha_pattern", {"layers.(0": 2}, "alpha_pattern key must be a regular expression"),
        ("rank_pattern", {"*_proj": 2}, "rank_pattern key must be a regular expression"),
    ],
)
def test_pattern_values_and_keys_are_checked(field, patterns, named) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StateError, match=re.escape(named)):
        lora_settings(GOOD | {field: patterns}, "where")


PARTS = ["model", "layers", "0", "1", "12", "self_attn", "mlp", "q_proj", "k_proj", "v_proj", "down_proj", "h", "attn"]
PIECES = st.sampled_from(PARTS + [r"\.", ".", ".*", r"\d+", "|", "^", "(", ")", "_proj", "s?"])


@st.composite
def pattern_key(draw: st.DrawFn) -> str:
    """A regex key in the forms people write: names, alternations, escaped or bare dots, wildcards, anchors."""
    while True:
        key = "".join(draw(st.lists(PIECES, min_size=1, max_size=6)))
        try:
            re.compile(key)
        except re.error:
            continue
        return key


@given(
    names=st.lists(st.lists(st.sampled_from(PARTS), min_size=1, max_size=5).map(".".join), min_size=1, max_size=8),
    patterns=st.dictionaries(pattern_key(), st.integers(1, 64), max_size=5),
)
def test_lookup_matches_peft_exactly(names, patterns) -> None:  # type: ignore[no-untyped-def]
    """PEFT: value = patterns.get(get_pattern_key(patterns.keys(), name), default), in the dict's order."""
    for name in names:
        assert lookup(name, patterns, -1) == patterns.get(get_pattern_key(patterns.keys(), name), -1), name


@pytest.mark.parametrize(
    ("patterns", "name", "value"),
    [
        ({"q_proj|k_proj": 2}, "model.layers.0.self_attn.k_proj", 2),
        ({"q_proj|k_proj": 2}, "model.layers.0.self_attn.v_proj", 8),
        ({r"layers\.1\..*": 3}, "model.layers.1.mlp.down_proj", 3),
        ({r"layers\.1\..*": 3}, "model.layers.11.mlp.down_proj", 8),
        ({"proj": 3}, "model.layers.1.mlp.down_proj", 8),  # the end after a dot, not any suffix
        ({"mlp.down_proj": 3, "down_proj": 3}, "model.layers.1.mlp.down_proj", 3),  # several keys, one value
    ],
)
def test_the_forms_of_the_issue(patterns, name, value) -> None:  # type: ignore[no-untyped-def]
    settings = GOOD | {"r": 8, "rank_pattern": patterns}
    assert module_value(name, settings, "rank_pattern", "r") == value


def test_a_name_no_key_matches_is_looked_up_as_itself_as_peft_does() -> None:
    """Module names may hold regex characters (add_module("a+b", ...)): PEFT then finds the name as a key."""
    patterns = {"a+b": 3, "c": 4}
    assert lookup("x.a+b", patterns, 8) == patterns.get(get_pattern_key(patterns.keys(), "x.a+b"), 8) == 8
    assert lookup("a+b", patterns, 8) == patterns.get(get_pattern_key(patterns.keys(), "a+b"), 8) == 3


def test_keys_that_disagree_on_a_module_are_refused() -> None:
    """PEFT saves the keys sorted: the first match at training and at reload may differ (see test_peft_import)."""
    settings = GOOD | {"alpha_pattern": {"self_attn.v_proj|down_proj": 5, "v_proj": 2}}
    with pytest.raises(
        StateError, match=r"module 'm.self_attn.v_proj' matches several alpha_pattern .*reloads it with 5"
    ):
        module_value("m.self_attn.v_proj", settings, "alpha_pattern", "lora_alpha")
    assert module_value("m.v_proj", settings, "alpha_pattern", "lora_alpha") == 2
    assert module_value("m.down_proj", settings, "alpha_pattern", "lora_alpha") == 5
