"""minipissa: PiSSA (principal singular values and vectors adaptation) in plain PyTorch.

import minipissa
minipissa.apply(model, rank=16, targets=["q_proj", "v_proj"])
# ... train: only the A and B parameters require grad ...
"""

from .convert import ConversionReport, convert_to_lora
from .decompose import principal_factors
from .layer import PiSSALinear
from .model import (
    Summary,
    apply,
    disabled,
    merge,
    original,
    pissa_layers,
    summary,
    unload,
    unmerge,
)
from .residual import load_residual, save_residual
from .safefile import StateError
from .state import load, save

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "StateError",
    "convert_to_lora",
    "load",
    "load_residual",
    "save",
    "save_residual",
    "PiSSALinear",
    "Summary",
    "apply",
    "disabled",
    "merge",
    "original",
    "pissa_layers",
    "principal_factors",
    "summary",
    "unload",
    "unmerge",
]
