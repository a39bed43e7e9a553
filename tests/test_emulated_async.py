"""The emulated accelerator's asynchronous mode: a CPU stand-in for a GPU's streams that catches missing waits.

In this mode compute and copies run on their own worker threads, each item after a seeded random delay, and
events complete when the worker gets there. Most tests hold a worker at a gate (a launched function or a
copy's `after` event that blocks until the test opens it), so each ordering is forced, not hoped for. The
last tests run a staged expert pipeline in miniature, and an offloaded model, with a wait or an `after`
deliberately left out: the numbers must come out wrong, which is what the mode exists to show.
"""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from helpers import FP32_RTOL, relative_max_error
from test_offload import COST, PROMPT, moe_geometry

import dali_compile
from dali_compile.ops.expert_math import moe_reference
from dali_compile.ops.gpu_experts import gpu_experts
from dali_compile.runtime.accelerator import DONE, Event, make_accelerator
from dali_compile.runtime.emulated import EmulatedAccelerator, Pending, emulated_mode
from dali_compile.runtime.expert_cache import SlotPool, expert_bytes
from dali_compile.runtime.layer_spec import Activation, ExpertLayout, LayerSpec
from dali_compile.tiny_models import tiny_model

E, H, I, T, K = 6, 8, 4, 5, 2  # noqa: E741 - experts, hidden, intermediate, tokens, top-k
STILL_QUEUED_S = 0.05  # how long a test watches a gated item to see that it has not run


class Gate(Event):
    """An event the test completes by hand: a copy told to run `after` it waits on the copy worker."""

    def __init__(self):
        self.opened = threading.Event()

    def done(self) -> bool:
        return self.opened.is_set()

    def synchronize(self) -> None:
        self.opened.wait()


@pytest.fixture
def acc():
    accelerator = EmulatedAccelerator(1 << 20, asynchronous=True, seed=0, max_delay_s=0.001)
    yield accelerator
    accelerator.close()


def blocked_on(gate: threading.Event, fn=lambda: None):
    """A compute that holds the compute worker until `gate` opens, then runs fn."""
    def run(*args):
        gate.wait()
        return fn(*args)

    return run


def test_events_complete_later_not_at_issue(acc):
    """A recorded point is reached only when the compute worker gets there, and a copy after it waits
    for it; both complete once the held compute is released."""
    gate = threading.Event()
    acc.launch(blocked_on(gate))
    point = acc.record()
    dst, src = torch.zeros(4), torch.arange(4.0)
    copy = acc.copy_async(dst, src, after=point)
    time.sleep(STILL_QUEUED_S)
    assert not point.done() and not copy.done() and dst.eq(0).all()
    gate.set()
    acc.synchronize()
    assert point.done() and copy.done() and torch.equal(dst, src)


def test_the_seeded_delay_alone_leaves_a_fresh_event_pending():
    """No gate: seed 2's first compute delay is 0.956 x max_delay_s (191 ms here, random.Random(2)), so a
    point recorded on an idle stream is not reached right after `record` returns."""
    accelerator = EmulatedAccelerator(0, asynchronous=True, seed=2, max_delay_s=0.2)
    try:
        point = accelerator.record()
        assert not point.done()
        point.synchronize()
        assert point.done()
    finally:
        accelerator.close()


def test_launch_returns_at_once_and_result_waits_for_the_value(acc):
    gate = threading.Event()
    pending = acc.launch(blocked_on(gate, lambda x: x * 2), torch.ones(3))
    assert isinstance(pending, Pending) and not pending.done()
    gate.set()
    assert torch.equal(acc.result(pending), torch.full((3,), 2.0))


def test_pending_values_resolve_in_later_launches_also_inside_lists(acc):
    first = acc.launch(lambda: torch.ones(2))
    second = acc.launch(lambda a, pair, scale: a + pair[0] * pair[1] * scale, first, (first, first), scale=first)
    assert torch.equal(acc.result(second), torch.full((2,), 2.0))
    assert acc.result([first, 3])[1] == 3  # result() passes plain values through
    assert torch.equal(acc.to_host(first), torch.ones(2))


def test_a_pending_value_used_by_the_host_is_a_clear_error(acc):
    pending = acc.launch(lambda: torch.ones(2))
    with pytest.raises(TypeError, match="Pending"):
        torch.cat([pending, pending])
    acc.synchronize()


def test_wait_orders_compute_after_a_copy_without_blocking_the_host(acc):
    """compute after `wait(copy)` reads the copied slot even though the copy is held back; the host goes on."""
    slot, weights, gate = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), Gate()
    copy = acc.copy_async(slot, weights, after=gate)
    issued = time.perf_counter()
    acc.wait(copy)
    read = acc.launch(lambda s: s.clone(), slot)
    assert time.perf_counter() - issued < STILL_QUEUED_S  # wait() queued, did not block
    time.sleep(STILL_QUEUED_S)
    assert not read.done()
    gate.opened.set()
    assert torch.equal(acc.result(read), weights)


