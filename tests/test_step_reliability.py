"""The hybrid runtime under failures, interrupts, threads and long runs: never a wrong answer.

Faults are injected once, at MoE layer 2 of a 4-layer model offloaded to the emulated accelerator with
prefetching on and a cost model that favours the device (so steps copy, prefetch and split experts): in
the policy, in a copy (before it is issued, and right after: an interrupt between issuing a copy and
updating the tables), in the GPU compute and in the wait for the CPU experts. After the failed forward
the next ones must equal eager, no CPU job may be left queued, and every cache slot must hold exactly
the expert its table names (`HybridRuntime.check_slots` compares the weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import weakref

import pytest
import torch
from helpers import FP32_RTOL, relative_max_error
from test_offload import COST, moe_geometry
from torch.utils._python_dispatch import TorchDispatchMode

import dali_compile
from dali_compile.offload import runtime_of
from dali_compile.ops import cpu_experts as cpu_experts_ops
from dali_compile.runtime import cpu_extension, hybrid
from dali_compile.runtime.hybrid import step_chunk_tokens
from dali_compile.tiny_models import tiny_model

PROMPT = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))
FAULT_LAYER = 2


class InjectedFault(RuntimeError):
    pass


def outstanding_cpu_jobs() -> int:
    """Jobs submitted and never waited on, in the C++ runtime or in the reference path."""
    if cpu_extension.cpu_extension_available():
        return cpu_extension.outstanding_jobs()
    return len(cpu_experts_ops._reference_jobs._results)


def offloaded_model(policy: str = "dali", layers: int = 4, cached_fraction: float = 0.25, prefetch: int = 1):
    model = tiny_model("mixtral", num_hidden_layers=layers)
    with torch.no_grad():
        want = model(PROMPT).logits
    slot, num_layers, experts, top_k = moe_geometry(model)
    budget = slot * (top_k + int(cached_fraction * num_layers * experts) + 2 * prefetch)
    dali_compile.offload(model, device="emulated", expert_memory=budget, policy=policy, cost_model=COST,
                         prefetch=prefetch)  # prefetching on under every policy
    return model, want


@pytest.fixture
def release_after():
    models = []
    yield models.append
    for model in models:
        if getattr(model, "_dali_runtime", None) is not None:
            dali_compile.release(model)


class Fault:
    """Arms while MoE layer `layer`'s step runs and raises `error` the first time the patched site is reached."""

    def __init__(self, runtime, layer: int, error: BaseException):
        self.error, self.armed, self.fired = error, False, False
        target = runtime.layers[layer]
        original = target._step

        def step(*args):
            self.armed = True
            try:
                return original(*args)
            finally:
                self.armed = False

        target._step = step

    def maybe_raise(self) -> None:
        if self.armed and not self.fired:
            self.fired = True
            raise self.error

    def before(self, fn):
        def wrapped(*args, **kwargs):
            self.maybe_raise()
            return fn(*args, **kwargs)
        return wrapped

    def after(self, fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            self.maybe_raise()
            return result
        return wrapped


def inject(site: str, runtime, monkeypatch, error: BaseException) -> Fault:
    fault = Fault(runtime, FAULT_LAYER, error)
    acc = runtime.accelerator
    if site == "policy":
        monkeypatch.setattr(runtime.policy, "decide", fault.before(runtime.policy.decide))
    elif site == "copy":
        monkeypatch.setattr(acc, "copy_async", fault.before(acc.copy_async))
    elif site == "copy_issued":  # the copy is on its way, the tables not yet updated
        monkeypatch.setattr(acc, "copy_async", fault.after(acc.copy_async))
    elif site == "gpu_compute":
        monkeypatch.setattr(hybrid, "gpu_experts", fault.before(hybrid.gpu_experts))
    elif site == "cpu_compute":  # the GPU work is issued and the CPU experts fail
        monkeypatch.setattr(hybrid, "cpu_experts", fault.before(hybrid.cpu_experts))
    else:
        raise ValueError(site)
    return fault


def caused_by(raised: BaseException, error: BaseException) -> bool:
    """On the asynchronous emulator (as on CUDA) a failed launch surfaces later, as the cause of another error."""
    while raised is not None:
        if raised is error:
            return True
        raised = raised.__cause__ or raised.__context__
    return False


SITES = [("policy", "dali"), ("copy", "dali"), ("copy_issued", "dali"), ("gpu_compute", "dali"),
         ("cpu_compute", "cache_cpu_miss")]


@pytest.mark.usefixtures("emulated_mode")  # both modes of the emulated accelerator
@pytest.mark.parametrize("error", [InjectedFault("injected"), KeyboardInterrupt()], ids=["exception", "interrupt"])
@pytest.mark.parametrize(("site", "policy"), SITES, ids=[s for s, _ in SITES])
def test_a_failed_step_leaves_the_runtime_consistent(site, policy, error, monkeypatch, release_after):
    model, want = offloaded_model(policy)
    release_after(model)
    runtime = runtime_of(model)
    fault = inject(site, runtime, monkeypatch, error)
    with torch.no_grad(), pytest.raises(BaseException) as raised:
        model(PROMPT)
    assert caused_by(raised.value, error), raised.value  # as itself, or as the cause of a stream's error
    assert fault.fired, f"the fault at {site} was never reached at layer {FAULT_LAYER}"
    assert outstanding_cpu_jobs() == 0
    runtime.check_slots()
    with torch.no_grad():
        for _ in range(3):  # the forward right after, and later ones whose prefetches build on it
            got = model(PROMPT).logits
            assert relative_max_error(got, want) <= FP32_RTOL
    runtime.check_slots()
    assert outstanding_cpu_jobs() == 0
    assert runtime.stats()["total"]["prefetches"] > 0  # prefetching was on


@pytest.mark.usefixtures("emulated_mode")  # both modes of the emulated accelerator
def test_a_prefetch_whose_step_failed_is_never_used(monkeypatch, release_after):
    """The reported case: layer 2 prefetches for layer 3, then raises; the next forward's earlier layers
    overwrite that prefetch set; layer 3 must not compute from it."""
    model, want = offloaded_model("dali")
    release_after(model)
    runtime = runtime_of(model)
    inject("policy", runtime, monkeypatch, InjectedFault("after the prefetch"))
    with torch.no_grad(), pytest.raises(InjectedFault):
        model(PROMPT)
    with torch.no_grad():
        got = model(PROMPT).logits
    assert relative_max_error(got, want) <= FP32_RTOL
    assert runtime.stats()["total"]["prefetches"] > 0  # the scenario really prefetched


def test_a_compute_from_a_slot_that_does_not_hold_its_expert_raises(release_after):
    """The last line of defence: a table naming a slot whose contents differ is an error, not a result."""
    model, _ = offloaded_model("dali", cached_fraction=0.5)
    release_after(model)
    runtime = runtime_of(model)
    layer = runtime.layers[1]
    expert, slot = next(iter(layer.cache.expert_in_slot.items()))[::-1]
    runtime.pool.contents[slot] = (0, expert)  # as if another layer's copy had landed there
    with torch.no_grad(), pytest.raises(RuntimeError, match="internal error"):
        hidden = torch.randn(4, model.config.hidden_size)
        layer.forward(hidden, torch.full((4, 2), expert), torch.full((4, 2), 0.5))


@pytest.mark.usefixtures("emulated_mode")  # both modes of the emulated accelerator
@pytest.mark.parametrize("chunk", [1, 5])
def test_chunked_steps_equal_eager(chunk, release_after):
    model, want = offloaded_model("dali")
    release_after(model)
    runtime = runtime_of(model)
    runtime.max_step_tokens = chunk
    with torch.no_grad():
        got = model(PROMPT).logits
    assert relative_max_error(got, want) <= FP32_RTOL
    runtime.check_slots()


def test_the_transient_memory_option_sets_the_chunk(release_after):
    model = tiny_model("mixtral", num_hidden_layers=2)
    with torch.no_grad():
        want = model(PROMPT).logits
    slot, num_layers, experts, top_k = moe_geometry(model)
    H = model.config.hidden_size
    for bad in (0, "0MiB", -1, "lots"):
        with pytest.raises(ValueError, match="transient_memory|expected a size|>= 0"):
            dali_compile.offload(model, device="emulated", expert_memory=slot * (top_k + 4), cost_model=COST,
                                 transient_memory=bad)
    dali_compile.offload(model, device="emulated", expert_memory=slot * (top_k + 4), cost_model=COST,
                         transient_memory=3 * 4 * top_k * H * 2)  # two tokens per chunk
    release_after(model)
    assert runtime_of(model).max_step_tokens == 2
    assert dali_compile.offload_stats(model)["max_step_tokens"] == 2
    with torch.no_grad():
        assert relative_max_error(model(PROMPT).logits, want) <= FP32_RTOL


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while the mode is on and that are still alive (views and
    in-place results of existing tensors, like slices of the slot pool, are not allocations; an op's own
    scratch inside a kernel is not seen; the buffers the runtime holds between kernels are)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.seen and key not in inputs and storage.nbytes():
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key, storage.nbytes())
        return out

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes


