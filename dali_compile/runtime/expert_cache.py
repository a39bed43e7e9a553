"""GPU expert memory: one pool of expert slots for all MoE layers, split into per-layer caches and
staging slots shared by the layers.

# N slots, E experts per layer, X = 2I (gated) or I

    SlotPool     up [N, X, H] (transposed [N, H, X]), down [N, H, I] (transposed [N, I, H]), biases
                 [N, X] and [N, H]: allocated once from the accelerator's budget (a hard limit).
    LayerCache   the slots one layer owns: which expert sits in which slot (the pool keeps each slot's
                 latest copy event).
    plan_slots   the policy's split of a budget into cache and staging slots, with the checks that
                 can refuse an offload before anything changes.

All layers share one pool so that a GPU expert kernel reads any layer's cache and staging slots
through one slot table (`slot_of_expert[E]`, -1: not on the GPU). Only the copy into a slot
changes its contents, and the runtime orders every copy after the compute that last read the slot.

The pool is the ground truth of what each slot holds (`SlotPool.contents`): a slot is marked unknown
before a copy into it is issued and takes its new contents only once the copy is, so an exception or an
interrupt at any point leaves no slot claiming weights it may not hold, and the tables of a step that
failed half-way can be rebuilt from it (`LayerCache.resync`).
"""

from __future__ import annotations

import numpy as np
import torch

from .accelerator import DONE, Accelerator, Event, ExpertMemoryError
from .layer_spec import LayerSpec
from .policies import Policy, SlotPlan


def expert_bytes(spec: LayerSpec) -> int:
    """Bytes of one expert's weights (and biases): the size of one slot."""
    return sum(t[0].numel() * t.element_size() for t in spec.tensors() if t is not None)


def same_expert_shape(a: LayerSpec, b: LayerSpec) -> bool:
    def kind(s: LayerSpec):
        return s.dtype, s.layout.has_bias, [None if t is None else tuple(t.shape[1:]) for t in s.tensors()]

    return kind(a) == kind(b)


