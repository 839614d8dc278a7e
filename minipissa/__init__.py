"""minipissa: PiSSA (principal singular values and vectors adaptation) in plain PyTorch.

import minipissa
minipissa.apply(model, rank=16, targets=["q_proj", "v_proj"])
# ... train: only the A and B parameters require grad ...
"""

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

__version__ = "0.1.0"

__all__ = [
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
