"""How long apply()'s hashes of a 7B model's initial factors take (448 tensors, rank 16), against one fingerprint
per tensor: host time of the queued work plus the read-back."""

import time

import torch

from minipissa.core.fingerprint import fingerprint_later, hashes, read_all

device = "cuda" if torch.cuda.is_available() else "cpu"
shapes = [((16, 4096), (4096, 16))] * 4 * 32 + [((16, 4096), (11008, 16))] * 2 * 32 + [((16, 11008), (4096, 16))] * 32
factors = [torch.randn(s, device=device) for pair in shapes for s in pair]
for name, run in (
    ("hashes (grouped)", lambda: hashes(factors)),
    ("fingerprint per tensor", lambda: read_all([fingerprint_later(t) for t in factors])),
):
    times = []
    for _ in range(7):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"{device} {len(factors)} factors, {name}: median {times[3] * 1e3:.1f} ms, min {times[0] * 1e3:.1f} ms")
