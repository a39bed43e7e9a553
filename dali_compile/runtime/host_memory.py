"""Host expert memory made pinned in place, for asynchronous copies to a CUDA device.

`tensor.pin_memory()` copies a tensor into the caching host allocator, which rounds each block up to a
power of two (+33% for Qwen3-30B-A3B's expert tensors, +45% for DeepSeek-V2-Lite's) and keeps freed
blocks cached. Registering the storage the model already has (`cudaHostRegister`) page-locks it where it
is: no copy, no rounding, and the memory is the model's own again once unregistered.

`HostRegistrations` owns the registrations of one offloaded model (its accelerator holds it):

    host = HostRegistrations()
    weight = host.pin(weight)   # the same tensor, its storage registered (or, if CUDA refuses, a pinned copy)
    ...
    host.release()              # unregister everything (also when the owner is garbage collected)

A storage is registered once however many tensors view it. A storage CUDA refuses to register (memory
mapped from a read-only file, a range overlapping another registration, the locked-memory limit) falls
back to `pin_memory()`'s copy, with one warning per `HostRegistrations` saying how many and why: the copies
stay correct and asynchronous, at the allocator's cost for those tensors only.
"""

from __future__ import annotations

import ctypes
import logging
import warnings
import weakref

import torch

logger = logging.getLogger("dali_compile")

# cudaHostRegisterPortable: pinned for every CUDA context, so any device of the process can copy from it.
REGISTER_PORTABLE = 1


class HostRegistrationError(RuntimeError):
    """CUDA refused to register or unregister host memory."""


def _cudart():
    return torch.cuda.cudart()


class HostRegistrations:
    """Host storages registered with CUDA as pinned, in place; see the module docstring."""

    def __init__(self, cudart=None):
        self._cudart = cudart if cudart is not None else _cudart()
        # storage pointer -> the storage object: keeps the memory alive until it is unregistered (freeing
        # registered memory first would leave CUDA holding locked pages of a freed range).
        self._registered: dict[int, torch.UntypedStorage] = {}
        self.fallback_copies = 0
        self._warned = False
        self._finalizer = weakref.finalize(self, _unregister_all, self._cudart, self._registered)
        self._finalizer.atexit = False  # at exit the process's memory goes anyway; CUDA may be torn down

    @property
    def registered_bytes(self) -> int:
        return sum(storage.nbytes() for storage in self._registered.values())

    def __len__(self) -> int:
        return len(self._registered)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` itself with its storage registered (a no-op if already pinned or registered here), or a
        pinned copy where CUDA refuses the registration."""
        if tensor.device.type != "cpu":
            raise ValueError(f"HostRegistrations.pin: a host tensor is needed, got one on {tensor.device}")
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self._registered or tensor.is_pinned():
            return tensor
        code = int(self._cudart.cudaHostRegister(ptr, nbytes, REGISTER_PORTABLE))
        if code == 0:
            self._registered[ptr] = storage
            return tensor
        _clear_last_cuda_error()
        self._fall_back(code, nbytes)
        return tensor.pin_memory()

    def release(self) -> None:
        """Unregister every storage registered here (call it once no copy reads them any more)."""
        self._finalizer()

    def _fall_back(self, code: int, nbytes: int) -> None:
        self.fallback_copies += 1
        if self._warned:
            return
        self._warned = True
        reason = _error_text(self._cudart, code)
        message = (f"dali: CUDA refused to pin a {nbytes}-byte host expert tensor in place ({reason}); "
                   "it and any other refused one are copied into pinned memory instead (up to 2x their size, "
                   "and two copies while each is made). Memory-mapped weights (load with mmap off) and the "
                   "locked-memory limit (ulimit -l) are the usual causes.")
        warnings.warn(message, stacklevel=4)
        logger.warning(message)


def _unregister_all(cudart, registered: dict) -> None:
    failures = []
    while registered:
        ptr, _storage = registered.popitem()
        code = int(cudart.cudaHostUnregister(ptr))
        if code != 0:
            failures.append((ptr, code))
    if failures:
        _clear_last_cuda_error()
        raise HostRegistrationError(
            f"dali: cudaHostUnregister failed for {len(failures)} host expert storage(s) "
            f"({_error_text(cudart, failures[0][1])})")


def _error_text(cudart, code: int) -> str:
    try:
        return f"{cudart.cudaGetErrorString(cudart.cudaError(code))} ({code})"
    except Exception:  # a test double, or a code this runtime does not name
        return f"cudaError {code}"


def _clear_last_cuda_error() -> None:
    """A failed runtime call stays the thread's 'last error' until read, and ATen's kernel-launch checks
    read it: the next unrelated kernel would raise it. torch.cuda.cudart() does not bind
    cudaGetLastError, so call it in the libcudart this process already loaded (never load another)."""
    cudart = torch.cuda.cudart() if torch.cuda.is_available() else None
    if cudart is not None and hasattr(cudart, "cudaGetLastError"):
        cudart.cudaGetLastError()
        return
    path = _loaded_cudart_path()
    if path is not None:
        try:
            ctypes.CDLL(path).cudaGetLastError()
        except (OSError, AttributeError):
            pass


def _loaded_cudart_path() -> str | None:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if "/libcudart.so" in path:
                    return path
    except OSError:
        pass
    return None
