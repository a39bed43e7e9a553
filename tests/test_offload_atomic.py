"""offload() either completes or leaves the model exactly as it was.

Each story injects one failure at one stage of the conversion (moving the non-expert weights, pinning the
experts, the slot pool, the runtime's construction, profiling, a Ctrl-C) and checks what a user sees
afterwards: the same model (same tensors, same experts implementation, same eager output), nothing left
behind (no runtime, no registry handle, no host registration, no pool tensor, the device closed), and a
second offload that works with exactly one pool.

The emulated device is the CPU, where offload moves and pins nothing; the test double below makes it do
both: non-expert weights "move" as copies, experts are pinned through CudaAccelerator's path against a
fake cudart (tests/test_host_memory.py).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from helpers import FP32_RTOL, relative_max_error
from test_host_memory import OFFLOAD, FakeCudart, HostPinningAccelerator

import dali_compile
from dali_compile.experts_interface import spec_of_module
from dali_compile.runtime import host_memory
from dali_compile.runtime.hybrid import HybridRuntime
from dali_compile.runtime.planner import CostModel
from dali_compile.runtime.registry import LayerRegistry, layer_registry
from dali_compile.tiny_models import tiny_model

COST = CostModel(workloads=(1, 8), cpu_seconds=(1.0, 4.0), gpu_seconds=(0.1, 0.2), transfer_seconds=0.5)
PROMPT = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
_real_move = OFFLOAD._move_non_experts


class TrackedAccelerator(HostPinningAccelerator):
    """Remembers its pool tensors (weakly) and whether it was closed."""

    def __init__(self, budget):
        super().__init__(budget)
        self.allocated: list[weakref.ref] = []
        self.closed = False

    def allocate(self, shape, dtype, what):
        tensor = super().allocate(shape, dtype, what)
        self.allocated.append(weakref.ref(tensor))
        return tensor

    def live_pool_tensors(self) -> int:
        return sum(r() is not None for r in self.allocated)

    def close(self):
        self.closed = True
        super().close()


@pytest.fixture
def device(monkeypatch):
    """offload(device="emulated") on a TrackedAccelerator that moves and pins; yields (cudart, accelerators)."""
    cudart, made = FakeCudart(), []
    monkeypatch.setattr(host_memory, "_cudart", lambda: cudart)

    def make(device, budget):
        made.append(TrackedAccelerator(budget))
        return made[-1]

    real_move, real_pin = OFFLOAD._move_non_experts, OFFLOAD._pin_experts
    monkeypatch.setattr(OFFLOAD, "make_accelerator", make)
    monkeypatch.setattr(OFFLOAD, "_move_non_experts",
                        lambda model, dev, experts, undo: real_move(model, dev, experts, undo, move=_moved))
    monkeypatch.setattr(OFFLOAD, "_pin_experts", lambda modules, acc: real_pin(modules, _NotCpu(acc)))
    return cudart, made


def _moved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone()  # "on the device": other storage


class _NotCpu:
    """The accelerator as _pin_experts sees it: a device that needs pinned host memory."""

    def __init__(self, accelerator):
        self._accelerator = accelerator
        self.device = torch.device("cuda")

    def prepare_host_weight(self, tensor):
        return self._accelerator.prepare_host_weight(tensor)


def fail_on_call(n: int, error: BaseException, real=None):
    """A stand-in that raises `error` on its n-th call and otherwise calls `real` (or returns nothing)."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs) if real is not None else None

    return fake


def inject(stage: str, monkeypatch) -> type[BaseException]:
    """Make offload fail at `stage`; returns the error type the caller sees."""
    if stage == "move":
        move = fail_on_call(5, RuntimeError("CUDA out of memory (moving weights)"), _moved)
        monkeypatch.setattr(OFFLOAD, "_move_non_experts",
                            lambda model, dev, experts, undo: _real_move(model, dev, experts, undo, move=move))
        return RuntimeError
    if stage == "pin":
        real = host_memory.HostRegistrations.pin
        monkeypatch.setattr(host_memory.HostRegistrations, "pin",
                            fail_on_call(3, RuntimeError("pinned memory: out of memory"), real))
        return RuntimeError
    if stage == "pool":  # a pool larger than the free device memory
        real = TrackedAccelerator.allocate
        monkeypatch.setattr(TrackedAccelerator, "allocate", fail_on_call(2, torch.OutOfMemoryError("pool"), real))
        return torch.OutOfMemoryError
    if stage == "runtime":  # a bug in the runtime's construction, after it registered its layers
        monkeypatch.setattr(LayerRegistry, "attach", fail_on_call(2, RuntimeError("bug"), LayerRegistry.attach))
        return RuntimeError
    if stage == "profile":  # e.g. a read-only cost-model directory
        monkeypatch.setattr(HybridRuntime, "profile_costs", fail_on_call(1, PermissionError("read-only")))
        return PermissionError
    if stage == "interrupt":  # Ctrl-C while profiling
        monkeypatch.setattr(HybridRuntime, "profile_costs", fail_on_call(1, KeyboardInterrupt()))
        return KeyboardInterrupt
    raise ValueError(stage)


