"""The main rank: the whole model runs here except the routed experts, whose layer steps go to the workers.

Each experts module is switched to the "dali" implementation, so every MoE layer step is one
`dali::moe_hybrid` call; its registry handle is attached to a `RemoteLayer`, exactly as `offload` attaches
a `HybridLayer`, so eager, `generate()` and `torch.compile(model, backend="dali")` all route through it.

Per layer step (`MainSession.run_layer`): send the step's predictions (main-side predictors), send
(hidden, topk_ids, topk_weights) to every live worker of the layer's group, receive each one's fp32 (token, k)
contributions, put them in place in [T, K, H], and sum over k in order (as `dali::moe_hybrid`'s reference;
a group's only worker sends that sum itself).
A worker that is gone (its connection closed: killed) or silent past `timeout_s` (its receive times out) is
dropped for good; its experts are computed here from now on, by the C++ CPU runtime on the main rank's own
copy of the experts. The answer never depends on who computed a pair.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

from dali_compile.experts_interface import (
    IMPLEMENTATION_NAME,
    experts_implementations,
    register_experts_interface,
    restore_experts_implementations,
    top_k_of,
)
from dali_compile.ops.cpu_experts import cpu_experts
from dali_compile.runtime.prefetch import ResidualPredictor, find_router, measure_residuals
from dali_compile.runtime.registry import layer_registry

from . import messages
from .layers import fingerprint, moe_layers, structure_of
from .messages import Kind, Message, PeerLost
from .topology import Topology

log = logging.getLogger(__name__)


class RemoteLayer:
    """What `dali::moe_hybrid` runs for one MoE layer of the main rank (attached in the layer registry)."""

    def __init__(self, session: MainSession, index: int, name: str, spec):
        self.session, self.index, self.name, self.spec = session, index, name, spec

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.session.run_layer(self, hidden, topk_ids, topk_weights)


class MainSession:
    is_main = True

    def __init__(self, model: nn.Module, topology: Topology, predictor: str, timeout_s: float,
                 calibration_ids: torch.Tensor | None = None):
        self.model, self.topology, self.timeout_s = model, topology, timeout_s
        layers = moe_layers(model)
        self.top_k = top_k_of(model)
        self.num_experts = layers[0][2].num_experts
        self.layers = [RemoteLayer(self, i, name, spec) for i, (name, _, spec) in enumerate(layers)]
        self.predictor_name = predictor
        self.predictor = self._main_predictor(predictor, layers, calibration_ids)
        self.alive = set(topology.worker_ranks)
        self.lost: dict[int, dict] = {}
        self.shadow_alive = topology.shadow
        self.step = 0
        self._shadow_lengths = (0, 0)  # (past length, new tokens) of the last step sent to the shadow
        self.counters = dict(steps=0, layer_steps=0, remote_pairs=0, local_pairs=0, bytes_sent=0, bytes_received=0,
                             shadow_bytes=0, stale_replies=0)
        self._lock = threading.RLock()  # one layer step's messages at a time (threads sharing the model)
        self.worker_stats: dict[int, dict] = {}
        self.shadow_stats: dict | None = None
        self._handles: list[int] = []
        self._hooks = []
        self._implementations = []
        self.closed = False
        self.owns_group = False  # serve() created the process group: close() destroys it

    # -- set-up -----------------------------------------------------------------------------------------------

    def _main_predictor(self, name: str, layers, calibration_ids) -> ResidualPredictor | None:
        if name not in ("residual", "next_gate"):
            return None
        spec = layers[0][2]
        routers = [find_router(self.model.get_submodule(n.rpartition(".")[0]), spec.num_experts, spec.hidden_size)
                   for n, _, _ in layers]
        predictor = ResidualPredictor(routers, spec.num_experts, spec.hidden_size)
        if name == "residual" and len(layers) > 1:
            if calibration_ids is None:
                from dali_compile.offload import SAMPLE_TEXT
                calibration_ids = torch.tensor(list(SAMPLE_TEXT.encode()), dtype=torch.long)
                calibration_ids %= self.model.config.vocab_size
            predictor.set_residuals(measure_residuals(self.model, routers, calibration_ids))
        return predictor

    def start(self, hello_timeout_s: float | None = None) -> MainSession:
        """Check every worker holds the experts this rank expects (fingerprints) and the shadow the same model
        structure, then route the experts modules here. A mismatch stops every rank and raises. The answers may
        take `hello_timeout_s` (a rank may still be building its part)."""
        wait = max(self.timeout_s, hello_timeout_s or 0)
        problems = []
        for rank in self.topology.worker_ranks:
            layer_ids = self.topology.layers_of_worker(rank, len(self.layers))
            expected = dict(layers=layer_ids, fingerprints=[
                fingerprint(self.layers[layer].spec, self.topology.experts_of_worker(rank, layer, self.num_experts))
                for layer in layer_ids])
            problems += self._hello(rank, expected, wait)
        if self.topology.shadow:
            problems += self._hello(self.topology.shadow_rank, structure_of(self.model), wait)
        if problems:
            self.closed = True
            self._stop_all()
            if self.owns_group:
                from . import leave

                leave()
            raise RuntimeError("dali distributed: " + "; ".join(problems))
        self._attach()
        return self

    def _hello(self, rank: int, expected: dict, timeout_s: float) -> list[str]:
        try:
            messages.send(messages.text_message(Kind.HELLO, json.dumps(expected)), rank, timeout_s)
            answer = messages.recv(rank, timeout_s)
        except PeerLost as lost:
            return [str(lost)]
        return [answer.text()] if answer.kind == Kind.ERROR else []

    def _attach(self) -> None:
        if not hasattr(self.model, "set_experts_implementation") or not register_experts_interface():
            raise RuntimeError("dali distributed needs a transformers version with the experts interface (>= 5.17)")
        self._implementations = experts_implementations(self.model)
        self.model.set_experts_implementation(IMPLEMENTATION_NAME)
        registry = layer_registry()
        for layer in self.layers:
            handle = registry.register(layer.spec, weak=True)
            registry.attach(handle, layer)
            self._handles.append(handle)
        self._hooks.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))

    # -- per step ---------------------------------------------------------------------------------------------

    def _before_forward(self, module, args, kwargs) -> None:
        with self._lock:
            self._new_step(args, kwargs)

    def _new_step(self, args, kwargs) -> None:
        """A new model step: number it, and give the shadow its input ids (and this rank's keys and values of
        the previous step's tokens, to re-align its cache)."""
        self.step += 1
        self.counters["steps"] += 1
        if not self.shadow_alive:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            warnings.warn("dali distributed: a step without input_ids (inputs_embeds): the shadow skips it",
                          stacklevel=2)
            return
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        tensors = [input_ids.detach().to("cpu", torch.int64)]
        last_past, last_new = self._shadow_lengths
        if past and past == last_past + last_new and hasattr(cache, "layers"):
            for layer in cache.layers:
                keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
                if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.dim() == 4:
                    tensors += [keys[..., -last_new:, :], values[..., -last_new:, :]]
        self._shadow_lengths = (past, input_ids.shape[-1])
        try:
            messages.send(Message(Kind.TOKENS, self.step, 0, tensors, arg=past), self.topology.shadow_rank,
                          self.timeout_s)
            self.counters["shadow_bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        except PeerLost as lost:
            self.shadow_alive = False
            warnings.warn(f"{lost}; the shadow predictor is off from now on (experts load on demand)", stacklevel=2)

    def run_layer(self, layer: RemoteLayer, hidden: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self._run_layer(layer, hidden, topk_ids, topk_weights)

    def _run_layer(self, layer: RemoteLayer, hidden: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("dali distributed: this session is closed; its workers have stopped")
        T, K = topk_ids.shape
        ids = topk_ids.detach().to("cpu", torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_experts):
            raise IndexError(f"dali::moe_hybrid: expert id out of range for layer {layer.name} with "
                             f"{self.num_experts} experts")
        host_hidden, weights = hidden.detach().cpu(), topk_weights.detach().cpu()
        self._predict(layer, host_hidden, ids)
        workers = [rank for rank in self.topology.workers_of_layer(layer.index) if rank in self.alive]
        request = [host_hidden, ids, weights]
        sent = []
        for rank in workers:
            try:
                messages.send(Message(Kind.REQUEST, self.step, layer.index, request), rank, self.timeout_s)
                sent.append(rank)
                self.counters["bytes_sent"] += sum(t.numel() * t.element_size() for t in request)
            except PeerLost as lost:
                self._drop(rank, lost, layer)
        contributions = torch.zeros(T, K, host_hidden.shape[1], dtype=torch.float32)
        group = self.topology.workers_of_layer(layer.index)
        summed = None  # the sum over k, from a group's only worker
        for rank in sent:
            rows = self._reply(rank, layer)
            if rows is None:
                continue
            owned = self.topology.owned(rank, layer.index, ids)
            if len(group) == 1:
                summed = rows
            else:
                contributions[owned] = rows
            self.counters["remote_pairs"] += int(owned.sum())
        missing = [self.topology.experts_of_worker(rank, layer.index, self.num_experts)
                   for rank in group if rank not in self.alive]
        if missing:
            mask = torch.zeros(self.num_experts, dtype=torch.bool)
            mask[[e for experts in missing for e in experts]] = True
            local = cpu_experts(layer.spec, host_hidden, ids, weights, mask)
            contributions += local  # disjoint pairs, zeros elsewhere: exact
            self.counters["local_pairs"] += int(mask[ids].sum())
        self.counters["layer_steps"] += 1
        out = summed if summed is not None else contributions.sum(dim=1)  # k in order, as moe_hybrid's reference
        return out.to(device=hidden.device, dtype=hidden.dtype)

    def _reply(self, rank: int, layer: RemoteLayer) -> torch.Tensor | None:
        while True:
            try:
                reply = messages.recv(rank, self.timeout_s)
            except PeerLost as lost:
                self._drop(rank, lost, layer)
                return None
            # A reply to a request whose step was interrupted (Ctrl-C, an error in between) comes first: skip it.
            if reply.kind != Kind.REPLY or (reply.step, reply.layer) == (self.step, layer.index):
                break
            self.counters["stale_replies"] += 1
        if reply.kind != Kind.REPLY:
            what = reply.text() if reply.kind == Kind.ERROR else f"an unexpected {reply.kind.name}"
            self._drop(rank, PeerLost(rank, f"answered {what}"), layer)
            return None
        self.counters["bytes_received"] += reply.tensors[0].numel() * 4
        return reply.tensors[0]

    def _drop(self, rank: int, lost: PeerLost, layer: RemoteLayer) -> None:
        self.alive.discard(rank)
        self.lost[rank] = dict(reason=str(lost), step=self.step, layer=layer.index, time=time.time())
        warnings.warn(f"{lost}; its experts run on the main rank's CPU from now on", stacklevel=3)

    def _predict(self, layer: RemoteLayer, hidden: torch.Tensor, ids: torch.Tensor) -> None:
        """Main-side predictors: residual / next_gate predict the next layer from this one's gate input;
        `wrong` (a test double) names experts this layer does not use, for this layer."""
        if self.predictor is not None and layer.index + 1 < len(self.layers):
            counts, _ = self.predictor.predict(layer.index, hidden)
            self._send_prediction(layer.index + 1, np.flatnonzero(counts))
        elif self.predictor_name == "wrong":
            used = set(torch.unique(ids).tolist())
            unused = [e for e in range(self.num_experts) if e not in used]
            self._send_prediction(layer.index, np.array(unused[: len(used)], dtype=np.int64))

    def _send_prediction(self, layer: int, experts: np.ndarray) -> None:
        message = Message(Kind.PREDICTION, self.step, layer, [torch.from_numpy(experts.astype(np.int64))])
        for rank in self.topology.workers_of_layer(layer):
            if rank in self.alive:
                try:
                    messages.send(message, rank, self.timeout_s)
                except PeerLost as lost:
                    self._drop(rank, lost, self.layers[layer])

    # -- the end ----------------------------------------------------------------------------------------------

    def close(self) -> dict:
        """Stop the workers and the shadow (collecting the workers' statistics) and give the model back its
        experts implementation; the model then runs locally again."""
        if self.closed:
            return self.stats()
        self.closed = True
        self._stop_all()
        for hook in self._hooks:
            hook.remove()
        registry = layer_registry()
        for handle in self._handles:
            registry.detach(handle)
        restore_experts_implementations(self._implementations)
        if self.owns_group:
            from . import leave

            leave()
        return self.stats()

    def _stop_all(self) -> None:
        """The shadow first (it tells the workers it is done), then each worker (which answers with STATS)."""
        if self.shadow_alive:
            try:
                messages.send(Message(Kind.STOP), self.topology.shadow_rank, self.timeout_s)
                answer = messages.recv(self.topology.shadow_rank, self.timeout_s)
                if answer.kind == Kind.STATS:
                    self.shadow_stats = json.loads(answer.text())
            except PeerLost as lost:
                log.warning("dali distributed: %s while stopping", lost)
            self.shadow_alive = False
        for rank in sorted(self.alive):
            try:
                messages.send(Message(Kind.STOP), rank, self.timeout_s)
                answer = messages.recv(rank, self.timeout_s)
                if answer.kind == Kind.STATS:
                    self.worker_stats[rank] = json.loads(answer.text())
            except PeerLost as lost:
                log.warning("dali distributed: %s while stopping", lost)

    def stats(self) -> dict:
        workers = self.worker_stats.values()
        predicted = sum(w["predicted_hits"] for w in workers)
        actual = sum(w["actual"] for w in workers)
        return dict(topology=self.topology.describe(), predictor=self.predictor_name, **self.counters,
                    lost_workers=self.lost, workers=self.worker_stats, shadow=self.shadow_stats,
                    recall=predicted / actual if actual else None,
                    copies=sum((w["runtime"].get("copies") or 0) for w in workers),
                    bytes_copied=sum((w["runtime"].get("bytes_copied") or 0) for w in workers),
                    prefetch_hits=sum((w["runtime"].get("prefetch_hits") or 0) for w in workers))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
