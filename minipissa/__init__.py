"""minipissa: PiSSA (principal singular values and vectors adaptation) in plain PyTorch.

import minipissa
minipissa.apply(model, rank=16, targets=["q_proj", "v_proj"])  # only A and B require grad
# or: config = minipissa.InitConfig(rank=16, alpha=32); minipissa.apply(model, config=config, targets=[...])
# ... your training loop ...
minipissa.save(model, "adapter.safetensors")
minipissa.convert_to_lora("adapter.safetensors", "lora_dir")  # PEFT LoRA for the original weights
"""

from .adapters import active_adapter, adapter, adapters, delete_adapter, per_example, set_adapter
from .core.errors import StateError
from .core.version import __version__ as __version__
from .interop.lora_import import load_lora
from .interop.peft_export import ConversionReport, convert_to_lora
from .interop.peft_import import import_peft
from .io.adapter_file import load, save
from .io.residual_file import load_residual, save_residual
from .model import apply, disabled, merge, original, unload, unmerge
from .nn.layer import PiSSALinear
from .nn.nf4_linear import NF4Linear
from .plan.config import InitConfig
from .plan.tree import pissa_layers
from .report import Summary, summary

__all__ = [
    # adapt a model, and undo it
    "apply",
    "InitConfig",
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
    # several named adapters on one model
    "adapters",
    "active_adapter",
    "set_adapter",
    "adapter",
    "delete_adapter",
    "per_example",
    "load_lora",
]