def test_without_wait_the_compute_reads_the_slot_before_its_copy(acc):
    """The bug class the mode exists for, forced: no wait, and the compute sees the old contents."""
    slot, weights, gate = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), Gate()
    acc.copy_async(slot, weights, after=gate)
    read = acc.launch(lambda s: s.clone(), slot)
    assert torch.equal(acc.result(read), torch.zeros(3))
    gate.opened.set()
    acc.synchronize()


def test_a_copy_after_a_compute_point_waits_for_the_compute_that_reads_the_slot(acc):
    slot, gate = torch.ones(3), threading.Event()
    read = acc.launch(blocked_on(gate, lambda s: s.clone()), slot)
    copy = acc.copy_async(slot, torch.full((3,), 7.0), after=acc.record())
    time.sleep(STILL_QUEUED_S)
    assert not copy.done()
    gate.set()
    assert torch.equal(acc.result(read), torch.ones(3))  # the old expert, as the compute was promised
    copy.synchronize()
    assert torch.equal(slot, torch.full((3,), 7.0))


def test_without_after_a_copy_overwrites_a_slot_a_queued_compute_still_reads(acc):
    slot, gate = torch.ones(3), threading.Event()
    read = acc.launch(blocked_on(gate, lambda s: s.clone()), slot)
    acc.copy_async(slot, torch.full((3,), 7.0), after=None).synchronize()
    gate.set()
    assert torch.equal(acc.result(read), torch.full((3,), 7.0))


def test_a_launch_error_surfaces_at_result_once_and_the_stream_goes_on(acc):
    failed = acc.launch(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        acc.result(failed)
    acc.synchronize()  # already seen at result(): not raised twice
    dependent = acc.launch(lambda x: x, failed)
    with pytest.raises(ZeroDivisionError):  # the same error, passed on
        acc.result(dependent)
    acc.synchronize()
    assert torch.equal(acc.result(acc.launch(lambda: torch.ones(1))), torch.ones(1))


def test_an_error_seen_through_a_dependent_launch_is_not_raised_again(acc):
    failed = acc.launch(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        acc.result(acc.launch(lambda x: x, [failed]))
    acc.synchronize()
    with pytest.raises(ZeroDivisionError):  # the placeholder itself still answers with its error
        acc.result(failed)


def test_an_unseen_launch_error_surfaces_at_synchronize(acc):
    acc.launch(lambda: 1 / 0)
    acc.launch(lambda: [][1])
    with pytest.raises(ZeroDivisionError):  # the first one
        acc.synchronize()
    acc.synchronize()  # and only once


def test_a_failed_copy_fails_its_event_and_the_compute_that_waited_for_it(acc):
    copy = acc.copy_async(torch.zeros(3), torch.zeros(4), after=None)  # shapes differ: the copy raises
    acc.wait(copy)
    read = acc.launch(lambda: torch.ones(1))
    with pytest.raises(RuntimeError, match="size") as at_result:
        acc.result(read)
    with pytest.raises(RuntimeError) as at_event:
        copy.synchronize()
    assert at_event.value is at_result.value
    acc.synchronize()  # seen already
    assert torch.equal(acc.result(acc.launch(lambda: torch.ones(1))), torch.ones(1))


def test_launch_keeps_the_callers_grad_mode(acc):
    with torch.no_grad():
        assert acc.result(acc.launch(torch.is_grad_enabled)) is False
    with torch.inference_mode():
        assert acc.result(acc.launch(torch.is_inference_mode_enabled)) is True
    assert acc.result(acc.launch(torch.is_grad_enabled)) is True


def test_the_synchronous_mode_runs_compute_on_the_caller():
    accelerator = EmulatedAccelerator(0, asynchronous=False)
    try:
        assert accelerator.launch(threading.get_ident) == threading.get_ident()
        assert accelerator.record() is DONE and accelerator.result(3) == 3
    finally:
        accelerator.close()


def test_close_stops_the_workers_and_refuses_more_work():
    accelerator = EmulatedAccelerator(0, asynchronous=True)
    threads = [accelerator._compute._thread, accelerator._copies._thread]
    accelerator.close()
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="closed"):
        accelerator.launch(lambda: None)


def test_an_accelerator_never_closed_stops_its_workers_when_collected():
    accelerator = EmulatedAccelerator(0, asynchronous=True)
    accelerator.result(accelerator.launch(lambda: None))  # the last item each worker ran holds the accelerator
    accelerator.copy_async(torch.zeros(1), torch.ones(1), after=None).synchronize()
    threads = [accelerator._compute._thread, accelerator._copies._thread]
    del accelerator
    gc.collect()
    for thread in threads:
        thread.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("env, device, asynchronous", [
    (None, "emulated", False),  # the default stays synchronous
    ("sync", "emulated", False),
    ("async", "emulated", True),  # what the test matrix's emulated_mode fixture sets
    ("sync", "emulated-async", True),  # explicit names win over the variable
    ("async", "emulated-sync", False),
])
def test_make_accelerator_picks_the_mode(monkeypatch, env, device, asynchronous):
    if env is None:
        monkeypatch.delenv("DALI_EMULATED_MODE", raising=False)
    else:
        monkeypatch.setenv("DALI_EMULATED_MODE", env)
    accelerator = make_accelerator(device, 0)
    try:
        assert isinstance(accelerator, EmulatedAccelerator) and accelerator.asynchronous is asynchronous
    finally:
        accelerator.close()


def test_a_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DALI_EMULATED_MODE", "fast")
    with pytest.raises(ValueError, match="DALI_EMULATED_MODE"):
        emulated_mode()
    with pytest.raises(ValueError, match="emulated-async"):
        make_accelerator("cpu", 0)


# A staged expert pipeline in miniature, written against the accelerator interface the way the hybrid
# runtime uses it: one staging slot, each expert copied into it after the previous compute (`after`), the
# compute waiting for the copy (`wait`), then launched. With one slot every step reuses it, so both a
# missing `after` and a missing `wait` are visible in the sum.


def host_layer(seed: int = 0) -> LayerSpec:
    g = torch.Generator().manual_seed(seed)
    layout = ExpertLayout(Activation("silu"), has_bias=True)
    return LayerSpec(layout, torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g),
                     torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g))