def snapshot(model):
    """What a rollback must restore: every parameter's storage, every buffer object, the implementation."""
    return ([(p, p.data_ptr(), p.device) for p in model.parameters()],
            [(m, name, b) for m in model.modules() for name, b in m._buffers.items()],
            model.config._experts_implementation)


def assert_restored(model, before) -> None:
    params, buffers, implementation = before
    assert all(p.data_ptr() == ptr and p.device == dev for p, ptr, dev in params)
    assert all(m._buffers[name] is b for m, name, b in buffers)
    assert model.config._experts_implementation == implementation
    assert getattr(model, "_dali_runtime", None) is None
    experts = [m for m in model.modules() if hasattr(m, "is_transposed")]
    assert all(layer_registry().lookup(spec_of_module(m)) is None for m in experts)  # no handle left


@pytest.mark.parametrize("stage", ["move", "pin", "pool", "runtime", "profile", "interrupt"])
def test_a_failed_offload_rolls_back_and_a_retry_succeeds(stage, device, monkeypatch, tmp_path):
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path))
    cudart, accelerators = device
    model = tiny_model("mixtral")
    with torch.no_grad():
        want = model(PROMPT).logits
    before = snapshot(model)
    error = inject(stage, monkeypatch)
    needs_profile = stage in ("profile", "interrupt")
    with pytest.raises(error):
        dali_compile.offload(model, device="emulated", expert_memory="1MiB", policy="dali",
                             cost_model=None if needs_profile else COST)
    assert_restored(model, before)
    (failed,) = accelerators
    assert failed.closed and cudart.live() == set()
    assert failed.live_pool_tensors() == 0  # the half-built runtime's pool is freed, not held by the traceback
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, want)

    monkeypatch.undo()  # no more failures (and the plain emulated device)
    dali_compile.offload(model, device="emulated", expert_memory="1MiB", policy="dali", cost_model=COST)
    try:
        with torch.no_grad():
            assert relative_max_error(model(PROMPT).logits, want) <= FP32_RTOL
        assert failed.live_pool_tensors() == 0  # one pool: the retry's
    finally:
        dali_compile.release(model)


def test_rollback_keeps_handles_that_existed_before_the_offload(device, monkeypatch):
    """The model was compiled before (its experts have a handle a graph names): a failed offload detaches
    its runtime from that handle but keeps the handle."""
    cudart, _ = device
    model = tiny_model("mixtral")
    experts = [m for m in model.modules() if hasattr(m, "is_transposed")]
    specs = [spec_of_module(m) for m in experts]
    handles = [layer_registry().register(spec, weak=True) for spec in specs]
    monkeypatch.setattr(HybridRuntime, "profile_costs", fail_on_call(1, PermissionError("read-only")))
    with pytest.raises(PermissionError):
        dali_compile.offload(model, device="emulated", expert_memory="1MiB", policy="dali")
    assert [layer_registry().lookup(spec) for spec in specs] == handles
    assert all(layer_registry().attached(h) is None for h in handles)
    assert cudart.live() == set()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pool_failure_rolls_back_device_memory_and_pinning(monkeypatch):
    """On a real GPU: the pool's second allocation fails; device memory returns to where it was, the
    non-expert weights are back on the CPU in their own storage, the experts are pageable again."""
    from dali_compile.runtime.accelerator import CudaAccelerator

    model = tiny_model("mixtral")
    with torch.no_grad():
        want = model(PROMPT).logits
    before = snapshot(model)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    monkeypatch.setattr(CudaAccelerator, "allocate",
                        fail_on_call(2, torch.OutOfMemoryError("pool"), CudaAccelerator.allocate))
    with pytest.raises(torch.OutOfMemoryError):
        dali_compile.offload(model, device="cuda", expert_memory="1MiB", policy="lru", cost_model=COST)
    params, buffers, implementation = before
    experts = {id(p) for m in model.modules() if hasattr(m, "is_transposed") for p in m.parameters()}
    # An expert tensor CUDA refused to pin in place keeps its pinned copy (see offload._Undo); the rest are
    # back in their own storage, pageable.
    kept = [(p, ptr, dev) for p, ptr, dev in params if id(p) not in experts or p.data_ptr() == ptr]
    assert all(p.data_ptr() == ptr and p.device == dev for p, ptr, dev in kept)
    assert not any(p.is_pinned() for p, _, _ in kept)
    assert all(m._buffers[name] is b for m, name, b in buffers)
    assert model.config._experts_implementation == implementation
    assert getattr(model, "_dali_runtime", None) is None
    assert torch.cuda.memory_allocated() == allocated
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, want)
    monkeypatch.undo()
    dali_compile.offload(model, device="cuda", expert_memory="1MiB", policy="lru", cost_model=COST)
    try:
        with torch.no_grad():
            assert relative_max_error(model(PROMPT.cuda()).logits.cpu(), want) <= 1e-4
    finally:
        dali_compile.release(model)
