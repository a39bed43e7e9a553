"""Integer handles for MoE layers, so custom ops carry an int, never a Python object.

A compiled graph calls `dali::moe_hybrid(..., layer=7)`; the op's kernel asks the
registry for handle 7 and gets the `LayerSpec`. Registering the same tensors with
the same layout again (a recompile for a new sequence length, say) returns the
same handle instead of growing the table.
"""

from __future__ import annotations

import threading

from .layer_spec import LayerSpec


def _identity(spec: LayerSpec) -> tuple:
    """What makes two specs the same layer: the same tensor storage and the same layout."""
    tensors = tuple(
        None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))
        for t in spec.tensors()
    )
    return (spec.layout, tensors)


class UnknownLayerError(KeyError):
    def __str__(self):
        return str(self.args[0])


class LayerRegistry:
    """Owns the handle → LayerSpec table. Lifetime: until `release`/`clear` is called."""

    def __init__(self):
        self._lock = threading.Lock()
        self._specs: dict[int, LayerSpec] = {}
        self._by_identity: dict[tuple, int] = {}
        self._runtimes: dict[int, object] = {}
        self._next = 0

    def register(self, spec: LayerSpec) -> int:
        key = _identity(spec)
        with self._lock:
            handle = self._by_identity.get(key)
            if handle is None:
                handle = self._next
                self._next += 1
                self._specs[handle] = spec
                self._by_identity[key] = handle
            return handle

    def get(self, handle: int) -> LayerSpec:
        spec = self._specs.get(handle)
        if spec is None:
            raise UnknownLayerError(
                f"dali: unknown MoE layer id {handle}; it was never registered or has been released "
                f"({len(self._specs)} layers registered)"
            )
        return spec

    def rebind(self, handle: int, spec: LayerSpec) -> None:
        """Point an existing handle at new tensors (same layout and shapes), e.g. after a reload."""
        old = self.get(handle)

        def kind(s: LayerSpec):
            return s.layout, s.dtype, s.device, [None if t is None else tuple(t.shape) for t in s.tensors()]

        if kind(spec) != kind(old):
            raise ValueError(
                f"dali: layer {handle} cannot be rebound to tensors of another layout, shape, dtype or device"
            )
        with self._lock:
            if self._by_identity.get(_identity(old)) == handle:
                del self._by_identity[_identity(old)]
            self._specs[handle] = spec
            # Another handle may already own these tensors; keep its entry so releasing it stays exact.
            self._by_identity.setdefault(_identity(spec), handle)

    def attach(self, handle: int, runtime) -> None:
        """Route the layer's `dali::moe_hybrid` calls to `runtime.forward` (an offloaded layer)."""
        self.get(handle)
        with self._lock:
            self._runtimes[handle] = runtime

    def detach(self, handle: int) -> None:
        with self._lock:
            self._runtimes.pop(handle, None)

    def attached(self, handle: int):
        """The runtime serving this layer, or None (then the op's device kernel runs it directly)."""
        return self._runtimes.get(handle)

    def release(self, handle: int) -> None:
        with self._lock:
            self._runtimes.pop(handle, None)
            spec = self._specs.pop(handle, None)
            if spec is not None and self._by_identity.get(_identity(spec)) == handle:
                del self._by_identity[_identity(spec)]

    def clear(self) -> None:
        with self._lock:
            self._specs.clear()
            self._by_identity.clear()
            self._runtimes.clear()

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, handle: int) -> bool:
        return handle in self._specs


_PROCESS_REGISTRY = LayerRegistry()


def layer_registry() -> LayerRegistry:
    """The registry that `dali::*` op kernels resolve layer ids against in this process."""
    return _PROCESS_REGISTRY
