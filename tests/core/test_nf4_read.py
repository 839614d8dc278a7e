"""Reading bitsandbytes' stored 4-bit weights (minipissa.core.nf4_read), bit for bit against bitsandbytes 0.50.2.

Oracle: bitsandbytes' own steps of ``functional.dequantize_4bit``: the first-level absmax as it computes it
(``dequantize_blockwise(absmax, state2) + offset`` for double quantization), then its pure-torch reference
``backends.default.ops._dequantize_4bit_compute``; and the whole ``functional.dequantize_4bit`` call wherever its CPU
C kernel is right (a last dim that is a multiple of the block, or a CPU whose kernel does not cut blocks per row:
see tests/core/test_nf4.py, test_bnb_cpu_dequantize_kernel_is_right_or_cuts_blocks_per_row).
"""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch
from four_bit import dequantized
from hypothesis import example, given
from hypothesis import strategies as st

from minipissa.core import nf4, nf4_read

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def functional():
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle of these tests")
    finally:
        logger.setLevel(level)


def quantized(functional, shape, dtype, blocksize, nested, seed, storage=torch.uint8):
    """bitsandbytes' (packed, QuantState) of a Gaussian weight (std 0.02, as real weights: no subnormal products)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return functional.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4", quant_storage=storage
    )


def as_packed(packed, state) -> nf4_read.Packed4bit:
    """The QuantState's fields as a Packed4bit (plan/quantized_base.py maps real modules; here, by hand)."""
    nested = None
    if state.nested:
        s2 = state.state2
        nested = nf4_read.Nested(s2.absmax, s2.code, s2.blocksize, state.offset)
    data = nf4_read.packed_bytes(packed)
    return nf4_read.Packed4bit(data, state.absmax, state.blocksize, tuple(state.shape), state.dtype, nested)


def kernel_is_right(functional, shape, blocksize) -> bool:
    """Whether bnb's CPU kernel dequantizes ``shape`` right here: blocks that do not straddle rows, an odd last dim
    (the reference then runs), or a kernel that does not cut per row (probed once, on a (128, 96) weight)."""
    return shape[-1] % blocksize == 0 or shape[-1] % 2 == 1 or kernel_keeps_rows(functional)


@functools.cache
def kernel_keeps_rows(functional) -> bool:
    packed, state = quantized(functional, (128, 96), torch.float32, 64, False, 0)
    return torch.equal(functional.dequantize_4bit(packed, state), dequantized(packed, state))


@given(
    shape=st.tuples(st.integers(1, 24), st.integers(1, 300)),
    dtype=st.sampled_from(DTYPES),
    blocksize=st.sampled_from([64, 128, 256, 1024]),
    nested=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(shape=(40, 96), dtype=torch.float32, blocksize=64, nested=True, seed=0)  # 60 absmax: one nested block
@example(shape=(33, 260), dtype=torch.bfloat16, blocksize=64, nested=True, seed=1)  # 135 blocks, a partial one
@example(shape=(7, 129), dtype=torch.float16, blocksize=128, nested=True, seed=2)  # odd numel, partial blocks
@example(shape=(1, 1), dtype=torch.float32, blocksize=64, nested=False, seed=3)
def test_dequantize_is_bnbs(functional, shape, dtype, blocksize, nested, seed):
    packed, state = quantized(functional, shape, dtype, blocksize, nested, seed)
    p = as_packed(packed, state)
    assert nf4_read.problem(p) is None
    got = nf4_read.dequantize(p)
    want = dequantized(packed, state)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))  # bit for bit
    if kernel_is_right(functional, shape, blocksize):
        whole = functional.dequantize_4bit(packed, state).reshape(shape)
        assert torch.equal(got.reshape(-1).view(torch.uint8), whole.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [False, True])
def test_float_storage_is_read_as_its_bytes(functional, storage, nested):
    """quant_storage=bfloat16 (FSDP's QLoRA setup) gives a float tensor of packed indices: its bytes are the codes,
    whatever its dtype says (peft#3742 decomposed them as if they were the weight)."""
    packed, state = quantized(functional, (24, 64), torch.bfloat16, 64, nested, 5, storage)
    assert packed.dtype == storage
    got = nf4_read.dequantize(as_packed(packed, state))
    assert torch.equal(got, dequantized(packed, state))
    assert torch.equal(got, functional.dequantize_4bit(packed, state))


def test_the_nested_absmax_is_bnbs_and_its_code_map_is_read_not_derived(functional):
    """The first-level absmax of double quantization equals bitsandbytes', and comes from the state's own 256-entry
    map: another map (here, the map reversed) gives other values."""
    packed, state = quantized(functional, (64, 320), torch.float32, 64, True, 7)
    p = as_packed(packed, state)
    want = functional.dequantize_blockwise(state.absmax, state.state2)
    want += state.offset
    assert torch.equal(nf4_read.first_level_absmax(p), want)
    assert p.nested is not None
    other = nf4_read.Nested(p.nested.absmax, p.nested.code.flip(0), p.nested.blocksize, p.nested.offset)
    flipped = nf4_read.Packed4bit(p.data, p.absmax, p.blocksize, p.shape, p.dtype, other)
    assert not torch.equal(nf4_read.first_level_absmax(flipped), want)