class SlotPool:
    """`num_slots` expert-sized slots on the accelerator, shaped like `template`'s experts."""

    def __init__(self, accelerator: Accelerator, template: LayerSpec, num_slots: int):
        self.accelerator = accelerator
        self.num_slots = num_slots
        self.slot_bytes = expert_bytes(template)
        self.tensors = tuple(
            None if t is None else accelerator.allocate((num_slots, *t.shape[1:]), t.dtype, f"{num_slots} expert slots")
            for t in template.tensors()
        )
        self.bytes_copied = 0
        # (owner, expert) each slot holds once its latest copy completes; None: free, or unknown.
        self.contents: list[tuple[int, int] | None] = [None] * num_slots
        self.loading: dict[int, Event] = {}  # slot -> its latest copy

    @property
    def up(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def down(self) -> torch.Tensor:
        return self.tensors[1]

    @property
    def up_bias(self) -> torch.Tensor | None:
        return self.tensors[2]

    @property
    def down_bias(self) -> torch.Tensor | None:
        return self.tensors[3]

    @property
    def up_scales(self) -> torch.Tensor | None:
        return self.tensors[4]

    @property
    def down_scales(self) -> torch.Tensor | None:
        return self.tensors[5]

    def load(self, slot: int, source: LayerSpec, expert: int, after: Event | None, owner: int | None = None) -> Event:
        """Copy expert `expert` of the host layer `source` into `slot`, after compute point `after`; the slot
        then holds (owner, expert) (None: a scratch copy nobody may read as an expert)."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
        self.contents[slot] = None  # from here until the copy is issued, nobody knows what the slot holds
        events = [
            self.accelerator.copy_async(dst[slot], src[expert].detach(), after)
            for dst, src in zip(self.tensors, source.tensors(), strict=True)
            if dst is not None
        ]
        self.loading[slot] = events[-1]  # the copy stream runs in order: the last copy done means all are
        self.contents[slot] = None if owner is None else (owner, expert)
        self.bytes_copied += self.slot_bytes
        return events[-1]

    def holds(self, slot: int, owner: int, expert: int) -> bool:
        return self.contents[slot] == (owner, expert)

    def copy_event(self, slot: int) -> Event:
        """The latest copy into `slot` (what a compute reading it must wait for)."""
        return self.loading.get(slot, DONE)

    def settle(self) -> None:
        """After the accelerator has synchronized: a slot whose copy failed holds nothing known."""
        for slot, event in list(self.loading.items()):
            try:
                event.synchronize()
            except Exception:  # noqa: BLE001  (the copy's own error was reported where it happened)
                self.contents[slot] = None
        self.loading.clear()


class LayerCache:
    """The cache slots of one layer: expert <-> slot."""

    def __init__(self, pool: SlotPool, slots: list[int], num_experts: int, owner: int | None = None):
        self.pool = pool
        self.slots = list(slots)
        self.num_experts = num_experts
        self.owner = id(self) if owner is None else owner  # how the pool tags this cache's slots
        self.slot_of_expert = np.full(num_experts, -1, dtype=np.int32)
        self.expert_in_slot: dict[int, int] = {}
        self._resident: np.ndarray | None = None  # sorted cached experts, rebuilt after an install

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def resident(self) -> np.ndarray:
        """The cached experts, ascending (read-only: the same array until the next install)."""
        if self._resident is None:
            self._resident = np.flatnonzero(self.slot_of_expert >= 0).astype(np.int64)
            self._resident.flags.writeable = False
        return self._resident

    def install(self, expert: int, victim: int, source: LayerSpec, after: Event | None) -> int:
        """Copy `expert` into the cache in place of `victim` (-1: a free slot); returns its slot."""
        if self.slot_of_expert[expert] >= 0:
            raise ValueError(f"expert {expert} is already cached")
        if victim < 0:
            free = [s for s in self.slots if s not in self.expert_in_slot]
            if not free:
                raise ExpertMemoryError(f"no free cache slot for expert {expert} ({self.capacity} slots)")
            slot = free[0]
        else:
            slot = int(self.slot_of_expert[victim])
            if slot < 0:
                raise ValueError(f"victim expert {victim} is not cached")
            # The victim leaves the tables before the copy starts overwriting it: if the copy raises, the
            # slot is free, never "the victim" with half of another expert's weights.
            self.slot_of_expert[victim] = -1
            del self.expert_in_slot[slot]
            self._resident = None
        self.pool.load(slot, source, expert, after, owner=self.owner)  # its event: pool.copy_event(slot)
        self.slot_of_expert[expert] = slot
        self.expert_in_slot[slot] = expert
        self._resident = None
        return slot

    def resync(self) -> None:
        """Rebuild the tables from what the pool says this cache's slots hold (after a step that failed or was
        interrupted half-way, once the accelerator has synchronized and the pool has settled)."""
        self.slot_of_expert[:] = -1
        self.expert_in_slot.clear()
        for slot in self.slots:
            held = self.pool.contents[slot]
            if held is not None and held[0] == self.owner and self.slot_of_expert[held[1]] < 0:
                self.slot_of_expert[held[1]] = slot
                self.expert_in_slot[slot] = held[1]
        self._resident = None



def plan_slots(policy: Policy, layers: list[tuple[str, LayerSpec]], budget_bytes: int, top_k: int,
               reserved_slots: int = 0) -> SlotPlan:
    """The policy's split of the budget into cache and staging slots, after the checks that can refuse an
    offload: no MoE layer, layers of mixed expert shapes, a budget below one expert slot (for a policy that
    uses the GPU), a plan over budget. `reserved_slots` (prefetch slots) come off the budget first. Touches
    nothing, so offload() calls it before changing the model."""
    if not layers:
        raise ValueError("offload: the model has no MoE experts layer dali can run")
    template = layers[0][1]
    for name, spec in layers[1:]:
        if not same_expert_shape(spec, template):
            raise ValueError(f"offload: MoE layer {name} has experts of another shape or dtype than "
                             f"{layers[0][0]}; layers of mixed expert shapes are not supported yet")
    slot_bytes = expert_bytes(template)
    budget_slots = budget_bytes // slot_bytes - reserved_slots
    if policy.uses_gpu and budget_slots < 1:
        raise ExpertMemoryError(
            f"offload: the expert memory budget ({budget_bytes} bytes) is below one expert slot ({slot_bytes} "
            f"bytes), the least policy {policy.name!r} needs to run an expert on the GPU; raise expert_memory "
            "or use policy='all_cpu'"
        )
    plan = policy.slot_plan(budget_slots, len(layers), template.num_experts, top_k)
    if plan.total > budget_slots or len(plan.cache_slots) != len(layers):
        raise ExpertMemoryError(f"policy {policy.name!r} planned {plan} for {len(layers)} layers, "
                                f"over the budget of {budget_slots} slots")
    return plan


def fitting_prefetch_count(policy: Policy, layers: list[tuple[str, LayerSpec]], budget_bytes: int,
                           prefetch: int) -> int:
    """P, reduced so that the two sets of P prefetch slots leave the policy at least one slot (0 for a policy
    that never uses the GPU)."""
    if not policy.uses_gpu or not layers or len(layers) < 2:
        return 0
    budget_slots = budget_bytes // expert_bytes(layers[0][1])
    return max(0, min(prefetch, (budget_slots - 1) // 2))
