"""Factors are a function of the weights and the options alone: not of the thread count, and not of the code's
shape (``fixtures/factors.safetensors`` holds what the CPU computed when that was made thread-independent)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from minipissa.core import linalg

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures"))
import make_factors  # noqa: E402

# Sizes where MKL splits the work by thread count (measured: 4-11 rows of A0 flipped sign between 1 and 2
# threads before every decomposition ran on one thread); exact, randomized, minor and float64 paths.
SCRIPT = """
import sys, torch
if sys.argv[2] != "default":
    torch.set_num_threads(int(sys.argv[2]))
import minipissa
from minipissa.io.safefile import write_safetensors
from torch import nn

out = {}
for label, kwargs, dtype, shapes in [
    ("exact", {}, torch.float32, [(256, 256), (512, 512), (1024, 256), (256, 1024)]),
    ("randomized", {"niter": 4}, torch.float32, [(1024, 1024), (1024, 256), (256, 1024)]),
    ("minor", {"components": "minor"}, torch.float32, [(256, 256), (384, 256)]),
    ("fp64", {}, torch.float64, [(256, 256), (256, 512)]),
]:
    torch.manual_seed(0)
    model = nn.ModuleList(nn.Linear(n, m, dtype=dtype) for m, n in shapes)
    minipissa.apply(model, 16, "all-linear", **kwargs)
    for name, layer in minipissa.pissa_layers(model):
        for key in ("A0", "B0", "weight"):
            out[f"{label}.{name}.{key}"] = getattr(layer, key).detach().contiguous()
write_safetensors(out, sys.argv[1])
"""


def factors_with_threads(tmp_path: Path, threads: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = tmp_path / f"threads_{threads}.safetensors"
    subprocess.run([sys.executable, "-c", SCRIPT, str(path), threads], check=True, timeout=600)
    return load_file(str(path))


def test_factors_do_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    """torch's default thread count (MKL then picks threads per call), and 1, 2, 4 threads: bit-identical."""
    runs = {t: factors_with_threads(tmp_path, t) for t in ("default", "1", "2", "4")}
    reference = runs.pop("1")
    assert len(reference) == 3 * (4 + 3 + 2 + 2)
    for threads, run in runs.items():
        assert run.keys() == reference.keys()
        differ = [k for k in reference if not torch.equal(run[k], reference[k])]
        assert not differ, f"{threads} threads: {differ}"


def test_one_thread_restores_the_callers_setting_and_leaves_other_threads_alone() -> None:
    before = torch.get_num_threads()
    seen = []
    with linalg.one_thread(torch.device("cpu")):
        seen.append(torch.get_num_threads())
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
    assert seen[0] == 1
    assert torch.get_num_threads() == before
    with linalg.one_thread(torch.device("meta")):  # not the CPU: nothing to pin
        assert torch.get_num_threads() == before


def test_factors_match_the_fixture() -> None:
    """Today's factors against those of the code that first made them thread-independent: bit for bit where
    the fixture's torch version and CPU vector unit are this machine's (CI's), else to rounding."""
    expected, recorded = make_factors.read()
    got = make_factors.compute()
    assert got.keys() == expected.keys()
    exact = recorded == make_factors.environment()
    for key, want in expected.items():
        have = got[key]
        assert have.dtype == want.dtype and have.shape == want.shape, key
        if exact:
            assert torch.equal(have, want), key
        elif want.numel():
            # Another BLAS or vector unit: fp32 rounding amplified by the spectral gaps (Wedin): about
            # sqrt(n) * eps32 * ||W|| / gap ~ 16 * 1.2e-7 * 50 = 1e-4 of the largest entry here; measured 4e-5
            # with MKL's AVX2 kernels instead of AVX-512. bf16 residuals: one bf16 rounding (2^-8) of a change.
            scale = want.double().abs().max().item()
            tol = 1e-3 if want.dtype == torch.bfloat16 else 1e-4
            assert (have.double() - want.double()).abs().max().item() <= tol * max(scale, 1.0), key


@pytest.mark.parametrize("threads", [1, 2])
def test_one_thread_decomposition_is_reproducible_in_process(threads: int) -> None:
    """Within one process too: the same matrix decomposed twice gives the same bits whatever ran between."""
    from minipissa.core import decompose

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
        first = decompose.principal_factors(w, 8, 2.0)
        torch.randn(512, 512) @ torch.randn(512, 512)  # other work on all threads in between
        second = decompose.principal_factors(w, 8, 2.0)
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
