"""Copies of tensors in host memory (the initial factors A0, B0, and the initial values of modules trained in full),
made without a device sync per tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def host_copies(tensors: Sequence[Tensor], wait: bool = True) -> list[Tensor]:
    """Copies of ``tensors`` in host memory, each its own storage. From a CUDA device into pinned memory, queued on
    the current stream without a sync per tensor (pageable copies, one sync each, took a large part of a 7B model's
    init); ``wait=False`` leaves them in flight: the caller waits for the stream before they are read."""
    copies = []
    for t in tensors:
        if t.device.type != "cuda":
            copies.append(t.detach().to("cpu", copy=True))
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        copies.append(host.copy_(t.detach(), non_blocking=True))
    if wait:
        for device in {t.device for t in tensors if t.device.type == "cuda"}:
            torch.cuda.current_stream(device).synchronize()
    return copies