def step_peak_bytes(layer, tokens: int) -> int:
    H, K = layer.spec.hidden_size, layer.runtime.top_k
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, H, generator=generator)
    ids = torch.stack([torch.randperm(layer.spec.num_experts, generator=generator)[:K] for _ in range(tokens)])
    weights = torch.rand(tokens, K, generator=generator)
    with torch.no_grad(), LiveBytes() as meter:
        out = layer.forward(hidden, ids, weights)
    del out
    return meter.peak


def test_transient_memory_of_a_step_is_bounded_by_the_chunk(monkeypatch, release_after):
    """Bound (module docstring of runtime/hybrid.py): three fp32 [chunk, K, H] buffers on the device, one on
    the host (the emulated device is the host here, so four), plus the [T, H] output; at T far beyond the
    chunk the peak stays there, and without chunking it grows with T (so the meter can see it)."""
    monkeypatch.setenv("DALI_EMULATED_MODE", "sync")  # the meter sees the calling thread's ops only
    model, _ = offloaded_model("dali", layers=2)
    release_after(model)
    runtime = runtime_of(model)
    layer = runtime.layers[0]
    H, K = layer.spec.hidden_size, runtime.top_k
    chunk = step_chunk_tokens(64 * 1024, K, H)
    runtime.max_step_tokens = chunk

    def bound(tokens: int) -> int:
        return 4 * (4 * chunk * K * H) + tokens * H * 4 + 4096

    for tokens in (chunk, 4 * chunk, 16 * chunk):
        peak = step_peak_bytes(layer, tokens)
        assert peak <= bound(tokens), f"T={tokens}: {peak} bytes > {bound(tokens)}"
    runtime.max_step_tokens = 1 << 30
    assert step_peak_bytes(layer, 16 * chunk) > bound(16 * chunk)


