"""The shadow rank (OD-MoE's shadow predictor): a copy of the model at lower precision that runs each step
as soon as the main rank starts it, ahead of the main rank's layers, and sends the experts each MoE layer
routes to (its own router's top-k) to the workers of that layer's group, which load them before the main
rank's request comes.

Re-alignment: the main rank sends each step's input ids together with its own keys and values of the
previous step's tokens; the shadow writes those over its cache's last positions before it runs, so its
state is the main model's up to its lower precision and only one step's own error reaches its routing.
Without re-alignment (`realign=False`, for comparison) the shadow keeps its own cache and feeds its own
greedy token, as an unaligned draft model would: its routing drifts away from the main model's.

Look-ahead (`lookahead` N > 0): after each step the shadow runs the first N MoE layers of the next one before the
main rank has its token, from its own most likely next tokens: `candidates` of them, one speculative run each,
and sends each of those layers the union of their experts. Where its first choice is not the main model's next
token its second choice mostly is: on the trained tiny MoE the speculative layers' recall went from 97.1-97.2%
with one candidate to 99.5-99.7% with two (bf16 shadow, benchmarks/bench_distributed.py), at the price of up to
twice the experts loaded for those N layers and N more layer runs on the shadow's rank.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.nn as nn

from dali_compile.hf_compat import cache_keyword
from dali_compile.runtime.prefetch import find_router, routing_of

from . import messages
from .layers import moe_layers, structure_of
from .messages import Kind, Message, PeerLost
from .topology import MAIN_RANK, Topology

log = logging.getLogger(__name__)

SHADOW_PRECISIONS = ("same", "bf16", "fp16", "int8", "int4")
SPECULATIVE_CANDIDATES = 2  # next tokens the look-ahead runs speculate from (see the module docstring)


def check_candidates(candidates) -> None:
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"dali distributed: speculative candidates must be an int >= 1 (next tokens the shadow "
                         f"speculates from), got {candidates!r}")


def make_shadow(model: nn.Module, precision: str) -> nn.Module:
    """Convert `model` in place to the shadow's precision."""
    if precision not in SHADOW_PRECISIONS:
        raise ValueError(f"dali distributed: shadow precision must be one of {', '.join(SHADOW_PRECISIONS)}, "
                         f"got {precision!r}")
    if precision in ("bf16", "fp16"):
        return model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    if precision in ("int8", "int4"):
        import dali_compile

        return dali_compile.quantize(model, experts=precision, dense="int8")
    return model


