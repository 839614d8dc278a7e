"""The stream's batched road: same-shape weights stacked and decomposed together, a chunk at a time.

On a GPU, weights of one (shape, dtype, device, rank, scaling) are stacked and decomposed together, so
that it runs one batched kernel instead of hundreds of small ones, in chunks of at most the config's
``memory_budget`` bytes of workspace whatever the model's size. The chunks are pipelined: the host
solves a chunk's small eigenproblem (in a worker thread) while the GPU works on the next one, and
waits for a chunk only once the next is queued. Each module's randomized sketch still comes from its
own generator seeded by (seed, module name), so grouping, chunking and order change the factors by
floating-point rounding of a batched product at most; each residual is computed later, per layer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from ..core import decompose, linalg, qpissa
from ..core.weights import weight_matrix
from .config import InitConfig
from .fetch import IN_PLACE, Weights
from .tree import Plan

Item = tuple[Plan, Tensor, Tensor, Tensor]  # plan, A0 (r, in), B0 (out, r), kept singular values (r,)


def workspace_bytes(m: int, n: int, columns: int | None, dtype: torch.dtype, iterates: bool = False) -> int:
    """Bytes one (m, n) weight needs while it is decomposed: its converted copy plus the workspace.

    ``columns`` is the sketch width (randomized) or None (exact: a float64 copy of W and a few
    float64 Gram-sized buffers). ``iterates``: QPiSSA's iterations hold W and W - deq(nf4(W - P)), and slice-sized
    temporaries (qpissa.SLICE): about three more weight-sized buffers.
    """
    size = torch.empty(0, dtype=dtype).element_size()
    if iterates:
        return workspace_bytes(m, n, columns, dtype) + 3 * m * n * size
    if columns is None:
        k = min(m, n)
        return m * n * (size + 8) + 4 * k * k * 8
    # The range finder's float64 bases, their float32 products, Q^T W, and the previous chunk's
    # Q and Q^T W still waiting in the pipeline: about 8 float64 (m + n) x columns buffers.
    return m * n * size + 8 * (m + n) * columns * 8


@contextlib.contextmanager
def naming(plans: Sequence[Plan]) -> Iterator[None]:
    """An error inside (a LinAlgError, an out-of-memory) names the modules being decomposed."""
    try:
        yield
    except Exception as e:
        names = ", ".join(f"'{p.name}'" for p in plans[:5]) + (" ..." if len(plans) > 5 else "")
        raise RuntimeError(f"minipissa: decomposing module(s) {names} failed: {type(e).__name__}: {e}") from e


def groups(plans: Sequence[Plan], weights: Weights = IN_PLACE) -> dict[tuple, list[Plan]]:
    """The plans stacked together: one group per (shape, dtype, device, rank, scaling, layout), in plan order."""
    found: dict[tuple, list[Plan]] = {}
    for p in plans:
        key = (p.shape, p.weight.dtype, weights.device(p), p.rank, p.scaling, p.fan_in_fan_out)
        found.setdefault(key, []).append(p)
    return found


def chunks(plans: Sequence[Plan], cfg: InitConfig, weights: Weights = IN_PLACE) -> Iterator[Item]:
    """The factors of every plan (top-r, exact or randomized; ``cfg.init == "pissa"``), in group order; each weight
    read through ``weights`` (fetch.py), which holds it until its item is yielded (a chunk's weights are stacked
    again for QPiSSA's iterations, or a Householder restart)."""
    with ThreadPoolExecutor(max_workers=1) as host:
        pending: Callable[[], Iterator[Item]] | None = None
        for ((m, n), weight_dtype, _, rank, scaling, _), members in groups(plans, weights).items():
            dtype = decompose.compute_dtype(weight_dtype)
            columns = None if cfg.niter is None else decompose.sketch_columns(rank, cfg.oversample, m, n)
            size = max(1, cfg.memory_budget // workspace_bytes(m, n, columns, dtype, cfg.iterates))
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                if cfg.components == "minor":  # a full SVD per chunk: nothing to pipeline
                    with naming(chunk):
                        a, b, sigma = decompose.principal_factors(
                            _stack(chunk, dtype, weights), rank, scaling, minor=True
                        )
                    yield from zip(chunk, a, b, sigma, strict=True)
                    continue
                with naming(chunk):
                    started = _start(chunk, cfg, dtype, columns, rank, weights)
                vectors = host.submit(_host_eigh, *_to_host(started.gram))
                if pending is not None:
                    yield from pending()
                pending = functools.partial(
                    _finish, chunk, started, vectors, cfg, dtype, columns, rank, scaling, weights
                )
        if pending is not None:
            yield from pending()


def _start(
    chunk: list[Plan],
    cfg: InitConfig,
    dtype: torch.dtype,
    columns: int | None,
    rank: int,
    weights: Weights,
    householder: bool = False,
) -> decompose.Started:
    """The chunk's device work, queued; its stacked weights and sketches are freed when this returns."""
    omega = None if columns is None else _sketches(chunk, cfg, dtype, columns, weights.device(chunk[0]))
    stacked = _stack(chunk, dtype, weights)
    return decompose.start(stacked, rank, niter=cfg.niter, omega=omega, householder=householder)


def _sketches(chunk: list[Plan], cfg: InitConfig, dtype: torch.dtype, columns: int, device: torch.device) -> Tensor:
    """Each module's own sketch (n, columns), from its seed, stacked."""
    n = chunk[0].shape[1]
    seeds = [decompose.module_seed(cfg.seed, p.name) for p in chunk]
    return torch.stack([decompose.sketch(n, columns, seed, dtype, device) for seed in seeds])


def _stack(chunk: list[Plan], dtype: torch.dtype, weights: Weights) -> Tensor:
    """The chunk's weights as (out, in) matrices in ``dtype``, stacked (c, m, n)."""
    m, n = chunk[0].shape
    matrix = torch.empty((len(chunk), m, n), dtype=dtype, device=weights.device(chunk[0]))
    for i, p in enumerate(chunk):  # converted straight into the stack: no second copy
        matrix[i].copy_(weight_matrix(weights(p).detach(), p.fan_in_fan_out))
    return matrix


def _to_host(gram: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
    """Start copying a CUDA ``gram`` to pinned host memory; the event marks the copy done."""
    if not gram.is_cuda:
        return gram, None
    host = torch.empty(gram.shape, dtype=gram.dtype, pin_memory=True)
    host.copy_(gram, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _host_eigh(gram: Tensor, ready: torch.cuda.Event | None) -> Tensor:
    """Eigenvectors of the small Grams, eigenvalues descending (runs in the worker thread)."""
    if ready is not None:
        ready.synchronize()
    return linalg.small_eigh(gram)[1]


def _finish(
    chunk: list[Plan],
    started: decompose.Started,
    vectors: Future,
    cfg: InitConfig,
    dtype: torch.dtype,
    columns: int | None,
    rank: int,
    scaling: float,
    weights: Weights,
) -> Iterator[Item]:
    """The factors of a pipelined chunk, once its eigenvectors are back from the host. A chunk whose
    Cholesky-QR broke down is started again from its weights (still in their modules, or held by the fetch) with
    Householder QR."""

    def again() -> decompose.Started:
        vectors.cancel()  # its input was garbage; its result (or error) is not wanted
        return _start(chunk, cfg, dtype, columns, rank, weights, householder=True)

    with naming(chunk):
        u, s, v = decompose.triplets(started, lambda: vectors.result().to(started.gram.device), again)
        a, b = decompose.split_factors(u, s, v, scaling)
        if cfg.iterates:  # QPiSSA: chosen again against the quantizer, the whole chunk at once
            fresh_columns = decompose.sketch_columns(rank, cfg.oversample, *chunk[0].shape)
            fresh = _sketches(chunk, cfg, dtype, fresh_columns, weights.device(chunk[0]))
            a, b, s = qpissa.alternate(  # the stack is freed before the chunk is yielded
                _stack(chunk, dtype, weights), scaling, chunk[0].fan_in_fan_out, cfg.quant_iters, (a, b, s), fresh,
                double_quant=cfg.double_quant,
            )  # fmt: skip
    yield from zip(chunk, a, b, s, strict=True)
