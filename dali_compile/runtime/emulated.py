"""The emulated accelerator: a CPU test double of the GPU behind the `Accelerator` interface.

Device tensors are CPU tensors counted against its own pool; copies run on one worker thread (so the copy
pipeline's ordering is exercised for real); GPU experts run `dali::gpu_experts`' CPU kernel (the reference
through the slot table). In its asynchronous mode (`DALI_EMULATED_MODE=async`, or device 'emulated-async')
compute also runs on a worker thread, and both threads sleep a seeded random delay per item, so that a
missing `wait` (a compute reading a slot before its copy landed) or a missing `after` (a copy overwriting
a slot a queued compute still reads) gives wrong numbers, as it would on a GPU. Its timings mean nothing;
its counters and results do.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
import weakref

import torch

from .accelerator import DONE, Accelerator, Event


class _Failures:
    """The errors an emulated stream hit that the host has not seen yet: `synchronize` raises the first."""

    def __init__(self):
        self._lock = threading.Lock()
        self._unseen: list[BaseException] = []

    def add(self, error: BaseException) -> None:
        with self._lock:
            self._unseen.append(error)

    def seen(self, error: BaseException) -> BaseException:
        with self._lock:
            self._unseen = [e for e in self._unseen if e is not error]
        return error

    def take_first(self) -> BaseException | None:
        with self._lock:
            first = self._unseen[0] if self._unseen else None
            self._unseen = []
        return first


class _StreamEvent(Event):
    """A point of an emulated stream, set by its worker thread when reached; a failed copy carries its error."""

    def __init__(self, failures: _Failures):
        self._reached = threading.Event()
        self._failures = failures
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self._reached.is_set()

    def synchronize(self) -> None:
        self._reached.wait()
        if self.error is not None:
            raise self._failures.seen(self.error)

    def _set(self, error: BaseException | None = None) -> None:
        self.error = error
        self._reached.set()


class Pending:
    """What `launch` returns on the asynchronous emulator: the value of a compute still queued. Pass it to a
    later `launch` (the compute stream resolves it), or ask `Accelerator.result` for the value."""

    def __init__(self, failures: _Failures):
        self._done = threading.Event()
        self._failures = failures
        self._value = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self):
        """The value, once computed (blocks the host); re-raises what the compute raised."""
        self._done.wait()
        if self._error is not None:
            raise self._failures.seen(self._error)
        return self._value

    def _resolve(self):  # on the compute worker: launches run in order, so an earlier one has finished
        if self._error is not None:
            raise self._error  # the same error object: the host sees it once, wherever it surfaces first
        return self._value

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{getattr(func, '__name__', func)} got a Pending compute result: pass it to a later "
                        "accelerator.launch, or take its value with accelerator.result() first")

    def __repr__(self) -> str:
        return f"Pending({'done' if self.done() else 'queued'})"


def _resolved(value):
    if isinstance(value, Pending):
        return value._resolve()
    if isinstance(value, (list, tuple)):
        return type(value)(_resolved(v) for v in value)
    return value


def _run_stream(items: queue.SimpleQueue, rng: random.Random, max_delay_s: float) -> None:
    """A worker thread's loop: items in order until None, each called with `pause` (a random delay) to
    sleep where the emulated device would spend time. Items handle their own errors (they hold the event
    or placeholder to fail)."""
    def pause():
        if max_delay_s > 0:
            time.sleep(rng.uniform(0.0, max_delay_s))

    while True:
        item = items.get()
        if item is None:
            return
        item(pause)
        del item  # an item holds its accelerator: an idle worker must not, or it is never collected (stopped)


class _Stream:
    """One emulated stream: a daemon thread running its items in order (stopped when closed or collected)."""

    def __init__(self, name: str, seed: int, max_delay_s: float):
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_run_stream, args=(self._items, random.Random(seed), max_delay_s),
                                        name=name, daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, self._items.put, None)

    def submit(self, item) -> None:
        self._items.put(item)

    def drain(self) -> None:
        reached = threading.Event()
        self._items.put(lambda pause: reached.set())
        reached.wait()

    def close(self) -> None:
        self._stop()
        self._thread.join()


class EmulatedAccelerator(Accelerator):
    """CPU tensors play device memory; worker threads play the copy engine and (asynchronous mode) the
    compute stream. Its timings mean nothing; its orderings are real.

    Synchronous (the default): `launch` runs on the calling thread, a compute point is reached when it is
    recorded, and `wait` blocks the caller until the copy is done, which is what a device stream waiting
    on an event amounts to for the host code that follows. Copies run on one worker thread.

    Asynchronous (`asynchronous=True`, or `DALI_EMULATED_MODE=async` when not given): compute and copies
    each run on their own worker thread, with random delays in [0, max_delay_s] drawn from `seed`: before
    each compute item, and in each copy between its `after` point and the copy itself (so that a compute
    that does not wait for a copy and a copy that does not wait for a compute each lose the race about
    half the time). `launch` returns a `Pending`, `record` an event its worker sets when it gets there, `wait`
    queues a wait on the compute stream without blocking the host, and a copy waits for its `after` point
    on the copy worker. A runtime that misses a `wait` (compute reads a slot before its copy) or an `after`
    (a copy overwrites a slot a queued compute still reads) then computes wrong numbers, as on a GPU.
    An error in a worker surfaces at `result` / `Event.synchronize` of what failed or of a launch that took
    its result or waited for its copy (the same exception object), or else at `synchronize`; once only.
    """

    name = "emulated"
    emulated = True

    def __init__(self, budget_bytes: int, asynchronous: bool | None = None, seed: int = 0,
                 max_delay_s: float = 0.001):
        super().__init__(torch.device("cpu"), budget_bytes)
        self.asynchronous = emulated_mode() == "async" if asynchronous is None else bool(asynchronous)
        delay = max_delay_s if self.asynchronous else 0.0
        self._failures = _Failures()
        self._copies = _Stream("dali-emulated-copy", seed + 1, delay)
        self._compute = _Stream("dali-emulated-compute", seed, delay) if self.asynchronous else None
        self._wait_failed: BaseException | None = None  # the compute worker's: a wait on a failed copy
        self._closed = False

    def launch(self, fn, *args, **kwargs):
        self._check_open()
        if self._compute is None:  # the GPU's work, done here: not the runtime's host work (emulation_thread_s)
            started = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.emulation_thread_s += time.thread_time() - started
        pending = Pending(self._failures)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()  # both are per thread

        def run(pause):
            pause()  # the launch latency: later host work overtakes it
            try:
                if self._wait_failed is not None:  # the slots do not hold what the runtime expects
                    failed, self._wait_failed = self._wait_failed, None
                    raise failed
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    pending._value = fn(*_resolved(args), **{k: _resolved(v) for k, v in kwargs.items()})
            except BaseException as error:  # noqa: BLE001 - the host sees it at result() or synchronize()
                pending._error = error
                self._failures.add(error)
            pending._done.set()

        self._compute.submit(run)
        return pending

    def result(self, value):
        if isinstance(value, Pending):
            return value.wait()
        if isinstance(value, (list, tuple)):
            return type(value)(self.result(v) for v in value)
        return value

    def copy_async(self, dst, src, after):
        self._check_open()
        event = _StreamEvent(self._failures)

        def copy(pause):
            try:
                if after is not None:
                    after._reached.wait() if isinstance(after, _StreamEvent) else after.synchronize()
                pause()  # the transfer time, from when it may start: a compute that did not wait reads early
                with torch.no_grad():  # grad mode is per thread; the copy is never part of a graph
                    dst.copy_(src)
            except BaseException as error:  # noqa: BLE001 - the host sees it at the event or synchronize()
                self._failures.add(error)
                event._set(error)
                return
            event._set()

        self._copies.submit(copy)
        return event

    def record(self) -> Event:
        if self._compute is None:
            return DONE
        self._check_open()
        event = _StreamEvent(self._failures)

        def reach(pause):
            pause()
            event._set()

        self._compute.submit(reach)
        return event

    def wait(self, event: Event) -> None:
        if self._compute is None:
            event.synchronize()
            return
        self._check_open()

        def wait(pause):
            pause()
            if isinstance(event, _StreamEvent):
                event._reached.wait()
                if event.error is not None:
                    self._wait_failed = event.error
            else:
                try:
                    event.synchronize()
                except BaseException as error:  # noqa: BLE001
                    self._wait_failed = error

        self._compute.submit(wait)

    def to_device(self, tensor):
        return tensor

    def to_host(self, tensor):
        tensor = self.result(tensor)
        return tensor if tensor.is_cpu else tensor.to("cpu")  # `.to("cpu")` parses its device every call

    def synchronize(self) -> None:
        if self._closed:
            return
        if self._compute is not None:
            self._compute.drain()
        self._copies.drain()
        error = self._failures.take_first()
        if error is not None:
            raise error

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in (self._compute, self._copies):
            if stream is not None:
                stream.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the emulated accelerator is closed (the offloaded model was released)")


def emulated_mode() -> str:
    """`DALI_EMULATED_MODE`: 'sync' (default) or 'async', the mode of `device='emulated'`."""
    mode = os.environ.get("DALI_EMULATED_MODE", "").strip().lower() or "sync"
    if mode not in ("sync", "async"):
        raise ValueError(f"DALI_EMULATED_MODE={mode!r}: expected 'sync' or 'async'")
    return mode