class Shadow:
    def __init__(self, model: nn.Module, topology: Topology, realign: bool, timeout_s: float,
                 idle_timeout_s: float, lookahead: int = 0, candidates: int = SPECULATIVE_CANDIDATES):
        check_candidates(candidates)
        self.model, self.topology, self.realign = model, topology, realign
        self.lookahead, self.candidates = lookahead, candidates
        self._stop_after: int | None = None  # a speculative step ends after this layer's prediction
        self._gathered: dict[int, list[torch.Tensor]] | None = None  # speculating: layer -> each candidate's ids
        self.timeout_s, self.idle_timeout_s = timeout_s, idle_timeout_s
        layers = moe_layers(model)
        spec = layers[0][2]
        self.structure = structure_of(model, layers)
        self.routers = [find_router(model.get_submodule(name.rpartition(".")[0]), spec.num_experts, spec.hidden_size)
                        for name, _, _ in layers]
        self.alive = set(topology.worker_ranks)
        self.step = 0
        self.cache = None
        self.own_token: torch.Tensor | None = None
        self.own_candidates: list[torch.Tensor] = []  # its most likely next tokens, best first ([B, 1] each)
        self.keyword = cache_keyword(model)
        self.counters = dict(steps=0, predictions=0, skipped_steps=0, speculative_steps=0)

    def serve(self) -> dict:
        hooks = [router.register_forward_hook(self._routed(layer)) for layer, router in enumerate(self.routers)]
        try:
            while True:
                try:
                    message = messages.recv(MAIN_RANK, self.idle_timeout_s)
                except PeerLost as lost:
                    log.warning("dali shadow: the main rank is gone (%s); stopping", lost)
                    break
                if message.kind == Kind.STOP:
                    messages.send(messages.text_message(Kind.STATS, json.dumps(self.counters)), MAIN_RANK,
                                  self.timeout_s)
                    break
                if message.kind == Kind.HELLO:
                    expected = json.loads(message.text())
                    answer = (Message(Kind.READY) if expected == self.structure else messages.text_message(
                        Kind.ERROR, f"the shadow's model {self.structure} is not the main rank's {expected}"))
                    messages.send(answer, MAIN_RANK, self.timeout_s)
                elif message.kind == Kind.TOKENS:
                    self._run(message)
        finally:
            for hook in hooks:
                hook.remove()
            for rank in sorted(self.alive):  # ends each worker's receiving thread for this rank
                try:
                    messages.send(Message(Kind.STOP), rank, self.timeout_s)
                except PeerLost:
                    pass
        return self.counters

    def _routed(self, layer: int):
        def hook(module, args, output):
            ids = routing_of(output)[0].detach().to("cpu", torch.int64)
            if self._gathered is not None:  # a speculative run: sent with the other candidates' (_speculate)
                self._gathered.setdefault(layer, []).append(ids)
            else:
                self._send_prediction(layer, ids)
            if self._stop_after is not None and layer >= self._stop_after:
                raise _EnoughLayers
        return hook

    def _send_prediction(self, layer: int, ids: torch.Tensor) -> None:
        """Send step `self.step`'s predicted expert ids of `layer` to the layer's workers (any shape: a
        speculative prediction is the candidates' ids side by side, [B, K * candidates])."""
        prediction = Message(Kind.PREDICTION, self.step, layer, [ids])
        for rank in self.topology.workers_of_layer(layer):
            if rank in self.alive:
                try:
                    messages.send(prediction, rank, self.timeout_s)
                    self.counters["predictions"] += 1
                except PeerLost as lost:
                    self.alive.discard(rank)
                    log.warning("dali shadow: %s; no more predictions to it", lost)

    @torch.no_grad()
    def _run(self, message: Message) -> None:
        from transformers import DynamicCache

        self.step = message.step
        input_ids, kv = message.tensors[0], message.tensors[1:]
        past = message.arg
        if past == 0:
            self.cache = DynamicCache(config=self.model.config)
        elif self.cache is None or self.cache.get_seq_length() != past:
            self.counters["skipped_steps"] += 1  # a cache this rank never saw: wait for the next sequence
            return
        elif self.realign:
            self._align(kv)
        elif self.own_token is not None and self.own_token.shape == input_ids.shape:
            input_ids = self.own_token
        logits = self.model(input_ids=input_ids, **{self.keyword: self.cache}, use_cache=True).logits
        self.own_token = logits[:, -1:].argmax(-1)
        self.own_candidates = [self.own_token, *self._runners_up(logits[:, -1])]
        self.counters["steps"] += 1
        if self.lookahead and self.realign:
            self._speculate()

    def _runners_up(self, last_logits: torch.Tensor) -> list[torch.Tensor]:
        """The next `candidates` - 1 most likely tokens after own_token, best first, [B, 1] each."""
        count = min(self.candidates, last_logits.shape[-1]) - 1
        if count < 1:
            return []
        others = last_logits.float().scatter(-1, self.own_token, float("-inf"))
        return [ids.unsqueeze(-1) for ids in others.topk(count, dim=-1).indices.unbind(-1)]

    def _speculate(self) -> None:
        """Run ahead into the next step before the main rank has its token: the first `lookahead` MoE layers of
        a step from each of this rank's `candidates` most likely next tokens, on a cache not yet re-aligned with
        this step, each run's cache cut back to where it was. Each of those layers then gets the union of the
        runs' experts as the next step's prediction (the re-aligned step sends better ones when the main rank's
        token comes)."""
        past = self.cache.get_seq_length()
        self.step += 1
        self._stop_after, self._gathered = self.lookahead - 1, {}
        try:
            for token in self.own_candidates:
                try:
                    self.model(input_ids=token, **{self.keyword: self.cache}, use_cache=True)
                except _EnoughLayers:
                    pass
                finally:  # also when the run raised: the next step needs the cache as it was
                    cropped = self._crop_to(past)
                if not cropped:
                    break
            for layer, parts in sorted(self._gathered.items()):
                self._send_prediction(layer, torch.cat(parts, dim=-1))
        finally:
            self._stop_after, self._gathered = None, None
            self.step -= 1
            self.counters["speculative_steps"] += 1

    def _crop_to(self, past: int) -> bool:
        """Cut the cache back to `past` positions; False (and no more speculation) where a layer cannot."""
        try:
            for layer in self.cache.layers:
                extra = layer.get_seq_length() - past
                if extra > 0:
                    layer.crop(-extra)
            return True
        except Exception as error:  # a layer that cannot roll back (a full sliding window): stop speculating
            log.warning("dali shadow: cannot roll its cache back (%s); no more speculation", error)
            self.lookahead, self.cache = 0, None
            return False

    def _align(self, kv: list[torch.Tensor]) -> None:
        layers = [layer for layer in self.cache.layers if isinstance(getattr(layer, "keys", None), torch.Tensor)
                  and layer.keys.dim() == 4]
        if len(kv) != 2 * len(layers):
            return
        for layer, keys, values in zip(layers, kv[0::2], kv[1::2], strict=True):
            n = keys.shape[-2]
            layer.keys[..., -n:, :] = keys.to(layer.keys.dtype)
            layer.values[..., -n:, :] = values.to(layer.values.dtype)



class _EnoughLayers(Exception):
    """Ends a speculative step after the layers it was allowed to run."""
