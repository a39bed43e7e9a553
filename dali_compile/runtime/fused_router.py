"""The residual prefetch's per-step path in one C call (csrc/core/prefetch.cpp): the next layer's router on
this layer's gate input plus the residual vector, and the prefetch choice from that routing.

# T tokens, H hidden, E experts, K top-k

In a decode loop the Python path (the router module's seven ATen ops, then the counts and the choice in
numpy) took ~50 us of host work per layer step, a third of the offload step's; the C call ~10. It serves
routers of one form, computed in fp32: p = softmax(x W^T + b) (b optional), its top k, divided by their sum
when `normalize` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; GPT-OSS's softmax over its top-k logits is the same
as the renormalised top k of the softmax). A router is recognised by running it on a probe input and
comparing its ids and weights with the form's (`form_reference`, the C kernel's specification); any other
router (DeepSeek's sigmoid with group-limited top-k, a router with hooks, one on another device) keeps the
module path. The forms' logits are not rounded
to the router's dtype as the module's are, so experts whose probabilities tie to the last bits may come in
another order: a prediction only ever costs time, never changes results.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/core/dtypes.h DType
PROBE_TOKENS = 16


@dataclass(frozen=True)
class RouterForm:
    normalize: bool  # the top k divided by their sum
    top_k: int
    weight: torch.Tensor  # [E, H], the router's own (read in place)
    bias: torch.Tensor | None  # [E] fp32 (a copy of the router's)


def form_reference(form: RouterForm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, K], weights [T, K] fp32) of the form on x [T, H], in plain fp32 torch: what the C call computes."""
    logits = x.float() @ form.weight.float().t()
    if form.bias is not None:
        logits = logits + form.bias
    values, ids = torch.topk(torch.softmax(logits, dim=-1), form.top_k, dim=-1)
    return ids, values / values.sum(dim=-1, keepdim=True) if form.normalize else values


