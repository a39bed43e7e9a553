"""Who does what in the distributed mode: ranks, groups, and which worker serves which expert.

    rank 0            main: the whole model but the routed experts' compute
    rank 1            shadow (only with predictor="shadow"): the model at lower precision, running ahead
    the other ranks   workers, in G groups: worker w (0-based among workers) is in group w mod G

Group g serves the MoE layers l with l mod G == g (OD-MoE's round-robin), so while group g computes layer l
the groups of layers l+1 .. l+G-1 can already load. Inside a group the experts are split by id: the i-th of
the group's n workers owns the experts e with e mod n == i, for every layer of the group, and holds only
those in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass

MAIN_RANK = 0


@dataclass(frozen=True)
class Topology:
    world_size: int
    groups: int
    shadow: bool

    def __post_init__(self):
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"dali distributed: groups must be an int >= 1, got {self.groups!r}")
        if self.num_workers < 1:
            roles = "main and shadow" if self.shadow else "main"
            raise ValueError(f"dali distributed: {self.world_size} processes leave no worker after the {roles} "
                             f"rank{'s' if self.shadow else ''}; start at least {2 + self.shadow} (torchrun "
                             "--nproc-per-node)")
        if self.groups > self.num_workers:
            raise ValueError(f"dali distributed: {self.groups} groups but {self.num_workers} worker"
                             f"{'s' if self.num_workers > 1 else ''}: every group needs at least one worker "
                             f"(start {1 + self.shadow + self.groups} processes or fewer groups)")

    @property
    def shadow_rank(self) -> int | None:
        return 1 if self.shadow else None

    @property
    def first_worker(self) -> int:
        return 2 if self.shadow else 1

    @property
    def num_workers(self) -> int:
        return self.world_size - self.first_worker

    @property
    def worker_ranks(self) -> list[int]:
        return list(range(self.first_worker, self.world_size))

    def role(self, rank: int) -> str:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"dali distributed: rank {rank} outside a world of {self.world_size}")
        return "main" if rank == MAIN_RANK else "shadow" if rank == self.shadow_rank else "worker"

    def group_of_worker(self, rank: int) -> int:
        return (rank - self.first_worker) % self.groups

    def group_of_layer(self, layer: int) -> int:
        return layer % self.groups

    def workers_of_group(self, group: int) -> list[int]:
        return [rank for rank in self.worker_ranks if self.group_of_worker(rank) == group]

    def workers_of_layer(self, layer: int) -> list[int]:
        return self.workers_of_group(self.group_of_layer(layer))

    def layers_of_worker(self, rank: int, num_layers: int) -> list[int]:
        return [layer for layer in range(num_layers) if self.group_of_layer(layer) == self.group_of_worker(rank)]

    def experts_of_worker(self, rank: int, layer: int, num_experts: int) -> list[int]:
        """The experts of `layer` that worker `rank` owns (none for a layer of another group): local expert i of
        the worker is global expert experts[i], so i = global // (workers in the group) (`local_ids`)."""
        workers = self.workers_of_layer(layer)
        if rank not in workers:
            return []
        return list(range(workers.index(rank), num_experts, len(workers)))

    def owned(self, rank: int, layer: int, expert_ids):
        """Elementwise over a tensor of expert ids of `layer`: whether worker `rank` (of the layer's group) owns
        each, by `experts_of_worker`'s rule."""
        workers = self.workers_of_layer(layer)
        return expert_ids % len(workers) == workers.index(rank)

    def local_ids(self, layer: int, expert_ids):
        """The owning worker's local ids of `layer`'s global expert ids (its experts in `experts_of_worker` order)."""
        return expert_ids // len(self.workers_of_layer(layer))

    def owner(self, layer: int, expert: int) -> int:
        workers = self.workers_of_layer(layer)
        return workers[expert % len(workers)]

    def describe(self) -> str:
        groups = "; ".join(f"group {g}: ranks {self.workers_of_group(g)}" for g in range(self.groups))
        shadow = f", shadow rank {self.shadow_rank}" if self.shadow else ""
        return f"main rank {MAIN_RANK}{shadow}, {self.num_workers} workers in {self.groups} groups ({groups})"
