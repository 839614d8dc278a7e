"""NF4 storage (minipissa.core.nf4) checked code for code against bitsandbytes 0.50.2 (the oracle tests, skipped
without bitsandbytes), plus properties that need no oracle: the round-trip error bound, idempotence, the
independence of blocks, and the NF4Weight module (dtype casts, state dict, checksum, validation, pickling).

Oracles: ``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`` for the codes and absmax
(bnb's packed tensor is ((n + 1) // 2, 1): compared through ``.view(-1)``), and bnb's pure-torch reference
``bitsandbytes.backends.default.ops._dequantize_4bit_compute`` for dequantization. bnb's CPU C kernel
(``functional.dequantize_4bit`` on the CPU) is compared only where the last dim is a multiple of 64: it cuts
blocks per row, which is wrong otherwise (see test_bnb_cpu_dequantize_kernel_cuts_blocks_per_row), and it may
flush bfloat16 subnormal results to zero.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import pickle
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minipissa.core import nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {
    torch.uint8: torch.uint8,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}
CLAMP = 1e-38  # the scale's clamp; a full block's absmax below it is not what its codes were scaled by
#: The widest gap between adjacent codes is at the bottom, -1.0 .. -0.6961928 (0.3038), not at the top
#: (0.7229568 .. 1.0, 0.2770): a scaled value is at most half of it from its code.
HALF_GAP = max(b - a for a, b in zip(nf4.CODE[:-1], nf4.CODE[1:], strict=True)) / 2
ROUND = 4 * torch.finfo(torch.float32).eps  # x * (1 / absmax) and code * absmax: a few float32 roundings


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||weight - approx||_F / ||weight||_F in float32."""
    return float(torch.linalg.vector_norm(weight.float() - approx.float()) / torch.linalg.vector_norm(weight.float()))


def more(n: int) -> settings:
    """At least ``n`` examples for a cheap test, more if the profile (explore) asks for more."""
    return settings(max_examples=max(n, settings().max_examples))


# --------------------------------------------------------------------------------------------------------------
# Inputs and helpers


@st.composite
def shapes(draw) -> tuple[int, ...]:
    """1-D and 2-D shapes up to a few thousand elements: tiny (< 64), whole blocks, partial blocks, odd counts."""
    kind = draw(st.sampled_from(["1d", "1d-blocks", "2d", "2d-blocks"]))
    if kind == "1d":
        return (draw(st.integers(1, 3000)),)
    if kind == "1d-blocks":
        return (64 * draw(st.integers(1, 40)),)
    if kind == "2d":
        return (draw(st.integers(1, 48)), draw(st.integers(1, 100)))
    return (draw(st.integers(1, 24)), 64 * draw(st.integers(1, 3)))


@st.composite
def weights(draw, dtypes=DTYPES) -> torch.Tensor:
    """A finite weight: Gaussian or heavy-tailed (cubed), some exact zeros or not, scaled by 10**k over the
    dtype's range, contiguous or a transposed view."""
    shape = draw(shapes())
    dtype = draw(st.sampled_from(dtypes))
    k = draw(st.integers(-4, 3) if dtype == torch.float16 else st.integers(-30, 10))
    seed, heavy, zeros = draw(st.integers(0, 2**16)), draw(st.booleans()), draw(st.booleans())
    transpose = len(shape) == 2 and draw(st.booleans())
    return make_weight(shape, dtype, seed, k, heavy, zeros, transpose)


def make_weight(shape, dtype, seed, k=0, heavy=False, zeros=False, transpose=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape[::-1] if transpose else shape, generator=g, dtype=torch.float64)
    if heavy:
        base = base**3
    if zeros:
        base[torch.rand(base.shape, generator=g) < 0.25] = 0.0
    w = base * 10.0**k  # in float64: no under/overflow before the cast
    if dtype == torch.float16:
        w = w.clamp(-6e4, 6e4)
    w = w.to(dtype)
    return w.t() if transpose else w


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that equality is bit equality (-0.0 != 0.0, NaN == the same NaN)."""
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    differ = bits(got) != bits(want)
    assert not differ.any(), f"{int(differ.sum())} differ, first at {differ.nonzero()[0].tolist()}"


def assert_same_or_both_nan(got: torch.Tensor, want: torch.Tensor) -> None:
    """NaN in the same places (whatever the NaN bits), every other value bit-identical."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    keep = ~want.isnan()
    assert_bit_equal(got[keep], want[keep])


