"""Where the factor stream reads each target's weight (:class:`Weights`): in place, the module's own tensor on its own
device (:data:`IN_PLACE`, apply()'s default road), or fetched onto one device a weight at a time (:class:`Fetcher`,
the streaming init of ``apply(..., device=...)`` and ``weights=...``), from the module or from a source of tensors
(plan/sourced.py).

A fetch on CUDA overlaps the decompositions: reader threads read the next few weights (a bounded amount of host
memory ahead) straight into pinned host memory, several at once where the source allows it (a checkpoint's files, the
module's own tensors; a mapping one at a time, in order), and a worker thread copies the next one on a copy stream
while the device decomposes the current one (one weight ahead on the device: its memory does not grow); the compute
stream waits for the copy's event only where it uses the weight. On the CPU the same code runs without the threads
(nothing to overlap). The threads only read and copy: every decomposition stays on the caller's thread and stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from ..core.fingerprint import Pending
from ..core.nf4 import NF4Weight
from .tree import Plan

#: The bare model's state-dict name -> its tensor where the values come from (a checkpoint, a mapping), checked against
#: the model's own (plan/sourced.py), ``pinned`` (second argument) for a CUDA fetch's staging; None: each module's own.
Read = Callable[[str, bool], Tensor]


class Weights(Protocol):
    """Where the factor stream reads each plan's weight (factors.py, stacked.py)."""

    def device(self, plan: Plan) -> torch.device:
        """Where the plan's weight is decomposed."""
        ...

    def __call__(self, plan: Plan) -> Tensor:
        """The plan's stored weight on :meth:`device` (a fetch holds it until dropped)."""
        ...

    def expect(self, plans: Sequence[Plan]) -> None:
        """The order in which the stream will ask for the weights (a fetch reads ahead in it)."""
        ...


class InPlace:
    """Each plan's weight where it is: the module's own tensor, decomposed on its own device."""

    def device(self, plan: Plan) -> torch.device:
        return plan.weight.device

    def __call__(self, plan: Plan) -> Tensor:
        return plan.weight

    def expect(self, plans: Sequence[Plan]) -> None:
        pass


IN_PLACE: Weights = InPlace()


@dataclass
class Streamed:
    """What the streamed road made of one target while its weight was on the device (streamed.py), before the device
    copy was dropped: all the installer needs of W, whose module may hold no values (a meta model)."""

    residual: Tensor | NF4Weight  # W_res = W - s·B0·A0 in W's dtype, or nf4(W_res) (QPiSSA)
    weight_print: Pending  # W's fingerprint, queued
    bias: Tensor | None  # the module's bias, on the device
    bias_print: Pending | None
    finite: Tensor  # () bool: the residual fits its dtype's range (as factors.overflowing_residuals tells in place)
    errors: Tensor | None  # QPiSSA: (nf4_error, qlora_error), qpissa.quantize_residual's


def dense_weight(plan: Plan, read: Read | None, pinned: bool = False) -> Tensor:
    """The one place a streamed target's dense weight comes from: ``read`` (a source of tensors), else the module's own
    weight. Stored layout ((out, in), or (in, out) for a Conv1D), in the source's dtype (the fetch casts it);
    ``pinned``: a host tensor in pinned memory (one host copy at most)."""
    return _pinned(plan.weight.detach(), pinned) if read is None else read(f"{plan.name}.weight", pinned)


def dense_bias(plan: Plan, read: Read | None, pinned: bool = False) -> Tensor | None:
    """A streamed target's bias (out,), from where its weight comes (:func:`dense_weight`); None if it has none."""
    bias = plan.module.bias
    if bias is None:
        return None
    return _pinned(cast(Tensor, bias).detach(), pinned) if read is None else read(f"{plan.name}.bias", pinned)


def _pinned(t: Tensor, pinned: bool) -> Tensor:
    return t.pin_memory() if pinned and t.device.type == "cpu" and not t.is_pinned() else t