def test_problems_name_what_was_found():
    """Every malformed field is named (no oracle needed: hand-made states)."""
    shape = (4, 40)  # 160 elements: 80 bytes, 3 blocks of 64
    good = nf4_read.Packed4bit(torch.zeros(80, dtype=torch.uint8), torch.ones(3), 64, shape, torch.float16)
    assert nf4_read.problem(good) is None
    nested = nf4_read.Nested(torch.ones(1), torch.linspace(-1, 1, 256), 256, torch.tensor(0.5))
    good_nested = nf4_read.Packed4bit(good.data, torch.zeros(3, dtype=torch.uint8), 64, shape, torch.float16, nested)
    assert nf4_read.problem(good_nested) is None
    cases = {
        "blocksize 32": dict(blocksize=32),
        "blocksize 96": dict(blocksize=96),
        "shape (4, 0)": dict(shape=(4, 0)),
        "torch.float64": dict(dtype=torch.float64),
        "79 packed torch.uint8 values": dict(data=torch.zeros(79, dtype=torch.uint8)),
        "absmax of (3,) torch.float16": dict(absmax=torch.ones(3, dtype=torch.float16)),
        "absmax of (2,) torch.float32": dict(absmax=torch.ones(2)),
    }
    for what, change in cases.items():
        fields = dict(data=good.data, absmax=good.absmax, blocksize=64, shape=shape, dtype=torch.float16)
        problem = nf4_read.problem(nf4_read.Packed4bit(**(fields | change)))
        assert problem is not None and what in problem, (what, problem)
    nested_cases = {
        "nested code map of (255,)": dict(code=torch.ones(255)),
        "nested absmax of (2,)": dict(absmax=torch.ones(2)),
        "nested offset of NoneType": dict(offset=None),
        "nested blocksize of 0": dict(blocksize=0),
    }
    for what, change in nested_cases.items():
        n = dict(absmax=nested.absmax, code=nested.code, blocksize=256, offset=nested.offset) | change
        p = nf4_read.Packed4bit(good_nested.data, good_nested.absmax, 64, shape, torch.float16, nf4_read.Nested(**n))
        problem = nf4_read.problem(p)
        assert problem is not None and what in problem, (what, problem)
    wrong_codes = nf4_read.Packed4bit(good.data, torch.ones(3), 64, shape, torch.float16, nested)  # float32, not uint8
    assert "8-bit absmax codes" in (nf4_read.problem(wrong_codes) or "")


def test_multiples_of_64_share_their_absmax():
    """A blocksize of 64k reads as k blocks of 64 with one absmax: each element code * its block's absmax, from the
    one dequantizer (no oracle needed: compared with nf4.dequantize of the absmax repeated by hand)."""
    g = torch.Generator().manual_seed(0)
    shape, blocksize = (5, 100), 256  # 500 elements: 2 blocks of 256 (the second partial), 8 of 64
    data = torch.randint(0, 256, ((math.prod(shape) + 1) // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(2, generator=g) + 0.5
    got = nf4_read.dequantize(nf4_read.Packed4bit(data, absmax, blocksize, shape, torch.float32))
    by_hand = torch.tensor([absmax[0]] * 4 + [absmax[1]] * 4)
    assert torch.equal(got, nf4.dequantize(data, by_hand, shape, torch.float32))
    flat = got.reshape(-1)
    codes = torch.stack([data >> 4, data & 15], 1).reshape(-1)[:500].long()
    assert torch.equal(flat[:256], nf4.code_table()[codes[:256]] * absmax[0])
    assert torch.equal(flat[256:], nf4.code_table()[codes[256:]] * absmax[1])


# --------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; the lead runs them on the H200): the same bytes as on the CPU, and bnb's CUDA kernel's


def random_packed(shape, dtype, blocksize, nested, g, device="cpu") -> nf4_read.Packed4bit:
    """Random codes and statistics of the right sizes (every byte value: no oracle needed, CPU vs CUDA)."""
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    data = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g).to(device)
    if not nested:
        return nf4_read.Packed4bit(data, (torch.rand(blocks, generator=g) * 0.1).to(device), blocksize, shape, dtype)
    codes = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g).to(device)
    code8 = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
    nest = nf4_read.Nested(
        (torch.rand(-(-blocks // 256), generator=g) * 0.05).to(device), code8.to(device), 256, torch.tensor(0.03)
    )
    return nf4_read.Packed4bit(data, codes, blocksize, shape, dtype, nest)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 1024])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dequantize_is_the_cpus_bit_for_bit(dtype, blocksize, nested):
    for shape in [(40, 96), (33, 260), (7, 129), (4096, 4096)]:
        cpu = random_packed(shape, dtype, blocksize, nested, torch.Generator().manual_seed(shape[1]))
        cuda = random_packed(shape, dtype, blocksize, nested, torch.Generator().manual_seed(shape[1]), "cuda")
        assert nf4_read.problem(cpu) is None and nf4_read.problem(cuda) is None
        got = nf4_read.dequantize(cuda)
        assert got.device.type == "cuda"
        want = nf4_read.dequantize(cpu)
        assert torch.equal(got.cpu().reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dequantize_is_bnbs_cuda_kernel(functional, dtype, blocksize, nested, storage):
    """On the GPU the oracle is bitsandbytes' own CUDA dequantize_4bit (no per-row blocks there)."""
    for shape in [(40, 96), (33, 260), (7, 132), (1024, 4096)]:
        g = torch.Generator().manual_seed(shape[0])
        w = (torch.randn(shape, generator=g) * 0.02).to(dtype).cuda()
        packed, state = functional.quantize_4bit(
            w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4", quant_storage=storage
        )
        got = nf4_read.dequantize(as_packed(packed, state))
        want = functional.dequantize_4bit(packed, state).reshape(shape)
        assert got.device.type == "cuda" and got.dtype == dtype
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), shape
