"""Where GPU experts live and run: one interface, CUDA behind it, and an emulated device for CPU-only CI.

The hybrid runtime never touches `torch.cuda` directly. It asks an `Accelerator` to

- allocate expert slots from a memory pool whose budget is a hard limit (`allocate`);
- copy host weights into a slot on a copy stream, after a given compute point (`copy_async`),
  returning an `Event`;
- run compute on the compute stream (`launch`) and hand its values to the host (`result`);
- make its compute wait for a copy (`wait`), and mark points of its compute (`record`);
- move small tensors between host and device (`to_device`, `to_host`).

`CudaAccelerator` maps these to a CUDA copy stream and events. `EmulatedAccelerator`
(`runtime/emulated.py`) is a CPU test double with the same interface, synchronous or asynchronous.
"""

from __future__ import annotations

import re

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ExpertMemoryError(RuntimeError):
    """The expert memory budget cannot hold what was asked of it."""


def parse_bytes(value: int | str) -> int:
    """`12GiB`, `1.5 GB`, `512MiB`, `0`, or an int number of bytes -> bytes."""
    if isinstance(value, bool):
        raise TypeError(f"expert memory must be bytes (int) or a string like '12GiB', got {value!r}")
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"expert memory {value!r}: expected a size like '12GiB', '512MB' or a number of bytes")
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise TypeError(f"expert memory must be bytes (int) or a string like '12GiB', got {type(value).__name__}")
    if number < 0:
        raise ValueError(f"expert memory must be >= 0, got {value!r}")
    return int(number * _UNITS[unit])


class MemoryPool:
    """Counts the bytes the runtime allocates for experts; going over the budget is an error, never a
    silent overrun."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self.peak_bytes = 0

    def reserve(self, num_bytes: int, what: str) -> None:
        if self.used_bytes + num_bytes > self.budget_bytes:
            raise ExpertMemoryError(
                f"{what} needs {num_bytes} bytes but only {self.budget_bytes - self.used_bytes} of the "
                f"{self.budget_bytes}-byte expert budget are left"
            )
        self.used_bytes += num_bytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def release(self, num_bytes: int) -> None:
        self.used_bytes -= num_bytes


class Event:
    """A point in the accelerator's work; `done()` without blocking, `synchronize()` to block the host."""

    def done(self) -> bool:
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError


class Accelerator:
    """Interface of the device that runs GPU experts; see the module docstring."""

    name = "accelerator"
    emulated = False

    def __init__(self, device: torch.device, budget_bytes: int):
        self.device = torch.device(device)
        self.pool = MemoryPool(budget_bytes)
        # CPU seconds the accelerator's own emulation spent on the calling thread (the synchronous emulator
        # runs its GPU compute inline); the runtime takes them out of its host work. 0 on a real device,
        # where issuing work is host work.
        self.emulation_thread_s = 0.0

    def allocate(self, shape, dtype: torch.dtype, what: str) -> torch.Tensor:
        """An uninitialised tensor on the device, counted against the expert budget."""
        num_bytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        self.pool.reserve(num_bytes, what)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def launch(self, fn, *args, **kwargs):
        """Run `fn(*args, **kwargs)` on the compute stream, after the compute issued before it (and the
        events it was told to `wait` for). Returns fn's result, or (asynchronous emulator) a placeholder
        that a later `launch` may take as an argument (also inside a list or tuple) and that `result`
        turns into the value. On CUDA fn itself only enqueues kernels, so it runs here."""
        return fn(*args, **kwargs)

    def result(self, value):
        """`value` (a `launch` result) usable by the host: on CUDA the tensor itself, valid in stream
        order; the asynchronous emulator blocks until its compute ran, re-raising what fn raised."""
        return value

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None) -> Event:
        """Copy host `src` into device `dst` on the copy stream, once `after` (a compute point) is reached."""
        raise NotImplementedError

    def record(self) -> Event:
        """The current point of the compute stream."""
        raise NotImplementedError

    def wait(self, event: Event) -> None:
        """Compute issued from now on runs after `event` (the host does not block where it need not)."""
        raise NotImplementedError

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to("cpu")

    def synchronize(self) -> None:
        raise NotImplementedError

    def prepare_host_weight(self, tensor: torch.Tensor) -> torch.Tensor:
        """The host tensor the copies will read (CUDA: pinned); may replace the original's storage."""
        return tensor

    def close(self) -> None:
        pass


class _DoneEvent(Event):
    def done(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


DONE = _DoneEvent()


class _CudaEvent(Event):
    def __init__(self, event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def synchronize(self) -> None:
        self.event.synchronize()


class CudaAccelerator(Accelerator):
    """A CUDA device: a dedicated copy stream, events between it and the compute (current) stream."""

    name = "cuda"

    def __init__(self, device: torch.device | str, budget_bytes: int):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CudaAccelerator needs a cuda device, got {device}")
        if not torch.cuda.is_available():
            raise RuntimeError("offload to cuda: torch.cuda is not available on this machine (use device='emulated')")
        super().__init__(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()),
                         budget_bytes)
        self.copy_stream = torch.cuda.Stream(device=self.device)

    def copy_async(self, dst, src, after):
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after.event)
            with torch.no_grad():
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return _CudaEvent(event)

    def record(self) -> Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return _CudaEvent(event)

    def wait(self, event: Event) -> None:
        if isinstance(event, _CudaEvent):
            torch.cuda.current_stream(self.device).wait_event(event.event)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def prepare_host_weight(self, tensor):
        # Pinned memory makes the copies asynchronous DMA. The storage is registered in place (no copy, no
        # power-of-two rounding); `close` unregisters it. See runtime/host_memory.py for the fallback.
        from .host_memory import HostRegistrations

        if getattr(self, "host_memory", None) is None:
            self.host_memory = HostRegistrations()
        return self.host_memory.pin(tensor)

    def close(self) -> None:
        """Unregister the host experts once no copy reads them (the model keeps them, pageable again)."""
        host_memory = getattr(self, "host_memory", None)
        if host_memory is not None:
            torch.cuda.synchronize(self.device)
            host_memory.release()
        super().close()


def make_accelerator(device: str | torch.device, budget_bytes: int) -> Accelerator:
    """'cuda' / 'cuda:N' -> CudaAccelerator; 'emulated' -> EmulatedAccelerator (CPU-only test double) in the
    mode `DALI_EMULATED_MODE` names; 'emulated-sync' / 'emulated-async' -> that mode, whatever the variable."""
    if isinstance(device, str) and device in ("emulated", "emulated-sync", "emulated-async"):
        from .emulated import EmulatedAccelerator  # the emulator builds on this module's interface

        mode = None if device == "emulated" else device == "emulated-async"
        return EmulatedAccelerator(budget_bytes, asynchronous=mode)
    device = torch.device(device)
    if device.type == "cuda":
        return CudaAccelerator(device, budget_bytes)
    raise ValueError(f"offload: device must be 'cuda', 'cuda:N' or 'emulated' (the CPU test double; "
                     f"'emulated-async' for its asynchronous mode), got {device}")
