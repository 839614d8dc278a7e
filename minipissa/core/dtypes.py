"""The names of dtypes: the one table of the dtypes minipissa's files hold, and the name a file records for each."""

from __future__ import annotations

import torch

#: Every dtype a minipissa file holds, with its code in the safetensors header (the format's own names).
SAFETENSORS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    """The name a file's metadata records for ``dtype``: "float32" for torch.float32."""
    return str(dtype).removeprefix("torch.")


#: The floating-point dtypes of those, by the name a file records (a weight's, a fingerprint's, a 4-bit residual's).
FLOATS = {dtype_name(d): d for d in SAFETENSORS if d.is_floating_point}
