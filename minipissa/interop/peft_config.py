"""PEFT's LoRA ``adapter_config.json`` as PEFT reads it: each field of PEFT's type, PEFT's defaults for missing
keys, and rank/alpha pattern keys as the regexes PEFT matches them as (peft 0.21.2)."""

from __future__ import annotations

import re
from typing import Any

from ..core.checks import Check
from ..core.errors import StateError

#: PEFT's LoraConfig defaults (peft 0.21.2) of the fields read here: what a key missing from
#: adapter_config.json means to PEFT.
PEFT_DEFAULTS: dict[str, Any] = {
    "r": 8, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False, "lora_dropout": 0.0,
    "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "init_lora_weights": True,
}  # fmt: skip


def lora_settings(config: Any, where: str) -> dict[str, Any]:
    """The fields of a PEFT LoRA ``adapter_config.json`` that import reads, each of PEFT's type (a StateError
    naming the field otherwise), missing ones at :data:`PEFT_DEFAULTS`; pattern keys compiled (:func:`lookup`)."""
    check = Check(where, StateError, "fix the adapter_config.json, or export the adapter again with PEFT")
    given = check.mapping(config, "adapter_config.json")
    if given.get("peft_type") != "LORA":
        check.fail("peft_type", "'LORA' (a PEFT LoRA adapter)", given.get("peft_type"))
    c = PEFT_DEFAULTS | given
    settings: dict[str, Any] = {
        "r": check.integer(c["r"], "r", low=1),
        "lora_alpha": check.number(c["lora_alpha"], "lora_alpha", low=0.0, low_open=True),
        "lora_dropout": check.number(c["lora_dropout"], "lora_dropout", low=0.0, high=1.0, high_open=True),
    }
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        settings[key] = check.boolean(c[key], key)
    if settings["use_dora"]:
        check.fail("use_dora", "false (DoRA adapters are not imported)", True)
    if not isinstance(c["init_lora_weights"], (bool, str)):
        check.fail("init_lora_weights", "true, false or a string", c["init_lora_weights"])
    settings["init_lora_weights"] = c["init_lora_weights"]
    for key, low in (("rank_pattern", 1), ("alpha_pattern", 0)):
        patterns = check.mapping(c[key], key)
        for pattern, value in patterns.items():
            try:
                re.compile(peft_regex(pattern))
            except re.error as e:
                check.fail(f"{key} key", f"a regular expression ({e})", pattern)
            if low:
                check.integer(value, f"{key}[{pattern!r}]", low=1)
            else:
                check.number(value, f"{key}[{pattern!r}]", low=0.0, low_open=True)
        settings[key] = patterns
    return settings


def peft_regex(key: str) -> str:
    """PEFT's reading of a rank/alpha pattern key (peft.utils.other.get_pattern_key, peft 0.21.2): the key is a
    regex that must match the module's full name, or its end after a dot."""
    return rf"(.*\.)?({key})$"


def lookup(name: str, patterns: dict[str, Any], default: Any) -> Any:
    """PEFT's rank/alpha for module ``name``: the value of the first pattern key (in the file's order) that
    matches as PEFT matches (``re.match`` of :func:`peft_regex`), else ``default``."""
    for key, value in patterns.items():
        if re.match(peft_regex(key), name):
            return value
    return patterns.get(name, default)  # as PEFT: the name itself, looked up when no key matched


def module_value(name: str, settings: dict[str, Any], key: str, default: str) -> Any:
    """:func:`lookup` of module ``name`` in the pattern ``settings[key]`` (else ``settings[default]``), refused
    where keys that match it disagree: PEFT applies the first in its config's order, but saves the keys sorted
    (json sort_keys), so the file cannot say which value the adapter was made and trained with."""
    found = {k: v for k, v in settings[key].items() if re.match(peft_regex(k), name)}
    if len(set(found.values())) > 1:
        raise StateError(
            f"minipissa.import_peft: module '{name}' matches several {key} keys with different values ({found}); "
            "PEFT takes the first in its config's order and saves the keys sorted, so the file does not say which "
            f"one it trained with (PEFT reloads it with {next(iter(found.values()))}). Use patterns that match each "
            "module once"
        )
    return lookup(name, settings[key], settings[default])
