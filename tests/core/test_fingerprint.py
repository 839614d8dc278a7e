"""Fingerprints: an exact hash of every element and its position, the same whatever the chunking, the device or
the order of the sum; version-1 fingerprints still compared in their own terms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minipissa.core import fingerprint as fp

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    chunk=st.integers(1, 64),
)
def test_every_change_of_one_element_or_two_positions_changes_the_hash(rows, cols, dtype, seed, chunk):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    digest = fp.fingerprint(w)["hash"]
    i = int(torch.randint(0, w.numel(), (), generator=g))
    flipped = w.clone()
    flipped.view(-1).view(torch.uint8)[i * w.element_size()] ^= 1  # one bit of one element
    assert fp.fingerprint(flipped)["hash"] != digest
    j = (i + 1 + int(torch.randint(0, max(w.numel() - 1, 1), (), generator=g))) % w.numel()
    swapped = w.clone().view(-1)
    if swapped[i] != swapped[j]:
        swapped[[i, j]] = swapped[[j, i]]
        assert fp.fingerprint(swapped.view(rows, cols))["hash"] != digest
    # The sum is taken modulo 2^64 over absolute positions: how it is chunked changes nothing.
    original = fp.CHUNK
    try:
        fp.CHUNK = chunk
        assert fp.fingerprint(w)["hash"] == digest
    finally:
        fp.CHUNK = original


def test_fingerprints_of_odd_tensors():
    for t in (torch.zeros(0), torch.tensor(3.0), torch.arange(7), torch.ones(2, 3, 4, dtype=torch.float16)):
        print_ = fp.fingerprint(t)
        assert print_["shape"] == list(t.shape) and len(print_["hash"]) == 16
    assert not fp.same(fp.fingerprint(torch.ones(2, 3)), torch.ones(3, 2))
    assert not fp.same(fp.fingerprint(torch.ones(2, 3)), torch.ones(2, 3, dtype=torch.float64))
    nan = torch.tensor([1.0, float("nan")])
    assert not fp.is_finite(fp.fingerprint(nan)) and fp.is_finite(fp.fingerprint(torch.ones(2)))


def test_fingerprinting_never_changes_the_tensor():
    """An int64 view of a float64 weight is the weight's own memory: hashing must not write into it."""
    for dtype in (torch.float64, torch.int64, torch.float32):
        w = (torch.randn(50, 30) * 10).to(dtype)
        before = w.clone()
        fp.fingerprint(w)
        assert torch.equal(w, before), dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_gpu_and_the_cpu_give_the_same_hash(dtype):
    w = torch.randn(1000, 777, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert fp.fingerprint(w.cuda())["hash"] == fp.fingerprint(w)["hash"]
    assert fp.hashes([w.cuda(), w[:16].cuda(), w[16:32].cuda(), w]) == fp.hashes([w, w[:16], w[16:32], w.cuda()])
    assert fp.same(fp.fingerprint(w), w.cuda())


def test_version_1_fingerprints_compare_by_moments_and_samples():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    now = fp.fingerprint(w)
    legacy = {"shape": [64, 96], "dtype": "float32", "sum": now["sum"], "sumsq": now["sumsq"]}
    legacy["sample_sha256"] = fp._legacy_sample_sha256(w)
    assert fp.same(legacy, w)
    other = w.clone()
    other[0, 0] += 1.0  # a sampled element
    assert not fp.same(legacy, other)


@given(
    shapes=st.lists(st.sampled_from([(3, 5), (5, 3), (7,), (0,), (), (2, 3, 4)]), min_size=1, max_size=8),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=8, max_size=8),
    seed=st.integers(0, 2**16),
    chunk=st.sampled_from([1, 7, fp.CHUNK]),
)
def test_hashes_of_many_tensors_at_once_are_their_fingerprints_hashes(shapes, dtypes, seed, chunk):
    """hashes() hashes tensors of one shape and dtype together (the initial factors): each is its own fingerprint's
    hash, however the group is chunked."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g).to(dtype) for shape, dtype in zip(shapes, dtypes, strict=False)]
    expected = [fp.fingerprint(t)["hash"] for t in tensors]
    original = fp.CHUNK
    try:
        fp.CHUNK = chunk
        assert fp.hashes(tensors) == expected
    finally:
        fp.CHUNK = original


@given(n=st.integers(1, 300), width=st.integers(1, 5000))
def test_a_group_of_tensors_is_hashed_within_the_chunk_of_temporaries(n, width):
    """hashes() stacks many tensors: a step covers at most CHUNK elements of all of them (or one row of each)."""
    step = fp.rows_per_step(n, width)
    assert step >= 1 and (n * step * width <= fp.CHUNK or step == 1)