def staged_pipeline(pool: SlotPool, layer: LayerSpec, hidden, ids, weights, *, use_after=True, use_wait=True):
    """All E experts through the pool's one slot; returns [T, H] like moe_reference."""
    accelerator = pool.accelerator
    last_compute, parts = None, []
    for expert in range(E):
        ready = pool.load(0, layer, expert, last_compute if use_after else None)
        if use_wait:
            accelerator.wait(ready)
        table = torch.full((E,), -1, dtype=torch.int32)
        table[expert] = 0
        parts.append(accelerator.launch(gpu_experts, hidden, ids, weights, pool.up, pool.down, pool.up_bias,
                                        pool.down_bias, table, layer.layout))
        last_compute = accelerator.record()
    total = accelerator.launch(lambda ps: torch.stack(ps).sum(0).sum(1), parts)
    return accelerator.result(total)


@pytest.fixture
def routed():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return hidden, ids, torch.rand(T, K, generator=g)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_correct_pipeline_equals_the_reference_in_both_modes(routed, asynchronous):
    layer = host_layer()
    accelerator = EmulatedAccelerator(expert_bytes(layer), asynchronous=asynchronous, max_delay_s=0.002)
    pool = SlotPool(accelerator, layer, 1)
    try:
        for _ in range(3):
            got = staged_pipeline(pool, layer, *routed)
            assert relative_max_error(got, moe_reference(layer, *routed)) <= FP32_RTOL
    finally:
        accelerator.close()


@pytest.mark.parametrize("broken", ["no wait", "no after"])
def test_a_pipeline_missing_a_wait_or_an_after_gives_wrong_numbers(routed, broken):
    """Each of the E steps races once; with delays of up to 2 ms on both workers at least one of 3 x 6
    races goes the wrong way (each is near a coin flip), so a correct answer here would be a fluke of
    about 2^-18. Seeded delays, and the same shape of race every run."""
    layer = host_layer()
    want = moe_reference(layer, *routed)
    accelerator = EmulatedAccelerator(expert_bytes(layer), asynchronous=True, seed=7, max_delay_s=0.002)
    pool = SlotPool(accelerator, layer, 1)
    try:
        errors = [relative_max_error(staged_pipeline(pool, layer, *routed, use_wait=broken != "no wait",
                                                     use_after=broken != "no after"), want)
                  for _ in range(3)]
    finally:
        accelerator.close()
    assert any(not error <= 1e-2 for error in errors), errors  # NaN (a slot never written) counts as wrong


# The same on a whole offloaded model: the runtime as written equals eager in the asynchronous mode, and
# the runtime with its waits (or its copies' `after` points) taken out does not. on_demand with one staging
# slot copies every GPU expert into the same slot, right after the compute that read the previous one.


@pytest.mark.parametrize("broken", [None, "no wait", "no after"])
def test_an_offloaded_model_is_right_in_async_mode_and_wrong_without_its_waits(monkeypatch, broken):
    if broken == "no wait":
        monkeypatch.setattr(EmulatedAccelerator, "wait", lambda self, event: None)
    if broken == "no after":
        copy_async = EmulatedAccelerator.copy_async
        monkeypatch.setattr(EmulatedAccelerator, "copy_async",
                            lambda self, dst, src, after: copy_async(self, dst, src, None))
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        want = model(PROMPT).logits
    model = dali_compile.offload(model, device="emulated-async", expert_memory=moe_geometry(model)[0],
                                 policy="on_demand", cost_model=COST)
    try:
        with torch.no_grad():
            errors = [relative_max_error(model(PROMPT).logits, want) for _ in range(2)]
    finally:
        dali_compile.release(model)
    if broken is None:
        assert max(errors) <= FP32_RTOL, errors
    else:
        assert any(not error <= 1e-3 for error in errors), errors  # NaN (a slot never written) counts as wrong