def check_device(device: object) -> torch.device | None:
    """apply()'s ``device``: None, or a CUDA device or the CPU, as a ``torch.device`` with its index; a named
    ValueError otherwise (nothing is changed yet)."""
    if device is None:
        return None
    try:
        where = torch.device(cast(Any, device))
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"minipissa.apply: device={device!r:.60} is not a device ({e}); pass e.g. 'cuda:0'") from None
    if where.type == "cpu":
        return torch.device("cpu")
    if where.type != "cuda":
        raise ValueError(
            f"minipissa.apply: device={device!r}: the streaming init runs on a CUDA device or the CPU; for another "
            "device, move the model there and leave device=None (each weight is then decomposed where it is)"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = where.index if where.index is not None else (torch.cuda.current_device() if count else 0)
    if not 0 <= index < count:
        raise ValueError(
            f"minipissa.apply: device={device!r}, but this process sees {count} CUDA device(s) "
            f"(torch.cuda.is_available() is {torch.cuda.is_available()}); pass one of them, or 'cpu'"
        )
    return torch.device("cuda", index)


class Transfers:
    """Tensors read and copied onto ``device``. On CUDA the reads run in reader threads (``readers`` of them; one keeps
    the reads in order), each :meth:`submit`'s copy in a worker thread, in order: staged in pinned host memory, copied
    on a copy stream, cast there; elsewhere each runs at once."""

    def __init__(self, device: torch.device, readers: int = 1) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="minipissa-fetch") if self.cuda else None
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="minipissa-read") if self.cuda else None
        self._stream = torch.cuda.Stream(device) if self.cuda else None

    def read_ahead(self, read: Callable[[], Sequence[Tensor | None]]) -> Future:
        """Start ``read()`` in a reader thread (CUDA; at once elsewhere); a :meth:`submit` takes the future."""
        return self._readers.submit(read) if self._readers is not None else _now(read)

    def submit(
        self, read: Callable[[], Sequence[Tensor | None]] | Future, dtypes: Sequence[torch.dtype | None]
    ) -> Future:
        """Start reading ``read()``'s tensors (or taking those of a :meth:`read_ahead`) onto the device, each cast to
        its entry of ``dtypes``; :meth:`result` gives them. A read's error comes out of :meth:`result`."""
        host = read if isinstance(read, Future) else self.read_ahead(read)
        if self._pool is None:
            return _now(lambda: ([_moved(t, self.device, d) for t, d in zip(host.result(), dtypes, strict=True)], None))
        return self._pool.submit(self._staged, host, dtypes)

    def _staged(
        self, host: Future, dtypes: Sequence[torch.dtype | None]
    ) -> tuple[list[Tensor | None], torch.cuda.Event]:
        """The worker's part: the read's tensors, pinned if they are not yet (pageable memory is copied through the
        driver's own staging, synchronously), copied and cast on the copy stream, and an event marking it done."""
        tensors = host.result()
        with torch.cuda.device(self.device), torch.cuda.stream(cast(torch.cuda.Stream, self._stream)):
            staged = [t if t is None or t.is_cuda or t.is_pinned() else t.pin_memory() for t in tensors]
            out = [_moved(t, self.device, d, non_blocking=True) for t, d in zip(staged, dtypes, strict=True)]
            done = torch.cuda.Event()
            done.record()
        return out, done

    def result(self, pending: Future) -> list[Tensor | None]:
        """The tensors of a :meth:`submit`, usable on the current stream (which waits for their copy, on the device)."""
        tensors, done = pending.result()
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            for t in tensors:
                if t is not None:
                    t.record_stream(stream)  # made on the copy stream: not reused before this stream is done with it
        return cast(list[Tensor | None], tensors)

    def close(self) -> None:
        """Wait for the transfers in flight and stop the threads."""
        for pool in (self._pool, self._readers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _now(make: Callable[[], Any]) -> Future:
    """A future holding ``make()``, run now: its error comes out of ``result()``, as a thread's future raises it."""
    done: Future = Future()
    try:
        done.set_result(make())
    except Exception as e:  # noqa: BLE001 - handed to result(), not swallowed
        done.set_exception(e)
    return done


def _moved(t: Tensor | None, device: torch.device, dtype: torch.dtype | None, non_blocking: bool = False) -> Any:
    if t is None:
        return None
    t = t.to(device, non_blocking=non_blocking)
    return t if dtype is None else t.to(dtype)


class Fetcher:
    """:class:`Weights` for the streamed road: each plan's dense weight (:func:`dense_weight`) and bias fetched onto
    ``device`` when the stream asks for it, held until :meth:`drop`; on CUDA the next expected one copied ahead and
    the few after it read ahead into pinned host memory (``parallel``: by several readers at once; else one, in
    order). Cast to the module's dtype there (a checkpoint's bfloat16 into a float32 model, as from_pretrained
    casts)."""

    #: Weights copied onto the device ahead of the one in use: the next transfer runs while this one is decomposed.
    LOOKAHEAD = 1
    #: Weights read into pinned host memory ahead (and reader threads), and the most host memory they may hold
    #: beyond the first one.
    READ_AHEAD = 4
    READ_AHEAD_BYTES = 2 << 30

    def __init__(self, device: torch.device, read: Read | None = None, parallel: bool = True) -> None:
        self.target, self.read = device, read
        self.transfers = Transfers(device, self.READ_AHEAD if parallel else 1)
        self._order: list[Plan] = []
        self._position: dict[str, int] = {}
        self._reading: dict[str, tuple[Future, int]] = {}
        self._pending: dict[str, Future] = {}
        self._held: dict[str, tuple[Plan, Tensor, Tensor | None]] = {}

    def device(self, plan: Plan) -> torch.device:
        return self.target

    def expect(self, plans: Sequence[Plan]) -> None:
        self._order = list(plans)
        self._position = {p.name: i for i, p in enumerate(self._order)}

    def __call__(self, plan: Plan) -> Tensor:
        return self.fetched(plan)[0]

    def fetched(self, plan: Plan) -> tuple[Tensor, Tensor | None]:
        """The plan's weight and bias on the device."""
        if plan.name not in self._held:
            pending = self._pending.pop(plan.name, None) or self._submit(plan)
            weight, bias = self.transfers.result(pending)
            self._held[plan.name] = (plan, cast(Tensor, weight), bias)
            start = self._position.get(plan.name, len(self._order)) + 1
            for ahead in self._order[start : start + self.LOOKAHEAD]:
                if ahead.name not in self._held and ahead.name not in self._pending:
                    self._pending[ahead.name] = self._submit(ahead)
            self._read_ahead(self._order[start : start + self.READ_AHEAD])
        _, weight, bias = self._held[plan.name]
        return weight, bias

    def _read_ahead(self, plans: Sequence[Plan]) -> None:
        """Start reading ``plans``' weights into host memory, in order, while they fit the byte budget."""
        if not self.transfers.cuda:
            return  # nothing to overlap: each is read when fetched
        budget = self.READ_AHEAD_BYTES - sum(size for _, size in self._reading.values())
        for plan in plans:
            if plan.name in self._held or plan.name in self._pending or plan.name in self._reading:
                continue
            size = plan.weight.numel() * plan.weight.element_size()
            if self._reading and size > budget:
                break
            self._reading[plan.name] = (self.transfers.read_ahead(self._reader(plan)), size)
            budget -= size

    def _reader(self, plan: Plan) -> Callable[[], Sequence[Tensor | None]]:
        pinned = self.transfers.cuda
        return lambda: (dense_weight(plan, self.read, pinned), dense_bias(plan, self.read, pinned))

    def _submit(self, plan: Plan) -> Future:
        bias = plan.module.bias
        dtypes = (plan.weight.dtype, None if bias is None else cast(Tensor, bias).dtype)
        reading = self._reading.pop(plan.name, None)
        return self.transfers.submit(self._reader(plan) if reading is None else reading[0], dtypes)

    def drop(self, plan: Plan) -> None:
        """Release the device copies of the plan's weight and bias (its residual is made)."""
        self._held.pop(plan.name, None)

    def held(self) -> list[tuple[Plan, Tensor]]:
        """The plans whose weights are on the device now, with them (the ones being decomposed)."""
        return [(plan, weight) for plan, weight, _ in self._held.values()]

    def host_weight(self, plan: Plan) -> Tensor:
        """The plan's weight where it comes from, read again (an error's message measures it)."""
        return dense_weight(plan, self.read)

    def host_bias(self, plan: Plan) -> Tensor | None:
        return dense_bias(plan, self.read)

    def close(self) -> None:
        """Stop reading ahead and let go of every device copy."""
        self.transfers.close()
        self._reading.clear()
        self._pending.clear()
        self._held.clear()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