def unpack(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit indices in element order (first of a pair in the high nibble), as int64."""
    return torch.stack([codes >> 4, codes & 15], dim=1).view(-1)[:numel].long()


def per_element(absmax: torch.Tensor, numel: int) -> torch.Tensor:
    return absmax.repeat_interleave(nf4.BLOCK)[:numel]


def random_packed(numel: int, seed: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arbitrary codes (any byte, padding nibble included) and positive absmax (some zero)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, ((numel + 1) // 2,), generator=g, dtype=torch.uint8)
    absmax = (torch.rand(-(-numel // nf4.BLOCK), generator=g, dtype=torch.float64) * 10.0**k).float()
    absmax[torch.rand(absmax.shape, generator=g) < 0.1] = 0.0
    return codes, absmax


@pytest.fixture(scope="module")
def bnb() -> SimpleNamespace:
    """bitsandbytes' quantize_4bit, its reference dequantization and its CPU dequantize_4bit, as plain calls."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward from kernels-community": not used here
    try:
        functional = pytest.importorskip("bitsandbytes.functional")
        default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    finally:
        logger.setLevel(level)
    code = functional.get_4bit_type("nf4", device="cpu")
    # The reference is wrapped in torch.compile (falling back to plain eager on failure): call the function itself,
    # which is what the fallback runs, and avoids compiling (and recompiling for every shape) on the CPU.
    reference = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)

    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert packed.shape == ((w.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
        return packed.view(-1), state.absmax

    def dequantize_reference(codes, absmax, shape, dtype) -> torch.Tensor:
        return reference(codes, absmax, code, 64, tuple(shape), dtype)

    def dequantize_cpu(codes, absmax, shape, dtype) -> torch.Tensor:
        state = functional.QuantState(
            absmax=absmax, shape=torch.Size(shape), code=code, blocksize=64, quant_type="nf4", dtype=dtype
        )
        return functional.dequantize_4bit(codes.view(-1, 1), state).reshape(shape)  # 1-D even n comes as (1, n)

    # Whether bnb's CPU kernel takes the blocks per row (wrong absmax for a last dim that is not a multiple of 64):
    # its AVX-512 code does (bitsandbytes 0.50.2), its portable code does not. Probed, not assumed: CI machines vary.
    probe = make_weight((128, 96), torch.float32, seed=0)
    packed, absmax = quantize(probe)
    cuts_rows = not torch.equal(
        dequantize_cpu(packed, absmax, probe.shape, torch.float32),
        dequantize_reference(packed, absmax, probe.shape, torch.float32),
    )
    return SimpleNamespace(
        code=code, quantize=quantize, dequantize_reference=dequantize_reference, dequantize_cpu=dequantize_cpu,
        kernel_cuts_rows=cuts_rows,
    )  # fmt: skip


def assert_quantized_like_bnb(bnb, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes, absmax = nf4.quantize(w)
    want_codes, want_absmax = bnb.quantize(w)
    assert codes.dtype == torch.uint8 and codes.shape == ((w.numel() + 1) // 2,)
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-w.numel() // 64),)
    assert_bit_equal(codes, want_codes)
    assert_bit_equal(absmax, want_absmax)
    return codes, absmax


# --------------------------------------------------------------------------------------------------------------
# 1. Codes and absmax: bit-identical to bnb


def test_the_code_table_is_bnbs(bnb):
    assert_bit_equal(nf4.code_table(), bnb.code)
    pairs = nf4.pair_table()
    assert pairs.shape == (256, 2) and pairs.dtype == torch.float32
    assert_bit_equal(pairs, torch.stack([bnb.code[torch.arange(256) >> 4], bnb.code[torch.arange(256) & 15]], 1))


@more(200)
@given(w=weights())
@example(w=torch.randn(1))
@example(w=torch.randn(63))
@example(w=torch.randn(65))
@example(w=torch.randn(127).to(torch.bfloat16))
@example(w=torch.randn(4096, dtype=torch.float64).mul(1e-30).float())
@example(w=torch.randn(96, 128).to(torch.float16).t())
def test_codes_and_absmax_are_bnbs(bnb, w):
    assert_quantized_like_bnb(bnb, w)


def test_half_precision_quantizes_from_its_float32_upcast(bnb):
    w = make_weight((33, 77), torch.float32, seed=1)
    for dtype in (torch.bfloat16, torch.float16):
        low = w.to(dtype)
        codes, absmax = nf4.quantize(low)
        assert_bit_equal(codes, nf4.quantize(low.float())[0])
        assert_bit_equal(absmax, nf4.quantize(low.float())[1])
        assert_quantized_like_bnb(bnb, low)


# --------------------------------------------------------------------------------------------------------------
# 2. Ties: a scaled value equal to a float32 midpoint between two codes takes the lower index

#: The float32 midpoints, computed as both implementations do: (code[i] + code[i + 1]) / 2 in float32.
MIDPOINTS = ((nf4.code_table()[:-1] + nf4.code_table()[1:]) / 2).tolist()


def test_the_float32_midpoints():
    # 6 of the 15 are the exact midpoints (true ties); for the other 9 the sum is rounded and the float32
    # midpoint lies half an ulp off the real one: the rule is "<= the float32 midpoint -> lower index" either way.
    exact = [
        i for i, m in enumerate(MIDPOINTS) if Fraction(m) == (Fraction(nf4.CODE[i]) + Fraction(nf4.CODE[i + 1])) / 2
    ]
    assert exact == [2, 6, 7, 9, 11, 13]
    assert abs(HALF_GAP - 0.1519036) < 1e-7


def tie_block(exponent: int, seed: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block (``length`` <= 64 elements, the rest zero) scaled by 2**exponent (exact both ways), absmax
    2**exponent, holding every midpoint, the float32 values just below and above it, +-1 and 0; and the indices
    the rule gives: 15 / 0 for +-1, i at and below midpoint i, i + 1 above it, 7 for 0."""
    values, index = [1.0, -1.0, 0.0], [15, 0, 7]
    for i, m in enumerate(MIDPOINTS):
        m32 = torch.tensor(m)
        values += [m, float(torch.nextafter(m32, torch.tensor(-2.0))), float(torch.nextafter(m32, torch.tensor(2.0)))]
        index += [i, i, i + 1]
    values += [0.0] * (length - len(values))
    index += [7] * (length - len(index))
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed))
    block = torch.tensor(values, dtype=torch.float32)[order] * 2.0**exponent
    return block, torch.tensor(index)[order]


@st.composite
def tie_weights(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero to two random full blocks, then the tie block, as a full block or as the partial last block."""
    exponent, seed = draw(st.integers(-100, 100)), draw(st.integers(0, 2**16))
    before = draw(st.integers(0, 2))
    block, index = tie_block(exponent, seed, draw(st.sampled_from([64, 48, 49, 63])))
    w = torch.cat([make_weight((64 * before,), torch.float32, seed), block])
    return w, index


@more(60)
@given(case=tie_weights())
def test_midpoints_take_the_lower_index(case):
    w, index = case
    codes, absmax = nf4.quantize(w)
    tail = w.numel() - index.numel()
    assert torch.equal(unpack(codes, w.numel())[tail:], index)
    assert absmax[-1] == w[tail:].abs().max()


@more(60)
@given(case=tie_weights())
def test_midpoints_like_bnb(bnb, case):
    w, index = case
    want_codes, _ = bnb.quantize(w)
    assert torch.equal(unpack(want_codes, w.numel())[w.numel() - index.numel() :], index)  # bnb follows the rule
    assert_quantized_like_bnb(bnb, w)


def reciprocal_block(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block whose values sit a few ulps around midpoint * absmax, chosen where x * (1 / absmax) and
    x / absmax fall on different sides of the midpoint; and the indices of the two rules (float32 arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    midpoints = torch.tensor(MIDPOINTS)
    while True:
        a = torch.rand((), generator=g) * 3 + 0.5
        near = (midpoints * a).view(torch.int32).unsqueeze(1) + torch.arange(-4, 5)
        x = near.view(torch.float32).reshape(-1)
        by_reciprocal = torch.bucketize(x * (1.0 / a), midpoints)
        by_division = torch.bucketize(x / a, midpoints)
        differ = by_reciprocal != by_division
        if int(differ.sum()) >= 2:
            break
    x = torch.cat([a.view(1), -a.view(1) * 0.5, x[differ][:62]])
    return x, torch.bucketize(x * (1.0 / a), midpoints), torch.bucketize(x / a, midpoints)


@pytest.mark.parametrize("seed", range(4))
def test_full_blocks_multiply_by_the_reciprocal_the_partial_one_divides(seed):
    """The same values as a full block (zero-padded to 64) and as the partial last block: the codes follow
    x * (1 / absmax) in the first, x / absmax in the second (they differ on these values: checked)."""
    x, by_reciprocal, by_division = reciprocal_block(seed)
    assert not torch.equal(by_reciprocal, by_division)
    full = torch.cat([x, torch.zeros(64 - x.numel())])
    w = torch.cat([full, x])
    index = unpack(nf4.quantize(w)[0], w.numel())
    assert torch.equal(index[: x.numel()], by_reciprocal)
    assert torch.equal(index[64:], by_division)


@pytest.mark.parametrize("seed", range(4))
def test_reciprocal_and_division_like_bnb(bnb, seed):
    x, by_reciprocal, by_division = reciprocal_block(seed)
    w = torch.cat([x, torch.zeros(64 - x.numel()), x])
    want_codes, _ = bnb.quantize(w)
    index = unpack(want_codes, w.numel())
    assert torch.equal(index[: x.numel()], by_reciprocal) and torch.equal(index[64:], by_division)
    assert_quantized_like_bnb(bnb, w)


# --------------------------------------------------------------------------------------------------------------
# 3. Zero, subnormal, NaN and Inf blocks


def special_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    finite = torch.randn(200, generator=g)
    mixed = torch.full((128,), 1e-40)
    mixed[[3, 5, 70]] = torch.tensor([-3e-39, 5e-39, 2e-39])
    cases = {
        "zeros-full": torch.zeros(128),
        "zeros-2d": torch.zeros(4, 64),
        "zeros-between": torch.cat([finite[:64], torch.zeros(64), finite[64:128]]),
        "subnormal-full": torch.full((64,), 1e-40),
        "subnormal-mixed": mixed,
        "below-clamp-normal": torch.full((64,), 5e-39).index_put_((torch.tensor([0]),), torch.tensor(1.1e-38)),
        "fp16-subnormal": (finite[:128] * 1e-6).to(torch.float16),
        "bf16-subnormal": torch.full((64,), 1e-40).to(torch.bfloat16),
        "negative-zero": torch.cat([torch.full((64,), -0.0), finite[:64]]),
    }  # fmt: skip
    for name, bad in [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)]:
        for where in (5, 70, 130, 199):  # in a full block, the second, the third, the partial last one
            w = finite.clone()
            w[where] = bad
            cases[f"{name}@{where}"] = w
    both = finite.clone()
    both[[1, 2]] = torch.tensor([math.inf, math.nan])
    cases["inf+nan"] = both
    return cases


SPECIAL = special_weights()


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_special_blocks_like_bnb(bnb, name):
    w = SPECIAL[name]
    codes, absmax = nf4.quantize(w)
    want_codes, want_absmax = bnb.quantize(w)
    assert_bit_equal(codes, want_codes)
    assert_same_or_both_nan(absmax, want_absmax)
    for dtype in DTYPES:
        want = bnb.dequantize_reference(want_codes, want_absmax, w.shape, dtype)
        assert_same_or_both_nan(nf4.dequantize(codes, absmax, w.shape, dtype), want)


def test_zero_and_subnormal_blocks():
    codes, absmax = nf4.quantize(SPECIAL["zeros-full"])
    assert (codes == 0x77).all() and torch.equal(absmax, torch.zeros(2))
    # A block whose absmax is below the 1e-38 clamp is scaled by 1e38, not by 1 / absmax: all 1e-40 -> 0.01 -> 7,
    # while the stored absmax is the true one (full blocks; the partial last block stores the clamp: below).
    codes, absmax = nf4.quantize(SPECIAL["subnormal-full"])
    assert (codes == 0x77).all() and bits(absmax).tolist() == bits(torch.tensor([1e-40])).tolist()
    w = SPECIAL["subnormal-mixed"]
    index = unpack(nf4.quantize(w)[0], w.numel())
    # In units of 1e-38: 0.01 -> 0.0 (7); -0.3 -> -0.2844 (4); 0.5 -> 0.4407 (12, below the 0.5017 midpoint); 0.2 ->
    # 0.1609 (9, below 0.2035). Scaled by 1 / absmax instead, the block maxima 5e-39 and 2e-39 would give 15.
    assert index[[0, 3, 5, 70]].tolist() == [7, 4, 12, 9]
    assert float(nf4.dequantize(*nf4.quantize(SPECIAL["zeros-2d"]), (4, 64), torch.float32).abs().max()) == 0.0


def test_nan_and_inf_blocks():
    """A NaN anywhere in a block makes the whole block NaN on dequantization (absmax NaN). An Inf makes absmax
    Inf, so x * (1 / absmax) is 0 * Inf = NaN for the Inf (index 15, where NaN lands) and 0 for the rest
    (index 7): it dequantizes to +Inf (whatever its sign) and the rest of its block to 0 * Inf = NaN.
    The other blocks are untouched."""
    for name in ("nan@70", "inf@70", "-inf@70"):
        w = SPECIAL[name]
        codes, absmax = nf4.quantize(w)
        out = nf4.dequantize(codes, absmax, w.shape, torch.float32)
        block = out[64:128]
        if name == "nan@70":
            assert absmax[1].isnan() and block.isnan().all()
        else:
            assert absmax[1] == math.inf
            assert unpack(codes, w.numel())[64:128].tolist() == [7] * 6 + [15] + [7] * 57
            assert block[6] == math.inf and block[torch.arange(64) != 6].isnan().all()
        for lo, hi in ((0, 64), (128, 200)):
            alone = nf4.dequantize(*nf4.quantize(w[lo:hi]), (hi - lo,), torch.float32)
            assert alone.isfinite().all()
            assert_bit_equal(out[lo:hi], alone)


# bnb clamps the partial last block's stored absmax at 1e-38 too (torch.clamp(am, min=1e-38) before the cat),
# but not the full blocks': a zero tail stores 1e-38, a zero full block 0. (minipissa stored the true maximum
# until this was found; the codes agreed all along.)
TAIL_BELOW_CLAMP = {
    "zeros-65": torch.zeros(65),
    "zeros-5": torch.zeros(5),
    "one-1e-39": torch.tensor([1e-39]),
    "subnormal-tail-70": torch.full((70,), 1e-40),
}


@pytest.mark.parametrize("name", sorted(TAIL_BELOW_CLAMP))
def test_partial_block_absmax_below_the_clamp_is_stored_clamped(name):
    w = TAIL_BELOW_CLAMP[name]
    codes, absmax = nf4.quantize(w)
    assert_bit_equal(absmax[-1:], torch.tensor([CLAMP]))
    full = w.numel() - w.numel() % 64
    assert_bit_equal(absmax[:-1], w[:full].view(-1, 64).abs().amax(dim=1))  # full blocks: the true maximum
    if name == "one-1e-39":  # 1e-39 / 1e-38 = 0.1 -> 0.0796 (index 8); it dequantizes to 0.0796 * 1e-38
        assert codes.tolist() == [0x87]
        assert nf4.dequantize(codes, absmax, (1,), torch.float32) == torch.tensor(nf4.CODE[8]) * torch.tensor(CLAMP)


@pytest.mark.parametrize("name", sorted(TAIL_BELOW_CLAMP))
def test_partial_block_absmax_below_the_clamp_like_bnb(bnb, name):
    w = TAIL_BELOW_CLAMP[name]
    codes, absmax = assert_quantized_like_bnb(bnb, w)
    for dtype in DTYPES:
        assert_bit_equal(
            nf4.dequantize(codes, absmax, w.shape, dtype), bnb.dequantize_reference(codes, absmax, w.shape, dtype)
        )


# --------------------------------------------------------------------------------------------------------------
# 4. The partial last block and odd counts


@more(100)
@given(w=weights())
@example(w=torch.randn(1))
@example(w=torch.randn(3, 43))
@example(w=torch.randn(64 * 3 + 1))
def test_blocks_are_independent_and_odd_counts_pad_with_7(w):
    numel = w.numel()
    codes, absmax = nf4.quantize(w)
    assert codes.shape == ((numel + 1) // 2,) and absmax.shape == (-(-numel // 64),)
    flat = w.reshape(-1)
    if numel % 2:
        assert int(codes[-1]) & 15 == 7  # the zero's index (qpissa.md: an odd count is padded with nibble 7)
    full = numel - numel % 64
    if full:  # the full blocks quantize as they would alone
        head_codes, head_absmax = nf4.quantize(flat[:full])
        assert_bit_equal(codes[: full // 2], head_codes)
        assert_bit_equal(absmax[: full // 64], head_absmax)
    if full < numel:  # so does the partial last block, with its own absmax (full is even: the bytes align)
        tail_codes, tail_absmax = nf4.quantize(flat[full:])
        assert_bit_equal(codes[full // 2 :], tail_codes)
        assert_bit_equal(absmax[-1:], tail_absmax)
        assert absmax[-1] == flat[full:].float().abs().max().clamp(min=CLAMP)  # stored clamped, as bnb does
    blocks = flat[:full].float().view(-1, 64)
    assert_bit_equal(absmax[: full // 64], blocks.abs().amax(dim=1))  # full blocks: never clamped


@pytest.mark.parametrize("numel", [1, 2, 3, 63, 64, 65, 66, 127, 129, 191, 1001])
def test_partial_and_odd_like_bnb(bnb, numel):
    w = make_weight((numel,), torch.float32, seed=numel)
    codes, _ = assert_quantized_like_bnb(bnb, w)
    if numel % 2:
        assert int(codes[-1]) & 15 == 7 and int(bnb.quantize(w)[0][-1]) & 15 == 7
    assert bytes(nf4.quantize(torch.tensor([-1.0, 1.0]))[0].tolist()) == b"\x0f"  # first in the high nibble


# --------------------------------------------------------------------------------------------------------------
# 5. Dequantization: bit-identical to bnb's reference, and to its CPU kernel where rows are whole blocks


@more(200)
@given(
    shape=shapes(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    k=st.integers(-40, 38),
    from_weight=st.booleans(),
)
@example(shape=(128, 96), dtype=torch.float32, seed=0, k=0, from_weight=True)
@example(shape=(7, 64), dtype=torch.float16, seed=0, k=5, from_weight=False)  # beyond float16: Inf in both
@example(shape=(65,), dtype=torch.bfloat16, seed=0, k=-40, from_weight=False)  # subnormal absmax
@example(shape=(320,), dtype=torch.bfloat16, seed=1, k=-35, from_weight=False)  # bnb's kernel flushes to 0
@example(shape=(1280,), dtype=torch.bfloat16, seed=0, k=-37, from_weight=False)  # ... and rounds up in ours
def test_dequantize_is_bnbs(bnb, shape, dtype, seed, k, from_weight):
    numel = math.prod(shape)
    if from_weight:
        codes, absmax = nf4.quantize(make_weight(shape, torch.float32, seed, k=max(min(k, 10), -30)))
    else:
        codes, absmax = random_packed(numel, seed, k)
    out = nf4.dequantize(codes, absmax, shape, dtype)
    assert_bit_equal(out, bnb.dequantize_reference(codes, absmax, shape, dtype))
    assert_bit_equal(out, nf4.dequantize(codes, absmax, shape, dtype, nf4.pair_table()))
    assert_bit_equal(out, nf4.dequantize(codes, absmax, shape, torch.float32).to(dtype))  # fp32, then the cast
    if shape[-1] % 64 == 0 or (shape[-1] % 2 == 0 and not bnb.kernel_cuts_rows):
        kernel = bnb.dequantize_cpu(codes, absmax, shape, dtype)
        if dtype == torch.bfloat16:
            # bnb's CPU kernel may flush subnormal float32 products to (signed) zero before the bfloat16 cast
            # (AVX512-BF16's conversion does; seen here: 8.6e-39 -> 0.0, and -1.1754942e-38, which rounds up to
            # bfloat16's smallest normal, -> -0.0). Accept either there.
            product = nf4.dequantize(codes, absmax, shape, torch.float32)
            flushed = (product.abs() < torch.finfo(torch.float32).smallest_normal) & (kernel == 0)
            assert torch.equal(kernel.signbit()[flushed], out.signbit()[flushed])
            kernel = torch.where(flushed, out, kernel)
        assert_bit_equal(out, kernel)


def test_bnb_cpu_dequantize_kernel_is_right_or_cuts_blocks_per_row(bnb):
    """Documents bitsandbytes 0.50.2, not minipissa. Its CPU C kernel for dequantize_4bit either equals the reference
    (its portable code, e.g. on CPUs without AVX-512), or takes the blocks per row (shape[-1] elements: its AVX-512
    code), so that a shape whose last dim is not a multiple of 64 (and even: odd ones fall back to the reference)
    dequantizes with the wrong absmax. test_dequantize_is_bnbs compares with the kernel wherever it is right."""
    shape = (128, 96)
    w = make_weight(shape, torch.float32, seed=0)
    codes, absmax = bnb.quantize(w)
    reference = bnb.dequantize_reference(codes, absmax, shape, torch.float32)
    kernel = bnb.dequantize_cpu(codes, absmax, shape, torch.float32)
    assert_bit_equal(nf4.dequantize(codes, absmax, shape, torch.float32), reference)
    if not bnb.kernel_cuts_rows:  # then right on every even last dim, not only the probed one
        for other in ((5, 130), (2, 70), (64, 32), (1, 2)):
            x = make_weight(other, torch.float32, seed=1)
            c, a = bnb.quantize(x)
            assert_bit_equal(bnb.dequantize_cpu(c, a, other, torch.float32), nf4.dequantize(c, a, other, torch.float32))
        return
    assert not torch.equal(kernel, reference)
    assert relative_error(w, kernel) > 2 * relative_error(w, reference)  # ~0.25 against ~0.09


# --------------------------------------------------------------------------------------------------------------
# 6. Round trip (no oracle needed)


def normal_blocks(absmax: torch.Tensor, numel: int) -> torch.Tensor:
    """Per element: its block was scaled by 1 / absmax (absmax 0 or >= the clamp; not NaN or Inf)."""
    a = per_element(absmax, numel)
    return (a == 0) | (a >= CLAMP)


@more(100)
@given(w=weights())
@example(w=torch.full((70,), 1e-40))  # below the clamp: excluded from the bound (codes all 7, error = |w|)
@example(w=torch.randn(64) * 1e-38)
def test_round_trip_error_is_within_half_the_widest_gap(w):
    """|w - deq(q(w))| <= absmax * (HALF_GAP + a few float32 roundings) + the cast to w's dtype; and each index
    is the nearest code to w / absmax (within those roundings), checked in float64."""
    numel, dtype = w.numel(), w.dtype
    codes, absmax = nf4.quantize(w)
    out = nf4.dequantize(codes, absmax, w.shape, dtype)
    assert out.dtype == dtype and out.shape == w.shape
    x = w.reshape(-1).double()
    a = per_element(absmax, numel).double()
    keep = normal_blocks(absmax, numel)
    finfo = torch.finfo(dtype)
    bound = a * (HALF_GAP + ROUND + finfo.eps) + finfo.smallest_normal * finfo.eps
    error = (x - out.reshape(-1).double()).abs()
    assert (error[keep] <= bound[keep]).all(), float((error - bound)[keep].max())
    scaled = torch.where(a > 0, x / a, torch.zeros_like(x))[keep]
    code = torch.tensor(nf4.CODE, dtype=torch.float64)
    distance = (scaled - code[unpack(codes, numel)[keep]]).abs()
    assert (distance <= (scaled.unsqueeze(1) - code).abs().amin(dim=1) + 2 * ROUND).all()
    assert (distance <= HALF_GAP + ROUND).all()


@more(100)
@given(w=weights())
@example(w=torch.randn(3, 5))
@example(w=(torch.randn(1000) * 1e-4).to(torch.float16))  # absmax too small for float16's normal range
def test_requantizing_the_dequantized_weight_is_the_identity(w):
    """q(deq(q(w))) == q(w), codes and absmax, for every block scaled by 1 / absmax (absmax 0 or >= 1e-38):
    each block's largest element comes back as exactly +-absmax (index 0 or 15: w * (1 / w) rounds to within
    an ulp of 1), and code * absmax re-scales to within a few ulps of its code, far from any midpoint.
    Not true below the clamp (the largest element need not map to +-1, so the absmax shrinks), nor through the
    weight's own dtype when code * absmax is subnormal there (float16 below ~2**-14 / 0.0796): rounding to a
    subnormal moves a value by up to half of 2**-24, which can be a large part of a tiny absmax."""
    codes, absmax = nf4.quantize(w)
    if not normal_blocks(absmax, w.numel()).all():
        return
    again = nf4.quantize(nf4.dequantize(codes, absmax, w.shape, torch.float32))
    assert_bit_equal(again[0], codes)
    assert_bit_equal(again[1], absmax)
    smallest = absmax[absmax > 0].min() if (absmax > 0).any() else torch.tensor(math.inf)
    if float(smallest) * nf4.CODE[8] >= torch.finfo(w.dtype).smallest_normal:
        again = nf4.quantize(nf4.dequantize(codes, absmax, w.shape, w.dtype))
        assert_bit_equal(again[0], codes)
        assert_bit_equal(again[1], absmax)


# --------------------------------------------------------------------------------------------------------------
# 7. NF4Weight


@more(50)
@given(w=weights(), stand_for=st.sampled_from([None, *DTYPES]))
def test_nf4_weight_dequantizes_as_the_functions(w, stand_for):
    module = nf4.NF4Weight.quantized(w, stand_for)
    dtype = stand_for or w.dtype
    codes, absmax = nf4.quantize(w)
    assert module.shape == tuple(w.shape) and module.dtype == dtype
    assert_bit_equal(module.codes, codes)
    assert_bit_equal(module.absmax, absmax)
    assert_bit_equal(module.dequantize(), nf4.dequantize(codes, absmax, tuple(w.shape), dtype))
    for other in DTYPES:
        assert_bit_equal(module.dequantize(other), nf4.dequantize(codes, absmax, tuple(w.shape), other))
    assert module.bytes == codes.numel() + 4 * absmax.numel()


def test_dtype_casts_leave_the_storage_alone():
    w = make_weight((40, 70), torch.bfloat16, seed=7)
    module = nf4.NF4Weight.quantized(w)
    codes, absmax, table = module.codes.clone(), module.absmax.clone(), module.table.clone()
    expected = module.dequantize()
    for cast, dtype in (
        (lambda m: m.to(torch.float16), torch.float16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.bfloat16(), torch.bfloat16),
        (lambda m: m.double(), torch.float64),
        (lambda m: m.to("cpu", torch.float16), torch.float16),
        (lambda m: m.to("cpu"), torch.float16),  # a device move keeps the dtype
        (lambda m: m.float(), torch.float32),
    ):
        module = cast(module)
        assert module.codes.dtype == torch.uint8 and module.absmax.dtype == torch.float32
        assert module.table.dtype == torch.float32
        assert_bit_equal(module.codes, codes)
        assert_bit_equal(module.absmax, absmax)
        assert_bit_equal(module.table, table)
        # What it stands for follows the cast, as a dense weight's dtype would (unload, save_residual: one dtype).
        assert module.dtype == dtype
        assert_bit_equal(module.dequantize(torch.bfloat16), expected)


def test_state_dict_holds_the_codes_and_absmax_only():
    w = make_weight((9, 31), torch.float32, seed=2)
    module = nf4.NF4Weight.quantized(w)
    state = module.state_dict()
    assert set(state) == {"codes", "absmax"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = nf4.NF4Weight(torch.zeros_like(module.codes), torch.zeros_like(module.absmax), (9, 31), torch.float32)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert_bit_equal(fresh.dequantize(), module.dequantize())
    assert fresh.sha256() == module.sha256()


def test_sha256_covers_every_code_and_absmax_bit():
    w = make_weight((5, 100), torch.float32, seed=4)
    module = nf4.NF4Weight.quantized(w)
    digest = module.sha256()
    assert len(digest) == 64 and digest == nf4.NF4Weight.quantized(w.clone()).sha256()
    for i in (0, 17, module.codes.numel() - 1):
        codes = module.codes.clone()
        codes[i] ^= 1
        assert nf4.NF4Weight(codes, module.absmax.clone(), module.shape, module.dtype).sha256() != digest
    for i in range(module.absmax.numel()):
        for mask in (1, 1 << 30, -(2**31)):  # the lowest mantissa bit, an exponent bit, the sign bit
            absmax = module.absmax.clone()
            absmax.view(torch.int32)[i] ^= mask
            assert nf4.NF4Weight(module.codes.clone(), absmax, module.shape, module.dtype).sha256() != digest
    assert_bit_equal(module.packed(), torch.cat([module.codes, module.absmax.view(torch.uint8)]))


@pytest.mark.parametrize(
    "codes, absmax",
    [
        (torch.zeros(150, dtype=torch.int8), torch.zeros(5)),  # codes not uint8
        (torch.zeros(150), torch.zeros(5)),  # codes float
        (torch.zeros(149, dtype=torch.uint8), torch.zeros(5)),  # one byte short
        (torch.zeros(151, dtype=torch.uint8), torch.zeros(5)),  # one byte too many
        (torch.zeros(150, 1, dtype=torch.uint8), torch.zeros(5)),  # bnb's ((n + 1) // 2, 1): flatten it first
        (torch.zeros(150, dtype=torch.uint8), torch.zeros(5, dtype=torch.float16)),  # absmax float16
        (torch.zeros(150, dtype=torch.uint8), torch.zeros(5, dtype=torch.float64)),  # absmax float64
        (torch.zeros(150, dtype=torch.uint8), torch.zeros(4)),  # one block short
        (torch.zeros(150, dtype=torch.uint8), torch.zeros(6)),  # one block too many
        (torch.zeros(150, dtype=torch.uint8), torch.zeros(5, 1)),  # absmax 2-D
    ],
)
def test_bad_storage_is_refused(codes, absmax):
    nf4.NF4Weight(torch.zeros(150, dtype=torch.uint8), torch.zeros(5), (3, 100), torch.float32)  # the good one
    with pytest.raises(ValueError):
        nf4.NF4Weight(codes, absmax, (3, 100), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.float8_e4m3fn])
def test_other_dtypes_are_refused(dtype):
    with pytest.raises(TypeError):
        nf4.quantize(torch.ones(64).to(dtype))
    with pytest.raises(TypeError):
        nf4.NF4Weight.quantized(torch.ones(64).to(dtype))


def test_float64_is_refused_by_bnb_too(bnb):
    with pytest.raises((TypeError, ValueError)):
        bnb.quantize(torch.ones(64, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------
# 8. Pickle and deepcopy


@pytest.mark.parametrize("copy_", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy(copy_):
    w = make_weight((17, 33), torch.float16, seed=5)
    module = nf4.NF4Weight.quantized(w)
    clone = pickle.loads(pickle.dumps(module)) if copy_ == "pickle" else copy.deepcopy(module)
    assert clone is not module and clone.codes.data_ptr() != module.codes.data_ptr()
    assert clone.shape == module.shape and clone.dtype == module.dtype
    assert_bit_equal(clone.dequantize(), module.dequantize())
    assert clone.sha256() == module.sha256()
    assert set(clone.state_dict()) == {"codes", "absmax"}
    clone.codes[0] ^= 0xFF  # a copy, not a view
    assert clone.sha256() != module.sha256()
