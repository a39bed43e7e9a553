"""A worker rank: the experts of its group's layers (its share of each) in host memory, loaded into an
accounted device budget just in time, computed, and evicted (OD-MoE: no expert cache).

Each served layer is a layer of a `HybridRuntime` with no cache: policy 'on_demand' on a device (CUDA, or
the emulated accelerator on a CPU-only machine), whose staging slots stream the step's experts through the
budget in waves when it holds fewer than the step needs, or 'all_cpu' (device="cpu": the C++ CPU runtime).
Predictions (from the shadow rank or the main rank's predictor) fill the runtime's prefetch slots for the
next layer this worker serves, while other groups compute.

A request carries the layer step's hidden [T, H], topk_ids and topk_weights. The worker takes the (token, k)
pairs of the experts it owns, runs them as one-pair rows (local expert ids) and answers with their fp32
contributions [pairs, H]; the main rank sums the parts of all workers over k in order. The only worker of a
group owns every pair and answers with that sum itself, [T, H] (K times fewer bytes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import threading
import time

import numpy as np
import torch
import torch.nn as nn

from dali_compile.experts_interface import top_k_of
from dali_compile.runtime.accelerator import make_accelerator, parse_bytes
from dali_compile.runtime.expert_cache import expert_bytes
from dali_compile.runtime.hybrid import HybridRuntime
from dali_compile.runtime.policies import make_policy

from . import messages
from .layers import drop_weights, fingerprint, moe_layers, subset_spec
from .messages import Kind, Message, PeerLost
from .topology import MAIN_RANK, Topology

log = logging.getLogger(__name__)

WORKER_DEVICES = ("emulated", "emulated-async", "cpu", "cuda")
# Fault injection for tests and drills: "RANK:STEP:kill" (SIGKILL) or "RANK:STEP:stop" (SIGSTOP: alive, silent)
# on the first request of step STEP or later.
FAULT_VARIABLE = "DALI_DISTRIBUTED_FAULT"


class Worker:
    def __init__(self, model: nn.Module, topology: Topology, rank: int, device: str, memory: int | str | None,
                 timeout_s: float, idle_timeout_s: float):
        if device not in WORKER_DEVICES:
            raise ValueError(f"dali distributed: worker_device must be one of {', '.join(WORKER_DEVICES)}, "
                             f"got {device!r}")
        self.topology, self.rank = topology, rank
        self.timeout_s, self.idle_timeout_s = timeout_s, idle_timeout_s
        layers = moe_layers(model)
        self.top_k = top_k_of(model)
        self.num_layers, self.num_experts = len(layers), layers[0][2].num_experts
        self.layer_ids = topology.layers_of_worker(rank, self.num_layers)
        group = topology.workers_of_group(topology.group_of_worker(rank))
        self.stride, self.position = len(group), group.index(rank)  # workers in the group, this one's place
        owned = [topology.experts_of_worker(rank, layer, self.num_experts) for layer in self.layer_ids]
        specs = [(layers[layer][0], subset_spec(layers[layer][2], experts))
                 for layer, experts in zip(self.layer_ids, owned, strict=True)]
        drop_weights(model)  # only the owned experts' copies stay
        self.fingerprints = [fingerprint(spec, list(range(spec.num_experts))) for _, spec in specs]
        self.local_experts = specs[0][1].num_experts if specs else 0
        self.runtime = self._runtime(specs, device, memory) if specs else None
        self.next_local = 0  # index into layer_ids of the layer the next request should be for
        self.next_step = 0
        self.pending: dict[int, tuple[int, np.ndarray]] = {}  # layer -> (step, predicted local ids) to prefetch
        self.predicted: dict[int, tuple[int, set]] = {}  # layer -> (step, predicted local ids): for the recall
        self.prefetched_for: tuple | None = None  # (layer, step, experts) of the last prefetch issued
        self.counters = dict(requests=0, pairs=0, predictions=0, predicted=0, predicted_hits=0, actual=0,
                             bytes_in=0, bytes_out=0)

    def _runtime(self, specs, device: str, memory) -> HybridRuntime:
        slot = expert_bytes(specs[0][1])
        if device == "cpu":
            policy, budget, prefetch = make_policy("all_cpu"), 0, 0
        else:
            policy = make_policy("on_demand")
            budget = parse_bytes(memory) if memory is not None else (1 + 2 * self._wanted_prefetch()) * slot
            prefetch = max(0, min(self._wanted_prefetch(), (budget // slot - 1) // 2))
        # device "cpu": the all_cpu policy never touches the accelerator; the emulated one (host memory) stands in
        accelerator = make_accelerator("emulated" if device == "cpu" else device, budget)
        if accelerator.device.type != "cpu":  # CUDA copies from pinned host memory are asynchronous DMA
            specs = [(name, spec.with_tensors(*(None if t is None else accelerator.prepare_host_weight(t)
                                                for t in spec.tensors()))) for name, spec in specs]
        # No predictor: the prefetches come from predictions that arrive as messages (prefetch_experts)
        return HybridRuntime(accelerator, specs, policy, None, 1, prefetch=prefetch)

    def _wanted_prefetch(self) -> int:
        """Prefetch slots per set: this worker's share of one token's experts, rounded up."""
        return min(self.local_experts, math.ceil(self.top_k / self.stride))

    # -- the loop -------------------------------------------------------------------------------------------

    def serve(self) -> dict:
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        sources = [MAIN_RANK] + ([self.topology.shadow_rank] if self.topology.shadow else [])
        self.threads = [threading.Thread(target=self._receive, args=(source, inbox), daemon=True,
                                         name=f"dali-worker-recv-{source}") for source in sources]
        for thread in self.threads:
            thread.start()
        try:
            return self._loop(inbox)
        finally:
            for thread in self.threads:  # the shadow's STOP (or its exit) ends its thread
                thread.join(timeout=self.timeout_s)

    def _loop(self, inbox: queue.SimpleQueue) -> dict:
        while True:
            item = inbox.get()
            if isinstance(item, PeerLost):
                if item.rank == MAIN_RANK:
                    log.warning("dali worker %d: the main rank is gone (%s); stopping", self.rank, item)
                    return self.stats()
                log.warning("dali worker %d: %s; serving without its predictions", self.rank, item)
                continue
            if item.kind == Kind.HELLO:
                self._hello(item)
            elif item.kind == Kind.PREDICTION:
                self._predicted(item)
            elif item.kind == Kind.REQUEST:
                self._request(item)
            elif item.kind == Kind.STOP:
                stats = self.stats()
                messages.send(messages.text_message(Kind.STATS, json.dumps(stats)), MAIN_RANK, self.timeout_s)
                return stats

    def _receive(self, source: int, inbox: queue.SimpleQueue) -> None:
        """One thread per sender: a blocking receive (GIL released) with the idle timeout."""
        while True:
            try:
                message = messages.recv(source, self.idle_timeout_s)
            except PeerLost as lost:
                inbox.put(lost)
                return
            inbox.put(message)
            if message.kind == Kind.STOP:
                return

    def _hello(self, message: Message) -> None:
        expected = json.loads(message.text())
        problems = []
        if expected["layers"] != self.layer_ids:
            problems.append(f"serves layers {self.layer_ids}, the main rank expects {expected['layers']}")
        elif expected["fingerprints"] != self.fingerprints:
            bad = [layer for layer, a, b in zip(self.layer_ids, expected["fingerprints"], self.fingerprints,
                                                strict=True) if a != b]
            problems.append(f"holds other expert weights than the main rank for layers {bad} (a different "
                            "checkpoint, seed, dtype or model)")
        if problems:
            messages.send(messages.text_message(Kind.ERROR, f"worker rank {self.rank} " + "; ".join(problems)),
                          MAIN_RANK, self.timeout_s)
        else:
            messages.send(Message(Kind.READY), MAIN_RANK, self.timeout_s)

    # -- predictions and requests ----------------------------------------------------------------------------

    def _predicted(self, message: Message) -> None:
        ids = message.tensors[0].reshape(-1).to(torch.int64)
        mine = self.topology.local_ids(message.layer, ids[self.topology.owned(self.rank, message.layer, ids)])
        self.counters["predictions"] += 1
        experts = np.unique(mine.numpy())
        self.pending[message.layer] = (message.step, experts)
        self.predicted[message.layer] = (message.step, set(experts.tolist()))
        self._prefetch_next()

    def _prefetch_next(self) -> None:
        """Start the copies for the next layer this worker serves if its prediction for that step is in."""
        if self.runtime is None or not self.runtime.prefetch:
            return
        layer = self.layer_ids[self.next_local]
        step, experts = self.pending.get(layer, (-1, None))
        if step != self.next_step:
            return
        del self.pending[layer]
        if (layer, step, tuple(experts)) == self.prefetched_for:  # a repeated prediction: the copies are issued
            return
        self.prefetched_for = (layer, step, tuple(experts))
        counts = np.zeros(self.local_experts, dtype=np.int64)
        counts[experts] = 1
        with self.runtime.step():
            self.runtime.prefetch_experts(self.next_local, counts, np.zeros(self.local_experts))

    def _request(self, message: Message) -> None:
        _inject_fault(self.rank, message.step)
        hidden, topk_ids, topk_weights = message.tensors
        local = self.layer_ids.index(message.layer)
        owned = self.topology.owned(self.rank, message.layer, topk_ids)
        pairs = owned.nonzero()
        tokens = pairs[:, 0]
        rows = hidden.index_select(0, tokens)
        ids = self.topology.local_ids(message.layer, topk_ids[owned]).reshape(-1, 1)
        weights = topk_weights[owned].reshape(-1, 1)
        layer = self.runtime.layers[local]
        step, predicted = self.predicted.pop(message.layer, (-1, set()))
        predicted = predicted if step == message.step else set()
        device = self.runtime.accelerator.device  # messages carry host tensors; a CUDA worker computes on its GPU
        contributions = layer.contributions(rows.to(device), ids.to(device), weights.to(device))
        contributions = contributions.reshape(-1, hidden.shape[1]).cpu()
        if self.stride == 1:  # every pair is this worker's: the sum over k here, as the main rank would do it
            contributions = contributions.reshape(*topk_ids.shape, hidden.shape[1]).sum(dim=1)
        actual = set(torch.unique(ids).tolist())
        self.counters["requests"] += 1
        self.counters["pairs"] += int(pairs.shape[0])
        self.counters["predicted"] += len(predicted)
        self.counters["predicted_hits"] += len(predicted & actual)
        self.counters["actual"] += len(actual)
        self.counters["bytes_in"] += sum(t.numel() * t.element_size() for t in message.tensors)
        self.counters["bytes_out"] += contributions.numel() * 4
        messages.send(Message(Kind.REPLY, message.step, message.layer, [contributions]), MAIN_RANK, self.timeout_s)
        self.next_local = (local + 1) % len(self.layer_ids)
        self.next_step = message.step + (1 if self.next_local == 0 else 0)
        self._prefetch_next()

    def stats(self) -> dict:
        runtime = self.runtime.stats()["total"] if self.runtime is not None else {}
        return dict(rank=self.rank, layers=self.layer_ids, experts_per_layer=self.local_experts,
                    prefetch_slots=self.runtime.prefetch if self.runtime else 0,
                    budget_bytes=self.runtime.accelerator.pool.budget_bytes if self.runtime else 0,
                    **self.counters, runtime={k: runtime.get(k) for k in ("copies", "bytes_copied", "prefetches",
                                                                            "prefetch_hits", "misses")},
                    time=time.time())


def _inject_fault(rank: int, step: int) -> None:
    fault = os.environ.get(FAULT_VARIABLE)
    if not fault:
        return
    target, at, how = fault.split(":")
    if int(target) == rank and step >= int(at):
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
