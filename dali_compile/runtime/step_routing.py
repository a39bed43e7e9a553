"""A layer step's active experts from its routed ids: what the policy sees of the routing.

# T tokens, K top-k, E experts, n active experts

From the step's [T, K] expert ids (on the host) and the layer's slot table (int32 [E], -1: not cached):
the active experts ascending, the tokens routed to each (its workload), whether each is cached, and how
many are. At decode this runs once per MoE layer and token, on a few ids; numpy's bincount, nonzero and
fancy indexing took ~40 us of host work per layer step in a real decode (caches cold from the rest of the
model), one C call (csrc/core/planner.cpp) a few. The numpy path is the reference, and serves where the C
one does not apply (no extension, ids that are not int64) and raises the errors for ids outside [0, E).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .fused_router import SlotTableAddresses


class ActiveExperts(NamedTuple):
    experts: np.ndarray  # int64 [n], ascending
    workloads: np.ndarray  # int64 [n], >= 1
    cached: np.ndarray  # bool [n]
    hits: int  # cached.sum()


def active_experts_reference(flat_ids: np.ndarray, slot_of_expert: np.ndarray, layer_name: str) -> ActiveExperts:
    """The numpy path: IndexError for an id outside [0, E) (E = len(slot_of_expert))."""
    E = slot_of_expert.shape[0]
    try:
        counts = np.bincount(flat_ids, minlength=E)
    except ValueError:  # numpy refuses negative values
        lowest = int(flat_ids.min())
        raise IndexError(f"dali::moe_hybrid: negative expert id {lowest} for layer {layer_name}") from None
    if counts.shape[0] > E:
        raise IndexError(f"dali::moe_hybrid: expert id {counts.shape[0] - 1} out of range for layer {layer_name} "
                         f"with {E} experts")
    experts = counts.nonzero()[0].astype(np.int64, copy=False)
    cached = slot_of_expert[experts] >= 0
    return ActiveExperts(experts, counts[experts], cached, int(np.count_nonzero(cached)))


class StepRouting:
    """`active_experts` for one layer (E experts), with its output buffers and their addresses made once."""

    def __init__(self, num_experts: int, layer_name: str):
        from . import cpu_extension

        self.layer_name = layer_name
        self._function = cpu_extension.step_routing_function()
        # The same count reading the numpy arrays themselves and returning fresh ones (the CPython module's)
        self._arrays = cpu_extension.python_only_function("dali_step_routing_arrays")
        self._active = np.zeros((3, num_experts), dtype=np.int64)  # experts, workloads, cached flags
        self._hits = np.zeros(1, dtype=np.int64)
        self._addresses = (self._active.ctypes.data, self._hits.ctypes.data)
        self._slot_tables = SlotTableAddresses(num_experts)

    def active_experts(self, ids: torch.Tensor, slot_of_expert: np.ndarray) -> ActiveExperts:
        """The active experts of the routed ids `ids` (a CPU int tensor, any shape) for a cache whose slot table
        is `slot_of_expert` (int32 [E]); fresh arrays the caller may keep."""
        if self._arrays is not None:
            got = self._arrays(ids.numpy(), slot_of_expert)
            if got is not None:  # None: another dtype or layout, for the address path below
                if got == -1:  # an id outside [0, E): the reference raises the error naming it
                    return active_experts_reference(ids.numpy().reshape(-1), slot_of_expert, self.layer_name)
                experts, workloads, cached, hits = got
                return ActiveExperts(np.frombuffer(experts, dtype=np.int64), np.frombuffer(workloads, dtype=np.int64),
                                     np.frombuffer(cached, dtype=np.bool_), hits)
        slots = self._slot_tables.of(slot_of_expert)
        if not self._function or slots is None or ids.dtype != torch.int64 or not ids.is_contiguous():
            return active_experts_reference(ids.numpy().reshape(-1), slot_of_expert, self.layer_name)
        n = self._function(ids.numel(), ids.data_ptr(), self._active.shape[1], slots, *self._addresses)
        if n < 0:  # an id outside [0, E): the reference raises the error naming it
            return active_experts_reference(ids.numpy().reshape(-1), slot_of_expert, self.layer_name)
        rows = self._active[:, :n].copy()
        return ActiveExperts(rows[0], rows[1], rows[2].astype(np.bool_), int(self._hits[0]))
