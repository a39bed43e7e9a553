"""The layer registry's lifetimes and per-call redirects.

Lifetimes: a compiled or offloaded model's experts are freed with the model (an evaluation harness that
compiles checkpoints one after another must not keep them all), and a handle whose model was freed says so.
Redirects: one compiled graph serving two model instances runs each call with its own instance's experts,
also from two threads at once.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from helpers import FP32_RTOL, relative_max_error

import dali_compile
from dali_compile.backend import dali_backend
from dali_compile.experts_interface import spec_of_module
from dali_compile.runtime.layer_spec import Activation, ExpertLayout, LayerSpec
from dali_compile.runtime.planner import CostModel
from dali_compile.runtime.registry import LayerRegistry, UnknownLayerError, layer_registry
from dali_compile.tiny_models import tiny_model

COST = CostModel(workloads=(1, 8), cpu_seconds=(1.0, 4.0), gpu_seconds=(0.1, 0.2), transfer_seconds=0.5)
PROMPT = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
SILU = ExpertLayout(Activation("silu"))


def _spec(E=4, H=8, I=6) -> LayerSpec:
    return LayerSpec(SILU, torch.randn(E, 2 * I, H), torch.randn(E, H, I))


def _experts(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "is_transposed")]


def _counting_backend(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return dali_backend(gm, example_inputs, {"inductor": False})

    return backend


# -- the registry on its own ---------------------------------------------------------------------------


def test_weak_handles_die_with_their_tensors_and_strong_ones_wait_for_release():
    registry = LayerRegistry()
    weak_spec, strong_spec = _spec(), _spec()
    weak = registry.register(weak_spec, weak=True)
    strong = registry.register(strong_spec)
    up = weakref.ref(strong_spec.up_weight)
    assert registry.get(weak).up_weight is weak_spec.up_weight
    del weak_spec, strong_spec
    gc.collect()
    assert weak not in registry and len(registry) == 1
    with pytest.raises(UnknownLayerError, match=f"the model owning layer {weak} was freed"):
        registry.get(weak)
    assert up() is not None  # an explicit lifetime: held until release
    registry.release(strong)
    gc.collect()
    assert up() is None and strong not in registry


def test_a_strong_registration_of_weakly_held_tensors_holds_them():
    registry = LayerRegistry()
    spec = _spec()
    handle = registry.register(spec, weak=True)
    assert registry.register(spec) == handle
    up = weakref.ref(spec.up_weight)
    del spec
    gc.collect()
    assert up() is not None and handle in registry


def test_attach_holds_the_runtime_weakly():
    class Layer:
        pass

    registry = LayerRegistry()
    spec = _spec()
    handle = registry.register(spec)  # strongly, as HybridRuntime does
    layer = Layer()
    registry.attach(handle, layer)
    assert registry.attached(handle) is layer
    tensors = weakref.ref(spec.up_weight)
    del layer, spec
    gc.collect()
    assert handle not in registry and tensors() is None  # the runtime's registration went with it


def test_redirects_are_per_thread():
    registry = LayerRegistry()
    a, b = _spec(), _spec()
    ha, hb = registry.register(a), registry.register(b)
    seen = {}

    def other_thread():
        seen["other"] = registry.get(ha).up_weight

    with registry.redirect({ha: hb}):
        assert registry.get(ha).up_weight is b.up_weight
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen["other"] is a.up_weight and registry.get(ha).up_weight is a.up_weight


# -- compiled and offloaded models ---------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["grouped_mm", "dali"])  # the rewrite pass; the experts interface
def test_a_deleted_compiled_model_frees_its_experts(implementation):
    model = tiny_model("mixtral", experts_implementation=implementation)
    compiled = torch.compile(model, backend="dali", options={"inductor": False})
    with torch.no_grad():
        compiled(PROMPT)
    expert = weakref.ref(_experts(model)[0].down_proj)
    handles = {r.layer for r in dali_compile.last_report().rewritten} if implementation == "grouped_mm" else {
        layer_registry().lookup(dali_compile.experts_interface.spec_of_module(m)) for m in _experts(model)}
    assert handles and all(h in layer_registry() for h in handles)
    del model, compiled
    gc.collect()
    assert expert() is None
    assert not any(h in layer_registry() for h in handles)
    with pytest.raises(UnknownLayerError, match="was freed"):
        torch.ops.dali.moe_hybrid(torch.randn(2, 32), torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2),
                                  min(handles))


def test_an_offloaded_model_deleted_without_release_frees_its_experts_and_runtime():
    model = dali_compile.offload(tiny_model("mixtral"), device="emulated", expert_memory="1MiB", cost_model=COST)
    compiled = torch.compile(model, backend="dali", options={"inductor": False})
    with torch.no_grad():
        compiled(PROMPT)
    runtime = weakref.ref(model._dali_runtime)
    handles = list(model._dali_runtime.handles)
    expert = weakref.ref(_experts(model)[0].down_proj)
    del model, compiled
    gc.collect()
    assert expert() is None and runtime() is None
    assert not any(h in layer_registry() for h in handles)


# -- two instances behind one compiled graph -----------------------------------------------------------


# How the two instances reach dali::moe_hybrid. "plain": the rewrite pass. "offloaded": offloaded, and the
# rewrite pass (experts switched back to grouped_mm): one graph whose handle is attached to the first
# instance's runtime. "offloaded_interface": offload's own "dali" experts interface, where dynamo guards on
# the experts module's identity and compiles a graph per instance; both must be right either way.
MODES = ["plain", "offloaded", "offloaded_interface"]


def _two_instances(mode: str):
    models = [tiny_model("mixtral", seed=seed) for seed in (0, 1)]
    with torch.no_grad():
        wants = [m(PROMPT).logits for m in models]
    if mode != "plain":
        for m in models:
            dali_compile.offload(m, device="emulated", expert_memory="1MiB", policy="lru", cost_model=COST)
            if mode == "offloaded":
                m.set_experts_implementation("grouped_mm")
    return models, wants


@pytest.fixture
def two_instances():
    made = []

    def make(mode: str):
        made.append(_two_instances(mode))
        return made[-1]

    yield make
    for models, _ in made:
        for m in models:
            if getattr(m, "_dali_runtime", None) is not None:
                dali_compile.release(m)


@pytest.mark.parametrize("mode", MODES)
def test_one_graph_two_instances_alternately(two_instances, mode):
    """Each call runs its own instance's experts; an offloaded one's runtime serves only its own calls."""
    (a, b), wants = two_instances(mode)
    graphs = []
    run = torch.compile(lambda m, x: m(x).logits, backend=_counting_backend(graphs))
    with torch.no_grad():
        for _ in range(2):
            for model, want in ((a, wants[0]), (b, wants[1])):
                assert relative_max_error(run(model, PROMPT), want) <= FP32_RTOL
    assert len(graphs) == (2 if mode == "offloaded_interface" else 1)  # the story: one graph serving both
    if mode != "plain":
        steps = [dali_compile.offload_stats(m)["total"]["steps"] for m in (a, b)]
        assert steps == [4, 4]  # 2 calls x 2 MoE layers each, on each instance's own runtime


@pytest.mark.parametrize("mode", MODES)
def test_one_graph_two_instances_from_two_threads(two_instances, mode):
    """Each model is called from its own thread, 25 times, through one compiled graph."""
    (a, b), wants = two_instances(mode)
    graphs = []
    run = torch.compile(lambda m, x: m(x).logits, backend=_counting_backend(graphs))
    with torch.no_grad():
        run(a, PROMPT), run(b, PROMPT)  # compile first: the story is the calls, not concurrent compiles
    assert len(graphs) == (2 if mode == "offloaded_interface" else 1)
    errors: list = []
    start = threading.Barrier(2)

    def serve(model, want):
        start.wait()
        with torch.no_grad():
            for _ in range(25):
                got = run(model, PROMPT)
                if relative_max_error(got, want) > FP32_RTOL:
                    errors.append(relative_max_error(got, want))

    threads = [threading.Thread(target=serve, args=args) for args in ((a, wants[0]), (b, wants[1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_call_is_checked_again_once_its_handle_changes():
    """The compiled graph's wrapper trusts the previous call's check of the same tensor objects while the registry's
    generation stands. Rebinding the graph's handles to another instance's experts moves it: the next call of the
    first instance resolves its own tensors again (trusting the old answer would run the other instance's experts)."""
    a, b = (tiny_model("mixtral", seed=seed) for seed in (0, 1))
    with torch.no_grad():
        want, other = a(PROMPT).logits, b(PROMPT).logits
    assert relative_max_error(other, want) > 1e-2
    registry = layer_registry()
    run = torch.compile(lambda m, x: m(x).logits, backend="dali")
    with torch.no_grad():
        for _ in range(3):  # the first call checks and records, the next ones take the recorded answer
            assert relative_max_error(run(a, PROMPT), want) <= FP32_RTOL
        for mine, theirs in zip(_experts(a), _experts(b), strict=True):
            handle = registry.lookup(spec_of_module(mine))
            assert handle is not None
            registry.rebind(handle, spec_of_module(theirs))
        assert relative_max_error(run(a, PROMPT), want) <= FP32_RTOL
        assert relative_max_error(run(b, PROMPT), other) <= FP32_RTOL
