"""The hybrid runtime: each offloaded MoE layer's step, split between the CPU and the GPU.

# T tokens, K top-k, E experts, H hidden

Per layer and step (`HybridLayer.forward`, called by `dali::moe_hybrid` for an offloaded layer):

1. count each expert's tokens (the routing comes to the host: planning needs it);
2. ask the policy for a decision and check it (`policies.check_decision`);
3. issue the GPU work, which runs on its own: on the copy stream, copy admitted and staged experts into
   their slots, each after the compute that last read the slot; on the compute stream the
   already-resident GPU experts (Triton on CUDA), then the copied ones (in waves when there are more than
   staging slots);
4. run the CPU experts in the C++ runtime on the step's own thread and ATen's team (GIL released), while
   the GPU works: no hand-off to another thread and back;
5. combine: the CPU's and GPU's [T, K, H] fp32 contributions are disjoint (exact zeros elsewhere), so
   their sum, then the sum over k in order, is the same number whatever the split: results never depend
   on the policy or the budget beyond rounding;
6. start the background copies the policy asked for (after this step's GPU work).

Steps 3-5 run over the tokens in chunks of at most `max_step_tokens` (one decision for the whole step),
so the transient memory of a step is bounded whatever T is: on the device at most three fp32
[chunk, K, H] buffers (the GPU contributions, the group being added, the CPU part), on the host one
(the CPU experts' output), besides the step's [T, H] output. The price of a chunk beyond the first is that
the experts staged for this step are copied again; cached and prefetched ones are not.

Reliability (`HybridRuntime.step`): one step at a time per runtime (a lock: threads sharing one
offloaded model take turns layer step by layer step), and a step either completes or leaves the runtime
consistent: whatever raised or interrupted it (a bad id, the policy, a copy, a kernel, Ctrl-C), the
accelerator is synchronized and every cache's tables rebuilt from what its slots really hold
(`SlotPool.contents`); every GPU compute checks that its slots hold the experts its table names, so a
bookkeeping error is an exception, never a wrong answer.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import torch

from dali_compile.ops.cpu_experts import cpu_experts
from dali_compile.ops.gpu_experts import gpu_experts

from .accelerator import Accelerator, Event, ExpertMemoryError
from .expert_cache import LayerCache, SlotPool, expert_bytes, plan_slots
from .fused_router import NativePrefetchChoice
from .layer_spec import LayerSpec
from .planner import CostModel, copy_never_pays_off
from .policies import LayerStep, Policy, any_set, check_decision
from .prefetch import ResidualPredictor, prefetch_choice
from .profiling import profiled_costs
from .registry import LayerRegistry, layer_registry
from .stats import LayerStats, format_table, total
from .step_routing import StepRouting

# Transient memory per layer step (see the module docstring); 256 MiB is about 1,400 tokens of
# Qwen3-30B-A3B (K 8, H 2048) per chunk, so decode and short prompts are never chunked.
DEFAULT_TRANSIENT_BYTES = 256 * 2**20


def step_chunk_tokens(transient_bytes: int, top_k: int, hidden_size: int) -> int:
    """Tokens per chunk so that the step's three fp32 [chunk, K, H] device buffers fit `transient_bytes`."""
    return max(1, int(transient_bytes) // (3 * 4 * top_k * hidden_size))


class HybridRuntime:
    """The offloaded MoE layers of one model: their caches, the shared staging slots, the prefetch slots,
    the policy and the predictor.

    Pool layout: [cache slots of layer 0, 1, ... | staging slots | prefetch set 0 | prefetch set 1]. Layer
    l + 1's prefetched experts go into set (l + 1) % 2, so a prefetch never overwrites the slots the layer
    running now reads."""

    def __init__(self, accelerator: Accelerator, layers: list[tuple[str, LayerSpec]], policy: Policy,
                 cost: CostModel | None, top_k: int, registry: LayerRegistry | None = None,
                 predictor: ResidualPredictor | None = None, prefetch: int = 0,
                 transient_bytes: int = DEFAULT_TRANSIENT_BYTES):
        # P slots per prefetch set, filled from `predictor` (prefetch_from) or by a caller with its own
        # prediction (prefetch_experts: the distributed workers)
        self.prefetch = prefetch
        self.slot_plan = plan_slots(policy, layers, accelerator.pool.budget_bytes, top_k, 2 * self.prefetch)
        template = layers[0][1]
        self.accelerator = accelerator
        self.policy = policy
        self.cost = cost
        self.registry = registry or layer_registry()
        self.num_experts = template.num_experts
        self.top_k = top_k
        self.slot_bytes = expert_bytes(template)
        self.max_step_tokens = step_chunk_tokens(transient_bytes, top_k, template.hidden_size)
        total = self.slot_plan.total + 2 * self.prefetch
        self.pool = SlotPool(accelerator, template, total) if total else None
        first_staging = sum(self.slot_plan.cache_slots)
        self.staging_slots = list(range(first_staging, first_staging + self.slot_plan.staging_slots))
        first_prefetch = self.slot_plan.total
        self.prefetch_sets = [list(range(first_prefetch + k * self.prefetch, first_prefetch + (k + 1) * self.prefetch))
                              for k in range(2)]
        self.predictor = predictor
        self.prefetching = self.prefetch > 0 and predictor is not None
        self._prefetch_choice = NativePrefetchChoice(self.num_experts, self.prefetch)
        # Optional observer of every step: recorder(layer_index, gate_input [T, H], topk_ids, topk_weights).
        self.recorder = None
        self.last_compute: Event | None = None  # the latest GPU compute point: copies into slots wait for it
        # One step (a layer's forward, or a prefetch from the graph's hook) at a time; reentrant because a
        # layer's step issues its successor's prefetch itself when the graph has no hook.
        self._lock = threading.RLock()
        self._unfinished = False  # a step began and has not completed (nor been recovered from)
        self.layers: list[HybridLayer] = []
        start = 0
        for index, ((name, spec), count) in enumerate(zip(layers, self.slot_plan.cache_slots, strict=True)):
            cache = LayerCache(self.pool, list(range(start, start + count)), self.num_experts, owner=index)
            start += count
            for expert in policy.initial_cache(index, self.num_experts, count):
                cache.install(expert, -1, spec, None)
            self.layers.append(HybridLayer(self, index, name, spec, cache))
        accelerator.synchronize()
        self.handles = [self.registry.register(layer.spec) for layer in self.layers]
        for handle, layer in zip(self.handles, self.layers, strict=True):
            self.registry.attach(handle, layer)

    @contextlib.contextmanager
    def step(self):
        """Hold the runtime for one step; repair what an earlier step left half-done, and if this one raises
        (or is interrupted), repair before the exception propagates. The repair itself may be interrupted:
        then the flag stays set and the next step repairs again."""
        with self._lock:
            if self._unfinished:
                self.recover()
            self._unfinished = True
            try:
                yield
            except BaseException:
                self.recover()
                raise
            self._unfinished = False

    def recover(self) -> None:
        """Bring the runtime back to a consistent state after a step that did not complete: no copy in flight,
        each cache's tables equal to what its slots hold, no prefetch pending."""
        with contextlib.suppress(Exception):  # a failed copy shows up here again; settle() handles its slot
            self.accelerator.synchronize()
        if self.pool is not None:
            self.pool.settle()
        for layer in self.layers:
            layer.cache.resync()
            layer.prefetched = {}
            layer.prefetched_at = -1
        self.last_compute = None
        self._unfinished = False

    def check_slots(self, weights: bool = True) -> None:
        """Raise RuntimeError unless every cache's tables agree with the pool's record of its slots and, with
        `weights`, every cached slot holds exactly the host weights of its expert (synchronizes; a test and
        debugging aid)."""
        with self._lock:
            self.accelerator.synchronize()
            for layer in self.layers:
                cache = layer.cache
                for slot in cache.slots:
                    expert = cache.expert_in_slot.get(slot)
                    held = self.pool.contents[slot]
                    if expert is None:
                        if held is not None and held[0] == layer.index:
                            raise RuntimeError(f"layer {layer.name}: slot {slot} holds expert {held[1]}, the table "
                                               "says it is free")
                        continue
                    if int(cache.slot_of_expert[expert]) != slot or held != (layer.index, expert):
                        raise RuntimeError(f"layer {layer.name}: the table puts expert {expert} in slot {slot}, the "
                                           f"pool says the slot holds {held}")
                    if weights:
                        for dst, src in zip(self.pool.tensors, layer.spec.tensors(), strict=True):
                            if dst is not None and not torch.equal(self.accelerator.to_host(dst[slot]),
                                                                   src[expert].detach()):
                                raise RuntimeError(f"layer {layer.name}: slot {slot} does not hold expert {expert}'s "
                                                   "weights")

    def prefetch_from(self, index: int, gate_input: torch.Tensor) -> None:
        """Prefetch for layer `index` + 1 from layer `index`'s gate input, once per step of layer `index`: the
        graph hook (`dali::prefetch_next`) calls this early, the layer's own step calls it again as a
        fallback (eager mode, or a graph without the hook), and the second call does nothing."""
        if not self.prefetching or index + 1 >= len(self.layers):
            return
        host_start, emulation_start = time.thread_time(), self.accelerator.emulation_thread_s
        with self.step():
            self._prefetch_once(index, gate_input)
        # host work of the layer whose gate input this is (the layer's own step counts its fallback call)
        self.layers[index].stats.host_s += (time.thread_time() - host_start
                                            - (self.accelerator.emulation_thread_s - emulation_start))

    def _prefetch_once(self, index: int, gate_input: torch.Tensor) -> None:
        if not self.prefetching or index + 1 >= len(self.layers):
            return
        source, target = self.layers[index], self.layers[index + 1]
        if target.prefetched_at == source.steps:
            return
        self.prefetch_for(index + 1, gate_input)
        target.prefetched_at = source.steps  # only once the copies are issued: a failed prefetch is retried

    def prefetch_for(self, index: int, gate_input: torch.Tensor) -> None:
        """Predict layer `index`'s workload from the previous layer's gate input and prefetch for it."""
        started = time.perf_counter()
        layer = self.layers[index]
        tokens = gate_input.numel() // max(gate_input.shape[-1], 1)
        if self.cost is not None and copy_never_pays_off(self.cost, tokens, self.top_k, self.num_experts):
            layer.prefetched = {}  # the choice would be empty: skip the router and the choice (~20 us a step)
            return
        chosen = self.predictor.fused_choice(index - 1, gate_input, layer.cache.slot_of_expert, self.cost,
                                             self.prefetch)  # the router and the choice in one C call
        if chosen is None:  # a router the C path does not compute: the module, then the choice in C
            ids, weights = self.predictor.predicted_routing(index - 1, gate_input)
            chosen = self._prefetch_choice.choose(ids, weights, layer.cache.slot_of_expert, self.cost)
            if chosen is None:  # the Python path (no extension, or inputs the C choice does not take)
                counts, mass = self.predictor.counts_of(ids, weights)
                chosen = prefetch_choice(counts, mass, layer.cache.slot_of_expert >= 0, self.cost, self.prefetch)
        layer.stats.plan_s += time.perf_counter() - started
        self._issue_prefetch(index, chosen)

    def prefetch_experts(self, index: int, counts: np.ndarray, mass: np.ndarray) -> None:
        """Start copying, for layer `index`'s next step, the top-P experts of a prediction (tokens per expert [E],
        routing weight per expert [E]) that the planner would put on the GPU and that are not cached (those
        with the most predicted tokens)."""
        started = time.perf_counter()
        layer = self.layers[index]
        chosen = prefetch_choice(counts, mass, layer.cache.slot_of_expert >= 0, self.cost, self.prefetch)
        layer.stats.plan_s += time.perf_counter() - started
        self._issue_prefetch(index, chosen)

    def _issue_prefetch(self, index: int, chosen: np.ndarray) -> None:
        """Copy `chosen` into layer `index`'s prefetch set, for its next step only."""
        started = time.perf_counter()
        layer = self.layers[index]
        layer.prefetched = {}
        for expert, slot in zip(chosen.tolist(), self.prefetch_sets[index % 2], strict=False):
            self.pool.load(slot, layer.spec, expert, self.last_compute, owner=index)
            layer.prefetched[expert] = slot
        layer.stats.prefetches += len(layer.prefetched)
        layer.stats.copies += len(layer.prefetched)
        layer.stats.bytes_copied += len(layer.prefetched) * self.slot_bytes
        layer.stats.plan_s += time.perf_counter() - started

    def profile_costs(self, refresh: bool = False) -> CostModel:
        """Measure (or read back the stored) cost model for this machine and expert shape; `refresh=True`
        measures again. The pool's last slot is the scratch space; whatever it cached is loaded back."""
        if self.pool is None:
            raise ValueError(f"policy {self.policy.name!r} needs a cost model, and profiling needs one expert slot")
        with self.step():
            slot = self.pool.num_slots - 1
            self.accelerator.synchronize()  # no copy may still be writing the scratch slot
            try:
                self.cost = profiled_costs(self.accelerator, self.layers[0].spec, self.pool, slot, refresh=refresh)
            finally:
                self._restore_slot(slot)
        return self.cost

    def _restore_slot(self, slot: int) -> None:
        for layer in self.layers:
            expert = layer.cache.expert_in_slot.get(slot)
            if expert is not None:
                self.pool.load(slot, layer.spec, expert, None, owner=layer.index)
        self.accelerator.synchronize()

    def stats(self) -> dict:
        """Per-layer and total counters (see `stats.LayerStats`), and the memory picture."""
        layer_stats = [layer.stats for layer in self.layers]
        return {
            "policy": self.policy.name,
            "accelerator": self.accelerator.name,
            "budget_bytes": self.accelerator.pool.budget_bytes,
            "expert_bytes_used": self.accelerator.pool.used_bytes,
            "slot_bytes": self.slot_bytes,
            "cache_slots": list(self.slot_plan.cache_slots),
            "staging_slots": self.slot_plan.staging_slots,
            "max_step_tokens": self.max_step_tokens,
            "layers": {layer.name: s.as_dict() for layer, s in zip(self.layers, layer_stats, strict=True)},
            "total": total(layer_stats).as_dict(),
        }

    def stats_table(self) -> str:
        return format_table([layer.name for layer in self.layers], [layer.stats for layer in self.layers])

    def reset_stats(self) -> None:
        for layer in self.layers:
            layer.stats = LayerStats()

    def close(self) -> None:
        """Release the layers' handles (a compiled graph still naming one then fails clearly; the registry
        no longer holds the host experts) and the device memory."""
        with self._lock:
            if self._unfinished:
                self.recover()
            self.accelerator.synchronize()
            for handle in self.handles:
                self.registry.release(handle)
            self.pool = None
            for layer in self.layers:
                layer.cache.pool = None
            self.accelerator.close()


class HybridLayer:
    """One offloaded MoE layer: `forward` is what `dali::moe_hybrid` runs for it."""

    def __init__(self, runtime: HybridRuntime, index: int, name: str, spec: LayerSpec, cache: LayerCache):
        self.runtime = runtime
        self.index = index
        self.name = name
        self.spec = spec  # host weights: the CPU experts read them in place, copies read them
        self.cache = cache
        self.steps = 0
        self.stats = LayerStats()
        self._routing = StepRouting(spec.num_experts, name)  # the step's active experts, in one C call
        self.prefetched: dict[int, int] = {}  # expert -> prefetch slot, for this layer's next step only
        self.prefetched_at = -1  # the previous layer's step that last prefetched for this layer

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        with self.runtime.step():
            return self._step(hidden, topk_ids, topk_weights, torch.empty_like, _sum_over_k_into)

    def contributions(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The step's [T, K, H] fp32 (token, k) contributions, before the sum over k: what a distributed worker
        returns, so that the main rank sums the parts of several workers over k in order, as `forward` does."""
        def per_pair(hidden):
            return hidden.new_empty((*topk_ids.shape, hidden.shape[-1]), dtype=torch.float32)

        with self.runtime.step():
            return self._step(hidden, topk_ids, topk_weights, per_pair, _copy_contributions_into)

    def _step(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, new_out,
              combine) -> torch.Tensor:
        """One step; `new_out(hidden)` makes the output (after the prefetch and the plan: their transients and the
        output never coexist) and `combine(out[rows], contributions)` fills it chunk by chunk."""
        rt, acc, stats = self.runtime, self.runtime.accelerator, LayerStats()
        start, host_start, emulation_start = time.perf_counter(), time.thread_time(), acc.emulation_thread_s
        self._check(hidden)
        if rt.recorder is not None:
            rt.recorder(self.index, hidden, topk_ids, topk_weights)
        rt._prefetch_once(self.index, hidden)  # the experts' input is the gate input here
        E = self.spec.num_experts
        host_ids = acc.to_host(topk_ids)
        experts, workloads, in_cache, hits = self._routing.active_experts(host_ids, self.cache.slot_of_expert)
        prefetched = self._take_prefetched()
        # A prefetched expert is on the device for this step: the policy sees it as cached (no copy needed).
        cached = in_cache | np.isin(experts, list(prefetched)) if prefetched else in_cache
        step = LayerStep(self.index, self.steps, experts, workloads, cached, self.cache.resident(),
                         self.cache.capacity, len(rt.staging_slots), E, rt.cost)
        decision = rt.policy.decide(step)
        check_decision(step, decision, rt.policy.name)
        stats.plan_s = time.perf_counter() - start

        on_gpu = np.asarray(decision.on_gpu)  # bool [n]: check_decision saw to it
        if any_set(on_gpu):
            cpu_set, gpu_set = experts[~on_gpu], experts[on_gpu]
        else:  # every expert on the CPU (the common decode step of a small budget): no indexing
            cpu_set, gpu_set = experts, experts[:0]
        mask = host_hidden = host_weights = None
        if cpu_set.size:
            if gpu_set.size:  # a mask only then: with no GPU expert every routed pair is the CPU's
                selected = np.zeros(E, dtype=np.bool_)  # in numpy: a third of torch's cost for a 1-token step
                selected[cpu_set] = True
                mask = torch.from_numpy(selected)
            host_hidden, host_weights = acc.to_host(hidden), acc.to_host(topk_weights)
        out = new_out(hidden)
        T, chunk = hidden.shape[0], rt.max_step_tokens
        last = None
        kernel_thread_s = 0.0  # the CPU experts run on this thread: kernel time, not host work
        for first in range(0, T, chunk):
            rows = slice(first, min(first + chunk, T)) if T > chunk else None  # None: the whole step
            contributions = None
            if gpu_set.size:  # issued first: the GPU computes (and copies) on its own while the CPU experts run
                gpu_started, copy_wait = time.perf_counter(), stats.copy_wait_s
                admit = decision.admit if first == 0 else ()  # later chunks find the admitted experts cached
                contributions = self._run_gpu(_rows(hidden, rows), _rows(topk_ids, rows), _rows(topk_weights, rows),
                                              gpu_set, admit, stats, prefetched)
                stats.gpu_s += time.perf_counter() - gpu_started - (stats.copy_wait_s - copy_wait)
            if cpu_set.size:
                # On the step's own thread (with ATen's team: one set of threads for the whole step), not
                # handed to the job queue's runner and back: that hand-off cost ~30 us of host work per step.
                cpu_started, kernel_started = time.perf_counter(), time.thread_time()
                cpu_part = cpu_experts(self.spec, _rows(host_hidden, rows), _rows(host_ids, rows),
                                       _rows(host_weights, rows), mask)
                kernel_thread_s += time.thread_time() - kernel_started
                stats.cpu_s += time.perf_counter() - cpu_started
                cpu_part = acc.to_device(cpu_part)
                contributions = cpu_part if contributions is None else acc.launch(torch.Tensor.add_, contributions,
                                                                                   cpu_part)
            # _sum_over_k_into: k in order, as moe_reference
            last = acc.launch(combine, _rows(out, rows), contributions)
        for expert, victim in decision.background:
            self.cache.install(int(expert), int(victim), self.spec, rt.last_compute)
            stats.copies += 1
        if last is not None:
            acc.result(last)  # the compute stream has written every chunk of `out`

        stats.steps = 1
        stats.hits = hits
        stats.misses = int(experts.size) - hits
        stats.prefetch_hits = len(set(prefetched) & set(experts.tolist())) if prefetched else 0
        stats.experts_cpu, stats.experts_gpu = int(cpu_set.size), int(gpu_set.size)
        stats.tokens_cpu = int(workloads[~on_gpu].sum()) if gpu_set.size else host_ids.numel() if cpu_set.size else 0
        stats.tokens_gpu = host_ids.numel() - stats.tokens_cpu  # cpu_set and gpu_set partition the experts
        stats.bytes_copied = stats.copies * rt.slot_bytes  # prefetch copies are added when issued
        stats.total_s = time.perf_counter() - start
        stats.host_s = (time.thread_time() - host_start - (acc.emulation_thread_s - emulation_start)
                        - kernel_thread_s)
        self.stats.add(stats)
        self.steps += 1
        return out

    def _take_prefetched(self) -> dict[int, int]:
        """This step's prefetched experts (expert -> slot), those whose slot still holds them: a prefetch
        issued for a step that never ran may since have been overwritten by another layer's."""
        prefetched, self.prefetched = self.prefetched, {}
        pool = self.runtime.pool
        return {e: slot for e, slot in prefetched.items() if pool.holds(slot, self.index, e)}

    def _check(self, hidden: torch.Tensor) -> None:
        acc = self.runtime.accelerator
        if hidden.device != acc.device:
            raise ValueError(f"dali::moe_hybrid: layer {self.name} is offloaded to {acc.name} ({acc.device}) but "
                             f"hidden is on {hidden.device}")
        if hidden.dtype != self.spec.dtype:
            raise TypeError(f"dali::moe_hybrid: hidden is {hidden.dtype} but layer {self.name} weights are "
                            f"{self.spec.dtype}")
        if hidden.shape[1] != self.spec.hidden_size:
            raise ValueError(f"dali::moe_hybrid: hidden size {hidden.shape[1]} does not match layer {self.name} "
                             f"hidden size {self.spec.hidden_size}")

    def _run_gpu(self, hidden, topk_ids, topk_weights, gpu_set, admit, stats: LayerStats, prefetched):
        """The GPU experts: resident (cached or prefetched) ones first, while the copies of the others run;
        returns [T, K, H] fp32 (a value of the compute stream)."""
        rt, cache = self.runtime, self.cache
        admitted = {int(e) for e, _ in admit}
        resident = [int(e) for e in gpu_set if cache.slot_of_expert[e] >= 0]
        early = [int(e) for e in gpu_set if cache.slot_of_expert[e] < 0 and int(e) in prefetched
                 and int(e) not in admitted]
        staged = [int(e) for e in gpu_set
                  if cache.slot_of_expert[e] < 0 and int(e) not in admitted and int(e) not in prefetched]
        # Copies first (they run on the copy stream while the resident experts compute).
        incoming = []  # (expert, slot) of this step's copies into cache slots
        for expert, victim in admit:
            incoming.append((int(expert), cache.install(int(expert), int(victim), self.spec, rt.last_compute)))
            stats.copies += 1
        staging = rt.staging_slots
        if staged and not staging:
            raise ExpertMemoryError(f"layer {self.name}: {len(staged)} uncached GPU experts but no staging slot")
        # Staged experts go through the staging slots in chunks, double-buffered: with two halves of the
        # slots, chunk i + 1 is copied while chunk i computes, and chunk i + 2 reuses chunk i's half once
        # that compute is recorded. With one staging slot each copy waits for the previous compute.
        halves = [staging[: len(staging) // 2], staging[len(staging) // 2:]] if len(staging) >= 2 else [staging]
        size = len(halves[0])
        chunks = [staged[i:i + size] for i in range(0, len(staged), size)] if staged else []
        pending = {i: self._stage(chunks[i], halves[i], stats) for i in range(min(len(halves), len(chunks)))}

        contributions = None
        first_group = [(e, int(cache.slot_of_expert[e])) for e in resident] + [(e, prefetched[e]) for e in early]
        groups = [first_group, incoming]
        for group in groups:
            if group:
                contributions = self._accumulate(contributions, self._compute(hidden, topk_ids, topk_weights,
                                                                              group, stats))
        for i in range(len(chunks)):
            # (no name for the part: it must be freed before the next one is allocated)
            contributions = self._accumulate(contributions, self._compute(hidden, topk_ids, topk_weights,
                                                                          pending.pop(i), stats))
            if i + len(halves) < len(chunks):  # refill this half after the compute just recorded
                pending[i + len(halves)] = self._stage(chunks[i + len(halves)], halves[i % len(halves)], stats)
        return contributions

    def _accumulate(self, contributions, part):
        """Groups cover disjoint (token, k) entries, zeros elsewhere: adding them in place is exact."""
        if contributions is None:
            return part
        return self.runtime.accelerator.launch(torch.Tensor.add_, contributions, part)

    def _stage(self, chunk: list[int], slots: list[int], stats: LayerStats) -> list[tuple[int, int]]:
        """Copy `chunk` into `slots`, each copy after the latest GPU compute (the last reader of the slots)."""
        rt = self.runtime
        group = []
        for expert, slot in zip(chunk, slots, strict=False):
            rt.pool.load(slot, self.spec, expert, rt.last_compute, owner=self.index)
            group.append((expert, slot))
            stats.copies += 1
        return group

    def _compute(self, hidden, topk_ids, topk_weights, group: list[tuple[int, int]], stats: LayerStats):
        """The experts of `group` ((expert, slot) pairs) on the compute stream, after their copies; [T, K, H]."""
        rt, acc, pool = self.runtime, self.runtime.accelerator, self.runtime.pool
        table = np.full(self.spec.num_experts, -1, dtype=np.int32)
        waited = time.perf_counter()
        for expert, slot in group:
            if not pool.holds(slot, self.index, expert):
                raise RuntimeError(f"dali: internal error: layer {self.name} would compute expert {expert} from slot "
                                   f"{slot}, which holds {pool.contents[slot]} (please report this)")
            table[expert] = slot
            acc.wait(pool.copy_event(slot))
        stats.copy_wait_s += time.perf_counter() - waited
        slot_table = acc.to_device(torch.from_numpy(table))
        try:
            return acc.launch(gpu_experts, hidden, topk_ids, topk_weights, pool.up, pool.down, pool.up_bias,
                              pool.down_bias, slot_table, self.spec.layout, pool.up_scales, pool.down_scales)
        finally:
            rt.last_compute = acc.record()  # every later copy into a slot waits for this compute


def _rows(tensor: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """tensor[rows], or the tensor itself for None (a step of one chunk: no view to make)."""
    return tensor if rows is None else tensor[rows]


def _copy_contributions_into(out: torch.Tensor, contributions: torch.Tensor | None) -> torch.Tensor:
    """out [T, K, H] fp32 = contributions (zeros where there is none)."""
    return out.zero_() if contributions is None else out.copy_(contributions)


def _sum_over_k_into(out: torch.Tensor, contributions: torch.Tensor | None) -> torch.Tensor:
    """out [T, H] (model dtype) = contributions [T, K, H] fp32 summed over k in order; no contribution: 0."""
    if contributions is None:
        return out.zero_()
    return out.copy_(contributions.sum(dim=1))
