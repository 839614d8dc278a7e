"""Initial factors for many weights at once: grouped by shape, chunked to a memory budget; progress.

:func:`minipissa.apply` hands every target weight here. Weights of one (shape, dtype, device, rank,
scaling) are stacked and decomposed together, a chunk at a time, so that a GPU runs one batched
kernel instead of hundreds of small ones while peak memory stays near ``memory_budget`` whatever
the model's size. Each module's randomized sketch still comes from its own generator seeded by
(seed, module name), so grouping, chunking and order change the factors by floating-point rounding
of a batched product at most, and each residual is computed later, per layer, from the factors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from . import decompose, linalg
from .layer import weight_matrix

#: Default bound (bytes) on the extra memory a chunk of stacked weights and its workspace may take.
MEMORY_BUDGET = 1 << 30


@dataclass
class Job:
    """One weight to factor: its module (W is read when needed, so that a replaced module's weight
    is freed at once), module name (seeds the sketch), rank and scaling."""

    name: str
    module: nn.Module
    rank: int
    scaling: float
    fan_in_fan_out: bool

    @property
    def weight(self) -> Tensor:
        """The stored weight, (out, in) or (in, out) when ``fan_in_fan_out``."""
        return cast(Tensor, self.module.weight)

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the weight matrix."""
        out_features, in_features = weight_matrix(self.weight, self.fan_in_fan_out).shape
        return out_features, in_features


def workspace_bytes(m: int, n: int, rank: int, columns: int | None, dtype: torch.dtype) -> int:
    """Bytes one (m, n) item of a chunk needs: its stacked copy plus the decomposition's workspace.

    ``columns`` is the sketch width (randomized) or None (exact: a float64 copy of W and a few
    float64 Gram-sized buffers).
    """
    size = torch.empty(0, dtype=dtype).element_size()
    if columns is None:
        k = min(m, n)
        return m * n * (size + 8) + 4 * k * k * 8
    # The range finder's float64 bases, their float32 products, Q^T W, and the previous chunk's
    # Q and Q^T W still waiting in the pipeline: about 8 float64 (m + n) x columns buffers.
    return m * n * size + 8 * (m + n) * columns * 8


def batches_help(device: torch.device) -> bool:
    """Whether stacking weights pays on ``device``: on a GPU, yes (one kernel per chunk, not per weight).

    On the CPU a batch buys nothing (LAPACK and BLAS loop over it), and single matrices keep the
    factors bit-identical to a per-module decomposition (as sharded init computes them).
    """
    return device.type != "cpu"


def factors(
    jobs: list[Job],
    *,
    niter: int | None,
    oversample: int | None,
    seed: int,
    components: str,
    memory_budget: int = MEMORY_BUDGET,
) -> Iterator[tuple[Job, Tensor, Tensor, Tensor]]:
    """(job, A0 (r, in), B0 (out, r), kept singular values (r,)) for every job, one chunk at a time.

    Yields in group order, not job order; A0/B0 are in the decomposition dtype on the weight's device.
    On a GPU the chunks are pipelined: a chunk's small eigenproblem is solved on the host (in a
    worker thread) while the GPU works on the next chunk: the host waits for a chunk only once the
    next one is queued.
    """
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        key = (job.shape, job.weight.dtype, job.weight.device, job.rank, job.scaling)
        groups.setdefault(key, []).append(job)
    with ThreadPoolExecutor(max_workers=1) as host:
        pending: Callable[[], Iterator] | None = None
        for ((m, n), weight_dtype, device, rank, scaling), members in groups.items():
            dtype = decompose.compute_dtype(weight_dtype)
            columns = None if niter is None else decompose.sketch_columns(rank, oversample, m, n)
            batched = batches_help(device)
            size = max(1, memory_budget // workspace_bytes(m, n, rank, columns, dtype)) if batched else 1
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                matrix = _stack(chunk, dtype, batched)
                omega = None if columns is None else _sketches(chunk, columns, seed, dtype, batched)
                if not batched or components == "minor":
                    a, b, sigma = decompose.principal_factors(
                        matrix, rank, scaling, niter=niter, omega=omega, components=components
                    )
                    del matrix, omega  # free the chunk before the caller builds layers from it
                    if not batched:
                        a, b, sigma = a[None], b[None], sigma[None]
                    yield from _items(chunk, a, b, sigma)
                    continue
                started = decompose.start(matrix, rank, niter=niter, omega=omega)
                del matrix, omega
                vectors = host.submit(_host_eigh, *_to_host(started.gram))
                if pending is not None:
                    yield from pending()
                pending = functools.partial(
                    _finish, chunk, started, vectors, rank, scaling, niter, seed, columns, dtype
                )
        if pending is not None:
            yield from pending()


def _stack(chunk: list[Job], dtype: torch.dtype, batched: bool) -> Tensor:
    """The chunk's weights as (out, in) matrices in ``dtype``: stacked (c, m, n), or the one (m, n)."""
    if not batched:
        return weight_matrix(chunk[0].weight.detach(), chunk[0].fan_in_fan_out).to(dtype)
    first = chunk[0].weight
    m, n = chunk[0].shape
    matrix = torch.empty((len(chunk), m, n), dtype=dtype, device=first.device)
    for i, job in enumerate(chunk):  # converted straight into the stack: no second copy
        matrix[i].copy_(weight_matrix(job.weight.detach(), job.fan_in_fan_out))
    return matrix


def _sketches(chunk: list[Job], columns: int, seed: int, dtype: torch.dtype, batched: bool) -> Tensor:
    """Each module's own sketch (n, columns), from its seed: stacked, or the one."""
    n, device = chunk[0].shape[1], chunk[0].weight.device
    sketches = [decompose.sketch(n, columns, decompose.module_seed(seed, j.name), dtype, device) for j in chunk]
    return torch.stack(sketches) if batched else sketches[0]


def _items(chunk: list[Job], a: Tensor, b: Tensor, sigma: Tensor) -> Iterator[tuple[Job, Tensor, Tensor, Tensor]]:
    for i, job in enumerate(chunk):
        yield job, a[i], b[i], sigma[i]


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
    chunk: list[Job],
    started: decompose.Started,
    vectors: Future,
    rank: int,
    scaling: float,
    niter: int | None,
    seed: int,
    columns: int | None,
    dtype: torch.dtype,
) -> Iterator[tuple[Job, Tensor, Tensor, Tensor]]:
    """The factors of a pipelined chunk, once its eigenvectors are back from the host."""
    if bool(started.failed.any()):  # rare (rank-deficient products): redo the chunk, Householder QR
        vectors.cancel()  # its input was garbage; its result (or error) is not wanted
        omega = None if columns is None else _sketches(chunk, columns, seed, dtype, True)
        u, s, v = decompose.top_triplets(_stack(chunk, dtype, True), rank, niter=niter, omega=omega)
    else:
        u, s, v = started.finish(vectors.result().to(started.gram.device))
    a, b = decompose.split_factors(u, s, v, scaling)
    yield from _items(chunk, a, b, s)


def progress_reporter(progress: bool | Callable[[int, int], None], total: int) -> Callable[[int], None]:
    """A ``report(done)`` for apply's loop: the user's callback, a tqdm bar, or nothing."""
    if callable(progress):
        return lambda done: progress(done, total)
    if not progress:
        return lambda done: None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return lambda done: None
    bar = tqdm(total=total, desc="minipissa init", unit="module")

    def report(done: int) -> None:
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return report