def recognise(router: nn.Module, num_experts: int, hidden_size: int) -> RouterForm | None:
    """The form of `router`, if its output on a probe input is the form's, renormalised or not (same experts
    per token, weights within 1e-4); None otherwise."""
    from .prefetch import routing_of

    weight = getattr(router, "weight", None)
    bias = getattr(router, "bias", None)
    if (not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (num_experts, hidden_size)
            or weight.device.type != "cpu" or weight.dtype not in DTYPE_CODES or not weight.is_contiguous()):
        return None
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (num_experts,)):
        return None
    # The form does not depend on the dtype: a 16-bit router is probed as an fp32 copy, so that no logit rounded
    # to 16 bits ties with another at the top-k boundary (fp32 sums of the same products: within 1e-4).
    probed = router if weight.dtype == torch.float32 else copy.deepcopy(router).float()
    probe = torch.randn(PROBE_TOKENS, hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            ids, weights = routing_of(probed.forward(probe))
        except (TypeError, ValueError, RuntimeError):
            return None
        if weights is None or ids.shape[0] != PROBE_TOKENS or not 1 <= ids.shape[1] <= num_experts:
            return None
        fp32_bias = None if bias is None else bias.detach().float().contiguous()
        for normalize in (True, False):
            form = RouterForm(normalize, int(ids.shape[1]), weight, fp32_bias)
            if _same_routing((ids, weights), form_reference(form, probe), 1e-4):
                return form
    return None


def _same_routing(got, want, tolerance: float) -> bool:
    """Same experts per token (in any order) and their weights within `tolerance` (relative to the largest)."""
    (got_ids, got_weights), (want_ids, want_weights) = got, want
    got_order, want_order = got_ids.argsort(dim=-1), want_ids.argsort(dim=-1)
    if not torch.equal(got_ids.gather(-1, got_order), want_ids.gather(-1, want_order)):
        return False
    got_weights = got_weights.float().gather(-1, got_order)
    want_weights = want_weights.gather(-1, want_order)
    return bool(((got_weights - want_weights).abs().max() <= tolerance * want_weights.abs().max()).item())


class SlotTableAddresses:
    """The addresses of caches' slot tables (int32 [E], never reallocated) for C calls, each checked and taken
    once: numpy's `.ctypes` costs microseconds per access."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._known: dict[int, tuple[np.ndarray, int]] = {}  # id -> (a cache's slot_of_expert, address)

    def of(self, slots: np.ndarray) -> int | None:
        """The address of `slots`, or None for a table that is not a contiguous int32 [E]."""
        known = self._known.get(id(slots))
        if known is None or known[0] is not slots:
            if slots.dtype != np.int32 or slots.shape != (self.num_experts,) or not slots.flags.c_contiguous:
                return None
            known = self._known[id(slots)] = (slots, slots.ctypes.data)
        return known[1]


class _ChoiceOutputs:
    """What the C prefetch choices write (counts [E], mass [E], chosen experts), with the addresses taken once
    (numpy's `.ctypes` costs microseconds per access), and the caches' slot tables' addresses."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.counts = np.zeros(num_experts, dtype=np.int64)
        self.mass = np.zeros(num_experts, dtype=np.float64)
        self.chosen = np.zeros(num_experts, dtype=np.int64)
        self._outputs = tuple(a.ctypes.data for a in (self.counts, self.mass, self.chosen))
        self._slot_tables = SlotTableAddresses(num_experts)


def _cost_table(cost) -> tuple[int, int, int, int]:
    """The cost model's table as the C greedy reads it (addresses of cpu, gpu, key; top), zeros without one."""
    table = cost._table if cost is not None else None
    return (table.cpu_address, table.gpu_address, table.key_address, table.top) if table else (0, 0, 0, 0)


class NativePrefetchChoice(_ChoiceOutputs):
    """`prefetch_choice` over a routing the router module gave (`ResidualPredictor.predicted_routing`) in one C
    call (csrc/core/planner.cpp): the counts, the mass and the same experts in the same order, ~4 us against
    ~18 of numpy calls. `choose` returns None where the C path does not apply (no extension, a slot table that
    is not int32 [E], an id outside [0, E), a NaN weight, a workload past the cost table): the caller then takes
    the Python path."""

    def __init__(self, num_experts: int, count: int):
        from . import cpu_extension

        super().__init__(num_experts)
        self.function = cpu_extension.prefetch_choice_function()
        self.count = count
        # At most E can be chosen (`chosen` holds E), and a greedy allowed E copies is allowed every one
        self._count = min(count, num_experts)

    def choose(self, ids: torch.Tensor, weights: torch.Tensor | None, slot_of_expert: np.ndarray,
               cost) -> np.ndarray | None:
        """The experts prefetch_choice(counts, mass, slot_of_expert >= 0, cost, count) gives for the counts and
        mass of this routing (int64, a fresh array; `counts` and `mass` hold them until the next call), or
        None: take the Python path."""
        if not self.function:
            return None
        slots = self._slot_tables.of(slot_of_expert)
        if slots is None:
            return None
        ids = _on_host(ids, torch.int64)
        weights = None if weights is None else _on_host(weights, torch.float32)
        taken = self.function(ids.numel(), ids.data_ptr(), 0 if weights is None else weights.data_ptr(),
                              self.num_experts, slots, *_cost_table(cost), self._count, *self._outputs)
        return None if taken < 0 else self.chosen[:taken].copy()


def _on_host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as a contiguous CPU tensor of `dtype` (itself when it is one already)."""
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


class FusedPrefetch(_ChoiceOutputs):
    """The routing and the choice in one C call. `counts`, `mass` (and `ids`, `weights` for the first T * K
    entries) hold the last call's routing until the next call."""

    def __init__(self, num_experts: int):
        from . import cpu_extension

        super().__init__(num_experts)
        self.function = cpu_extension.predict_prefetch_function()
        self._reserve(64)
        self._no_slots = np.full(num_experts, -1, dtype=np.int32)  # for predict(): nothing cached

    def _reserve(self, pairs: int) -> None:
        self.ids = np.zeros(pairs, dtype=np.int64)
        self.weights = np.zeros(pairs, dtype=np.float32)
        self._pair_addresses = (self.ids.ctypes.data, self.weights.ctypes.data)

    def run(self, form: RouterForm, x: torch.Tensor, residual: torch.Tensor | None, slot_of_expert: np.ndarray | None,
            cost, count: int) -> int:
        """Route x [T, H] (a CPU tensor of a DTYPE_CODES dtype with unit stride in H) plus `residual` ([H] fp32
        contiguous, or None) and choose up to `count` experts to prefetch for a cache whose slot table is
        `slot_of_expert` (int32 [E]; None: nothing cached). How many were chosen (`chosen[:n]`), or -1 where the
        C path does not apply (the caller then takes the Python path)."""
        if not self.function or count > self.num_experts:
            return -1
        T, K = x.shape[0], form.top_k
        if T * K > self.ids.shape[0]:
            self._reserve(max(T * K, 2 * self.ids.shape[0]))
        slots = self._slot_tables.of(self._no_slots if slot_of_expert is None else slot_of_expert)
        if slots is None:
            return -1
        return self.function(
            T, x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0) if T > 1 else x.shape[1],
            0 if residual is None else residual.data_ptr(), form.weight.data_ptr(), DTYPE_CODES[form.weight.dtype],
            0 if form.bias is None else form.bias.data_ptr(), self.num_experts, x.shape[1], K, int(form.normalize),
            slots, *_cost_table(cost), count, *self._pair_addresses, *self._outputs)
