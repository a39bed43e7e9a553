"""Host experts pinned in place (`runtime/host_memory.py`): registered once, never copied, unregistered.

On a machine without CUDA a fake cudart records the calls; the CUDA-only test does it for real.
"""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from helpers import FP32_RTOL, relative_max_error

import dali_compile
import dali_compile.offload  # noqa: F401  (the module, for monkeypatching; the package exports the function)
from dali_compile.runtime import host_memory
from dali_compile.runtime.accelerator import CudaAccelerator
from dali_compile.runtime.emulated import EmulatedAccelerator
from dali_compile.runtime.host_memory import HostRegistrations
from dali_compile.runtime.planner import CostModel
from dali_compile.tiny_models import tiny_model

OFFLOAD = sys.modules["dali_compile.offload"]
COST = CostModel(workloads=(1, 8), cpu_seconds=(1.0, 4.0), gpu_seconds=(0.1, 0.2), transfer_seconds=0.5)
PROMPT = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister; `refuse` holds pointers whose registration fails."""

    def __init__(self, refuse=()):
        self.registered: list[tuple[int, int, int]] = []  # (ptr, nbytes, flags)
        self.unregistered: list[int] = []
        self.refuse = set(refuse)

    def cudaHostRegister(self, ptr, nbytes, flags):
        if ptr in self.refuse:
            return 712  # cudaErrorHostMemoryAlreadyRegistered
        self.registered.append((ptr, nbytes, flags))
        return 0

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0

    def live(self) -> set[int]:
        return {ptr for ptr, _, _ in self.registered} - set(self.unregistered)


class HostPinningAccelerator(EmulatedAccelerator):
    """The emulated device with CudaAccelerator's host-weight preparation, so offload pins (and rolls back)
    host experts as on CUDA; `close` does what CudaAccelerator.close does, less the device synchronize."""

    prepare_host_weight = CudaAccelerator.prepare_host_weight

    def close(self):
        host = getattr(self, "host_memory", None)
        if host is not None:
            host.release()
        super().close()


@pytest.fixture
def fake_cudart(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(host_memory, "_cudart", lambda: cudart)
    return cudart


@pytest.fixture
def pinning_device(monkeypatch, fake_cudart):
    """offload(device="emulated") builds a HostPinningAccelerator; returns the fake cudart and the accelerators."""
    made = []

    def make(device, budget):
        made.append(HostPinningAccelerator(budget))
        return made[-1]

    monkeypatch.setattr(OFFLOAD, "make_accelerator", make)
    # The emulated device is the CPU, where offload moves nothing and pins nothing: force the CUDA path.
    monkeypatch.setattr(OFFLOAD, "_pin_experts", _always_pin)
    return fake_cudart, made


def _always_pin(modules, accelerator):
    for _, module in modules:
        for param in module.parameters(recurse=False):
            param.data = accelerator.prepare_host_weight(param.data)


def expert_parameters(model) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if hasattr(m, "is_transposed") for p in m.parameters(recurse=False)]


def test_each_storage_is_registered_once_in_place(fake_cudart):
    """Three views of one storage and a second storage: two registrations, whole storages, no copy."""
    host = HostRegistrations()
    a, b = torch.randn(4, 8), torch.randn(3, 5)
    pinned = [host.pin(a), host.pin(a[1:]), host.pin(a.view(8, 4)), host.pin(b), host.pin(a)]
    assert pinned[0] is a and pinned[3] is b  # the tensors themselves
    assert [t.data_ptr() for t in pinned] == [a.data_ptr(), a[1:].data_ptr(), a.data_ptr(), b.data_ptr(), a.data_ptr()]
    assert fake_cudart.registered == [(a.data_ptr(), 4 * 8 * 4, 1), (b.data_ptr(), 3 * 5 * 4, 1)]
    assert len(host) == 2 and host.registered_bytes == (32 + 15) * 4


def test_release_and_garbage_collection_unregister_everything(fake_cudart):
    host = HostRegistrations()
    tensors = [torch.randn(16) for _ in range(3)]
    for t in tensors:
        host.pin(t)
    host.release()
    assert fake_cudart.live() == set() and len(fake_cudart.unregistered) == 3
    host.release()  # once only
    assert len(fake_cudart.unregistered) == 3

    dropped = HostRegistrations()
    dropped.pin(tensors[0])
    del dropped
    gc.collect()
    assert fake_cudart.live() == set()  # an owner freed without release still unregisters


def test_registration_keeps_the_storage_alive_until_unregistered(fake_cudart):
    """Freeing registered memory before unregistering it would leave CUDA a locked range of freed pages."""
    host = HostRegistrations()
    tensor = torch.randn(64)
    values, ptr = tensor.clone(), tensor.data_ptr()
    host.pin(tensor)
    del tensor
    gc.collect()
    (storage,) = host._registered.values()
    assert ptr in fake_cudart.live() and storage.data_ptr() == ptr
    assert torch.equal(torch.empty(0).set_(storage, 0, (64,)), values)  # not freed, not reused
    del storage
    host.release()
    assert fake_cudart.live() == set()


def test_a_refused_registration_falls_back_to_a_pinned_copy_with_one_warning(monkeypatch, fake_cudart):
    """The fallback is pin_memory()'s copy (a CPU-only torch cannot pin: a clone stands in for it)."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
    refused = [torch.randn(8), torch.randn(8)]
    fake_cudart.refuse.update(t.data_ptr() for t in refused)
    host = HostRegistrations()
    with pytest.warns(UserWarning, match="refused to pin") as caught:
        copies = [host.pin(t) for t in refused]
    assert len(caught) == 1 and host.fallback_copies == 2 and len(host) == 0
    assert all(c is not t and torch.equal(c, t) for c, t in zip(copies, refused, strict=True))


