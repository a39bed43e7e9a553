"""Integer handles for MoE layers, so custom ops carry an int, never a Python object.

A compiled graph calls `dali::moe_hybrid(..., layer=7)`; the op's kernel asks the
registry for handle 7 and gets the `LayerSpec`. Registering the same tensors with
the same layout again (a recompile for a new sequence length, say) returns the
same handle instead of growing the table.

Lifetimes. `register(spec)` holds the spec's tensors until `release`: an explicit
lifetime, for callers that own nothing else (tests, hand-built layers).
`register(spec, weak=True)` holds them weakly: the model owns its experts, and the
handle dies with them (an evaluation harness that compiles checkpoints one after
another frees each one's experts when it drops the model). `attach` always holds
the serving `HybridLayer` weakly: the model owns its runtime. A handle whose
tensors or runtime died raises `UnknownLayerError` saying so.

Redirects. One compiled graph can serve several model instances (dynamo reuses it
when the parameters are graph inputs), but the graph names one handle. The backend
resolves the tensors of each call to their own handle and installs a redirect
{graph handle -> that handle} for the calling thread only (`redirect`), so
concurrent calls on different instances never see each other's experts and no
shared state changes per call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref

from . import cpu_extension
from .layer_spec import LayerSpec

_FIELDS = tuple(f.name for f in dataclasses.fields(LayerSpec))


def _identity(spec: LayerSpec) -> tuple:
    """What makes two specs the same layer: the same tensor storage and the same layout."""
    tensors = tuple(
        None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))
        for t in spec.tensors()
    )
    return (spec.layout, tensors)


def _checked_spec(layout, tensors, name: str) -> LayerSpec:
    """A LayerSpec of tensors already checked at registration, without checking again: `get` runs once per
    op call and per layer, and `LayerSpec`'s checks cost ~6x the rest of the lookup."""
    spec = object.__new__(LayerSpec)
    for field, value in zip(_FIELDS, (layout, *tensors, name), strict=True):
        object.__setattr__(spec, field, value)
    return spec


def _serving_changed() -> None:
    """What serves some handle changed: the C++ kernel of `dali::moe_hybrid` must stop serving the layers the
    Python kernel published to it (ops/moe_hybrid.py) and ask the registry again."""
    cpu_extension.forget_resident_layers()


class UnknownLayerError(KeyError):
    def __str__(self):
        return str(self.args[0])


class _Entry:
    """One handle: its layout and name, its tensors (weakly, plus strongly for an explicit lifetime) and
    the runtime serving it (weakly).

    `aliases`: each registration's own tensor objects, as weak references. Objects of the same storage
    (the key says so) registered by another caller are kept too, so the handle lives while any of them
    does, whichever caller's objects were temporaries."""

    __slots__ = ("handle", "layout", "name", "key", "aliases", "spec", "runtime", "on_death")

    def __init__(self, handle: int, spec: LayerSpec, key: tuple, weak: bool, on_death):
        self.handle = handle
        self.layout, self.name, self.key = spec.layout, spec.name, key
        self.on_death = on_death
        self.aliases: list[tuple] = []
        self.add_alias(spec.tensors())
        self.spec = None if weak else spec  # a strong entry serves its own spec
        self.runtime = None

    def add_alias(self, tensors) -> None:
        if not any(self._holds(refs, tensors) for refs in self.aliases):
            self.aliases = [refs for refs in self.aliases if self._live(refs) is not None]
            self.aliases.append(tuple(None if t is None else weakref.ref(t, self.on_death) for t in tensors))

    def tensors(self) -> tuple | None:
        """Live tensors of the layer, or None once every registration's objects were freed."""
        for refs in self.aliases:
            tensors = self._live(refs)
            if tensors is not None:
                return tensors
        return None

    def holds(self, tensors) -> bool:
        return any(self._holds(refs, tensors) for refs in self.aliases)

    @staticmethod
    def _live(refs) -> tuple | None:
        tensors = tuple(None if r is None else r() for r in refs)
        if any(t is None and r is not None for t, r in zip(tensors, refs, strict=True)):
            return None
        return tensors

    @staticmethod
    def _holds(refs, tensors) -> bool:
        return all((r is None and t is None) or (r is not None and r() is t)
                   for r, t in zip(refs, tensors, strict=True))


