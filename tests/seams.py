"""Where the tests reach inside minipissa: a fault injected, or the work watched, at the one function that does a
job (the decomposition, the installer's layer builder, ...). Each seam is named once here, so that moving that
function changes this file and not the tests that use it; a test that needs another one adds it here. The OS calls
that tests fail (os.replace, open) are patched where they are, in the standard library: no seam of ours."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from minipissa.core import decompose, qpissa
from minipissa.interop import peft_export, peft_import
from minipissa.io import adapter_fit, safefile
from minipissa.nn import layer
from minipissa.plan import install

#: seam -> (module, name): what each one is is said beside it.
SEAMS: dict[str, tuple[object, str]] = {
    "decomposition": (decompose, "principal_factors"),  # the top-r factors of a matrix or a stack: every road
    "range finder": (decompose, "start"),  # the randomized sketch's first pass (Cholesky-QR or Householder)
    "layer builder": (install, "build_layer"),  # the installer's build of one PiSSA layer (apply, load, import)
    "streamed factors": (install, "streamed_factors"),  # the factor stream of apply(device=): weights fetched
    "quantization target": (qpissa, "quantization_target"),  # what QPiSSA's next iteration decomposes
    "quantizer slice": (qpissa, "SLICE"),  # rows quantized at a time (bounds the temporaries)
    "rebuilt 4-bit residual": (adapter_fit, "residual_nf4"),  # load's NF4(W - s*B0*A0), checked by its sha256
    "readable versions": (safefile, "READABLE_VERSIONS"),  # the file-format versions this reader takes
    "layer fingerprint": (layer, "fingerprint"),  # the residual's fingerprint, renewed on a cast
    "LoRA factors": (peft_export, "lora_factors"),  # convert_to_lora's factors (the costly part)
    "PEFT config write": (peft_export, "_write_text"),  # convert_to_lora's adapter_config.json and README
    "import sees a DTensor": (peft_import, "is_dtensor"),  # import_peft's test for FSDP2-sharded weights
}


def real(seam: str) -> Any:
    """What ``seam`` is now (the function a replacement wraps)."""
    owner, name = SEAMS[seam]
    return getattr(owner, name)


def replace(monkeypatch: pytest.MonkeyPatch, seam: str, value: Any) -> None:
    """``seam`` is ``value`` until the test ends (or ``monkeypatch.undo()``)."""
    owner, name = SEAMS[seam]
    monkeypatch.setattr(owner, name, value)


@contextlib.contextmanager
def replaced(seam: str, value: Any) -> Iterator[None]:
    """``seam`` is ``value`` inside the block (in a test drawn by hypothesis: a fixture would outlive one draw)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        replace(monkeypatch, seam, value)
        yield