def test_offload_registers_every_expert_storage_once_and_release_unregisters(pinning_device):
    cudart, accelerators = pinning_device
    model = tiny_model("gpt_oss")  # four expert tensors per layer: weights and biases
    with torch.no_grad():
        want = model(PROMPT).logits
    experts = expert_parameters(model)
    before = [p.data_ptr() for p in experts]
    dali_compile.offload(model, device="emulated", expert_memory="1MiB", policy="lru", cost_model=COST)
    try:
        assert [p.data_ptr() for p in experts] == before  # no copy
        storages = {p.untyped_storage().data_ptr() for p in experts}
        assert sorted(ptr for ptr, _, _ in cudart.registered) == sorted(storages)  # each exactly once
        with torch.no_grad():
            assert relative_max_error(model(PROMPT).logits, want) <= FP32_RTOL
    finally:
        dali_compile.release(model)
    assert cudart.live() == set() and sorted(cudart.unregistered) == sorted(storages)
    assert len(accelerators) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offload_pins_the_experts_in_place():
    """For real: the expert storages become pinned where they are (same pointers), copies read them, and
    release makes them pageable again; the caching host allocator holds nothing of them."""
    model = tiny_model("mixtral")
    with torch.no_grad():
        want = model(PROMPT).logits
    experts = expert_parameters(model)
    before = [p.data_ptr() for p in experts]
    dali_compile.offload(model, device="cuda", expert_memory="1MiB", policy="lru", cost_model=COST)
    try:
        host = OFFLOAD.runtime_of(model).accelerator.host_memory
        in_place = [p.data_ptr() == ptr for p, ptr in zip(experts, before, strict=True)]
        assert all(p.is_pinned() for p in experts)
        # Small tensors sharing a page with another registration may fall back to a copy; the rest are in place.
        assert sum(in_place) == len(host)
        assert sum(in_place) + host.fallback_copies == len(experts)
        with torch.no_grad():
            got = model(PROMPT.cuda()).logits.cpu()
        assert relative_max_error(got, want) <= 1e-4  # TF32-free fp32, another summation order
        torch.zeros(4, device="cuda").add_(1)  # no stale CUDA error left by a refused registration
        torch.cuda.synchronize()
    finally:
        dali_compile.release(model)
    assert not any(p.is_pinned() for p, here in zip(experts, in_place, strict=True) if here)
