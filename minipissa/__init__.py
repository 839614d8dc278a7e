"""minipissa: PiSSA (principal singular values and vectors adaptation) in plain PyTorch.

import minipissa
minipissa.apply(model, rank=16, targets=["q_proj", "v_proj"])  # only A and B require grad
# ... your training loop ...
minipissa.save(model, "adapter.safetensors")
minipissa.convert_to_lora("adapter.safetensors", "lora_dir")  # PEFT LoRA for the original weights
"""

from .convert import ConversionReport, convert_to_lora
from .errors import StateError
from .layer import PiSSALinear
from .model import apply, disabled, merge, original, unload, unmerge
from .nf4_linear import NF4Linear
from .peft_import import import_peft
from .report import Summary, summary
from .residual import load_residual, save_residual
from .state import load, save
from .tree import pissa_layers

__version__ = "0.1.0"

__all__ = [
    # adapt a model, and undo it
    "apply",
    "merge",
    "unmerge",
    "unload",
    "original",
    "disabled",
    "summary",
    "Summary",
    "pissa_layers",
    "PiSSALinear",
    "NF4Linear",
    # files
    "save",
    "load",
    "save_residual",
    "load_residual",
    "convert_to_lora",
    "import_peft",
    "ConversionReport",
    "StateError",
]