@pytest.mark.usefixtures("emulated_mode")  # both modes of the emulated accelerator
def test_two_threads_generating_on_one_offloaded_model(release_after):
    model = tiny_model("mixtral", num_hidden_layers=4)
    prompts = [PROMPT[:1], PROMPT[1:]]
    with torch.no_grad():
        wants = [model.generate(p, max_new_tokens=4, do_sample=False) for p in prompts]
    slot, num_layers, experts, top_k = moe_geometry(model)
    dali_compile.offload(model, device="emulated", expert_memory=slot * (top_k + num_layers * experts // 4 + 2),
                         policy="dali", cost_model=COST, prefetch=1)
    release_after(model)
    failures: list[str] = []

    def generate(index: int) -> None:
        try:
            for _ in range(6):
                with torch.no_grad():
                    got = model.generate(prompts[index], max_new_tokens=4, do_sample=False)
                if not torch.equal(got, wants[index]):
                    failures.append(f"thread {index}: {got.tolist()} != {wants[index].tolist()}")
        except Exception as error:  # noqa: BLE001  (reported below)
            failures.append(f"thread {index}: {error!r}")

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a generating thread hung"
    assert not failures, failures
    runtime_of(model).check_slots()


SIGINT_SCRIPT = textwrap.dedent("""
    import json, os, signal, threading, time
    # A process started in the background by a shell without job control inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: nothing would be interrupted (seen in a CI check).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch
    import dali_compile
    from dali_compile.offload import runtime_of
    from dali_compile.runtime.planner import CostModel
    from dali_compile.tiny_models import tiny_model

    COST = CostModel(workloads=(1, 8), cpu_seconds=(1.0, 4.0), gpu_seconds=(0.1, 0.2), transfer_seconds=0.5)
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(5))
    model = tiny_model("mixtral", num_hidden_layers=4)
    with torch.no_grad():
        want_tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
        want_logits = model(prompt).logits
    dali_compile.offload(model, device="emulated", expert_memory=int(os.environ["BUDGET"]), cost_model=COST,
                         prefetch=1)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=8, do_sample=False)
        seconds = time.perf_counter() - start
    interrupted = 0
    for i in range(12):
        delay = seconds * (i + 0.5) / 12
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=8, do_sample=False)
            timer.join()
        except KeyboardInterrupt:
            interrupted += 1
            timer.cancel()
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
        logits = model(prompt).logits
    runtime_of(model).check_slots()
    error = ((logits - want_logits).abs().max() / want_logits.abs().max()).item()
    print(json.dumps({"interrupted": interrupted, "tokens_equal": torch.equal(tokens, want_tokens),
                      "logits_error": error}))
""")


def test_sigint_during_generate_then_generate_equals_eager():
    model = tiny_model("mixtral", num_hidden_layers=4)
    slot, num_layers, experts, top_k = moe_geometry(model)
    env = dict(os.environ, BUDGET=str(slot * (top_k + num_layers * experts // 4 + 2)))
    done = subprocess.run([sys.executable, "-c", SIGINT_SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["interrupted"] >= 3, result  # the interrupts landed inside generate()
    assert result["tokens_equal"], result
    assert result["logits_error"] <= FP32_RTOL, result


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_ten_thousand_decode_steps_keep_rss_flat(release_after):
    """10,000 one-token MoE layer steps with copies, evictions and CPU jobs on every step: resident memory
    after a 1,000-step warm-up grows by less than 8 MiB (the slack covers allocator and interpreter noise;
    a leak of one [K, H] fp32 buffer per step would be 2.5 MiB here, of one expert slot 60 MiB)."""
    model, _ = offloaded_model("lru", layers=2, cached_fraction=0.25, prefetch=0)
    release_after(model)
    runtime = runtime_of(model)
    H, K, E = model.config.hidden_size, runtime.top_k, runtime.num_experts
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, H, generator=generator)
    routes = [torch.randperm(E, generator=generator)[:K][None] for _ in range(64)]
    weights = torch.full((1, K), 1.0 / K)
    handles = runtime.handles
    with torch.no_grad():
        for step in range(11_000):
            if step == 1_000:
                before = rss_bytes()
            torch.ops.dali.moe_hybrid(hidden, routes[step % 64], weights, handles[step % len(handles)])
    growth = rss_bytes() - before
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 10,000 steps"
    assert outstanding_cpu_jobs() == 0
    assert runtime.stats()["total"]["copies"] > 1_000  # the steps really copied and evicted


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_transient_memory_of_a_step_is_bounded_by_the_chunk():
    """On a GPU: the device memory a step allocates beyond what it returns stays within three fp32
    [chunk, K, H] buffers (plus the caching allocator's rounding), at T far beyond the chunk."""
    model = tiny_model("mixtral", num_hidden_layers=2)
    slot, num_layers, experts, top_k = moe_geometry(model)
    dali_compile.offload(model, device="cuda", expert_memory=slot * (top_k + num_layers * experts // 4),
                         policy="dali", cost_model=COST, prefetch=0)
    try:
        runtime = runtime_of(model)
        layer = runtime.layers[0]
        H, K = layer.spec.hidden_size, runtime.top_k
        runtime.max_step_tokens = chunk = step_chunk_tokens(1 << 20, K, H)
        for tokens in (chunk, 8 * chunk):
            hidden = torch.randn(tokens, H, device="cuda")
            ids = torch.stack([torch.randperm(experts)[:K] for _ in range(tokens)]).cuda()
            weights = torch.rand(tokens, K, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with torch.no_grad():
                out = layer.forward(hidden, ids, weights)
            torch.cuda.synchronize()
            transient = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
            assert transient <= 3 * 4 * chunk * K * H + (2 << 20), f"T={tokens}: {transient} bytes"
    finally:
        dali_compile.release(model)