class LayerRegistry:
    """Owns the handle table; see the module docstring for lifetimes and per-thread redirects."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._by_identity: dict[tuple, int] = {}
        self._freed: set[int] = set()  # handles whose model was freed: for the error message
        self._dying: list[int] = []  # appended by weakref callbacks (any thread, any moment), purged under lock
        self._local = threading.local()
        self._next = 0
        # Bumped whenever what an existing handle holds or whom it is served by changes (rebind, release, attach,
        # detach, clear, a death purged): a caller that checked `holds` may keep trusting its answer for the same
        # tensor objects while this number stays the same (the backend's per-call check does).
        self.generation = 0

    # -- registration ---------------------------------------------------------------------------------

    def register(self, spec: LayerSpec, weak: bool = False) -> int:
        """The handle of `spec`'s tensors and layout, new or existing. weak=False: the registry holds the
        tensors until `release`; weak=True: only while their owner does. A strong registration of tensors
        already registered weakly makes that entry strong."""
        key = _identity(spec)
        with self._locked():
            handle = self._by_identity.get(key)
            entry = None if handle is None else self._entries.get(handle)
            if entry is not None and entry.tensors() is None:  # dead, its callback not yet run
                self._drop(handle, freed=True)
                entry = None
            if entry is None:
                handle = self._next
                self._next += 1
                self._entries[handle] = _Entry(handle, spec, key, weak, self._on_death(handle))
                self._by_identity[key] = handle
            else:
                entry.add_alias(spec.tensors())
                if not weak and entry.spec is None:
                    entry.spec = spec
            return handle

    def lookup(self, spec: LayerSpec) -> int | None:
        """The handle already registered for `spec`'s tensors and layout, or None; registers nothing."""
        with self._locked():
            handle = self._by_identity.get(_identity(spec))
            entry = None if handle is None else self._entries.get(handle)
            return handle if entry is not None and entry.tensors() is not None else None

    def get(self, handle: int) -> LayerSpec:
        entry = self._entry(handle)
        if entry.spec is not None:
            return entry.spec
        tensors = entry.tensors()
        if tensors is None:
            self._mark_dead(entry.handle)
            raise self._unknown(entry.handle, freed=True)
        return _checked_spec(entry.layout, tensors, entry.name)

    def holds(self, handle: int, tensors) -> bool:
        """Whether `handle` (no redirect applied) is bound to exactly these tensor objects (up, down,
        up_bias, down_bias)."""
        entry = self._entries.get(handle)
        return entry is not None and entry.holds(tensors)

    def rebind(self, handle: int, spec: LayerSpec) -> None:
        """Point an existing handle at new tensors (same layout and shapes), e.g. after a reload. This changes
        the handle for every thread; the backend uses `redirect` instead."""
        old = self.get(handle)

        def kind(s: LayerSpec):
            return s.layout, s.dtype, s.device, [None if t is None else tuple(t.shape) for t in s.tensors()]

        if kind(spec) != kind(old):
            raise ValueError(
                f"dali: layer {handle} cannot be rebound to tensors of another layout, shape, dtype or device"
            )
        with self._locked():
            entry = self._entries[handle]
            if self._by_identity.get(entry.key) == handle:
                del self._by_identity[entry.key]
            new = _Entry(handle, spec, _identity(spec), entry.spec is None, self._on_death(handle))
            new.runtime = entry.runtime
            self._entries[handle] = new
            self.generation += 1
            _serving_changed()
            # Another handle may already own these tensors; keep its entry so releasing it stays exact.
            self._by_identity.setdefault(new.key, handle)

    # -- runtimes ---------------------------------------------------------------------------------------

    def attach(self, handle: int, runtime) -> None:
        """Route the layer's `dali::moe_hybrid` calls to `runtime.forward` (an offloaded layer). Held weakly:
        when the runtime is freed without `release`, the handle goes with it."""
        self.get(handle)
        with self._locked():
            entry = self._entries[handle]
            entry.runtime = weakref.ref(runtime, self._on_death(handle))
            self.generation += 1
            _serving_changed()

    def detach(self, handle: int) -> None:
        with self._locked():
            entry = self._entries.get(handle)
            if entry is not None:
                entry.runtime = None
            self.generation += 1
            _serving_changed()

    def attached(self, handle: int):
        """The runtime serving this layer, or None (then the op's device kernel runs it directly)."""
        handle = self._redirected(handle)
        entry = self._entries.get(handle)
        if entry is None or entry.runtime is None:
            return None
        runtime = entry.runtime()
        if runtime is None:
            self._mark_dead(handle)
            raise self._unknown(handle, freed=True)
        return runtime

    def publish_if_resident(self, handle: int, publish) -> None:
        """Calls publish(handle, spec) under the lock if `handle` is served directly by its device kernel: registered,
        its tensors alive, no runtime attached and no redirect on this thread. Every change to what serves a
        handle (drop, rebind, attach, detach, clear) forgets what was published (`_serving_changed`)."""
        if getattr(self._local, "redirects", None):
            return
        with self._locked():
            entry = self._entries.get(handle)
            if entry is None or entry.runtime is not None:
                return
            if entry.spec is not None:
                publish(handle, entry.spec)
                return
            tensors = entry.tensors()
            if tensors is not None:
                publish(handle, _checked_spec(entry.layout, tensors, entry.name))

    # -- per-thread redirects -------------------------------------------------------------------------

    @contextlib.contextmanager
    def redirect(self, handles: dict[int, int]):
        """For the calling thread and the duration of the block, resolve each key handle as its value."""
        previous = getattr(self._local, "redirects", None)
        self._local.redirects = {**previous, **handles} if previous else dict(handles)
        cpu_extension.pause_resident_layers(+1)
        try:
            yield
        finally:
            cpu_extension.pause_resident_layers(-1)
            self._local.redirects = previous

    def _redirected(self, handle: int) -> int:
        redirects = getattr(self._local, "redirects", None)
        return redirects.get(handle, handle) if redirects else handle

    # -- release ----------------------------------------------------------------------------------------

    def release(self, handle: int) -> None:
        with self._locked():
            self._drop(handle, freed=False)

    def clear(self) -> None:
        with self._locked():
            self._entries.clear()
            self.generation += 1
            _serving_changed()
            self._by_identity.clear()
            self._freed.clear()
            self._dying.clear()

    def __len__(self) -> int:
        with self._locked():
            return len(self._entries)

    def __contains__(self, handle: int) -> bool:
        with self._locked():
            return handle in self._entries

    # -- internals --------------------------------------------------------------------------------------

    def _entry(self, handle: int) -> _Entry:
        handle = self._redirected(handle)
        entry = self._entries.get(handle)
        if entry is None:
            raise self._unknown(handle, freed=handle in self._freed)
        return entry

    def _unknown(self, handle: int, freed: bool) -> UnknownLayerError:
        if freed:
            return UnknownLayerError(
                f"dali: MoE layer id {handle}: the model owning layer {handle} was freed (its expert tensors or "
                "its offload runtime were garbage collected); compile the model you are running"
            )
        return UnknownLayerError(
            f"dali: unknown MoE layer id {handle}; it was never registered or has been released "
            f"({len(self._entries)} layers registered)"
        )

    def _on_death(self, handle: int):
        """A weakref callback: it runs inside the garbage collector, in whatever thread freed the object,
        maybe while that thread holds the lock; so it only appends, and purges if the lock is free (an entry
        that holds tensors strongly, the runtime's, must not keep them until the next registry call)."""
        registry = weakref.ref(self)

        def callback(_ref, handle=handle):
            self_ = registry()
            if self_ is not None:
                self_._dying.append(handle)
                self_._purge_if_free()

        return callback

    @contextlib.contextmanager
    def _locked(self):
        """The lock, with the entries that died meanwhile purged (a callback that found the lock taken left
        them to whoever held it)."""
        with self._lock:
            self._purge()
            yield
            self._purge()
        self._purge_if_free()

    def _purge_if_free(self) -> None:
        while self._dying and self._lock.acquire(blocking=False):
            try:
                self._purge()
            finally:
                self._lock.release()

    def _mark_dead(self, handle: int) -> None:
        self._dying.append(handle)

    def _purge(self) -> None:
        """Drop the entries whose tensors or runtime died (caller holds the lock)."""
        while self._dying:
            handle = self._dying.pop()
            entry = self._entries.get(handle)
            if entry is None:
                continue
            runtime_dead = entry.runtime is not None and entry.runtime() is None
            if entry.tensors() is None or runtime_dead:
                self._drop(handle, freed=True)

    def _drop(self, handle: int, freed: bool) -> None:
        entry = self._entries.pop(handle, None)
        if entry is None:
            return
        self.generation += 1
        _serving_changed()
        if self._by_identity.get(entry.key) == handle:
            del self._by_identity[entry.key]
        if freed:
            self._freed.add(handle)


_PROCESS_REGISTRY = LayerRegistry()


def layer_registry() -> LayerRegistry:
    """The registry that `dali::*` op kernels resolve layer ids against in this process."""
    return _PROCESS_REGISTRY
