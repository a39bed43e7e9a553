"""The routing half of the Triton expert kernels: group the T*K routed rows by expert, padded to the row
tile, as `_group_rows_kernel` (one program, small M) or its torch spec `group_rows_by_expert_torch` (any M).
Imported by `ops/triton_experts.py`, which launches it; like that module, it needs triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def max_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on row blocks after padding each expert's group to block_m (each block holds >= 1 row)."""
    return min(num_rows, triton.cdiv(num_rows, block_m) + min(num_experts, num_rows))


def group_rows_by_expert_torch(
    topk_ids: torch.Tensor, slot_of_expert: torch.Tensor, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing metadata in torch ops on the ids' device, without host syncs: the spec of `_group_rows_kernel`.

    topk_ids [T, K] int, slot_of_expert [E] int32 -> (sorted_rows [P] int32, block_slot [B] int32),
    B = max_blocks(M, E, block_m), P = B * block_m. Rows are grouped by expert in ascending expert
    order, each group keeps row order (stable sort) and is padded with M to a multiple of block_m;
    block_slot[b] is the pool slot of block b's expert, -1 for blocks past the last group. Rows of
    experts with slot -1 appear nowhere. About 30 small launches: the kernel replaces it for small M.
    """
    device = topk_ids.device
    M, E = topk_ids.numel(), slot_of_expert.numel()
    B = max_blocks(M, E, block_m)
    P = B * block_m
    ids = topk_ids.reshape(-1).long()
    slots = slot_of_expert.long()
    key = torch.where(slots[ids] >= 0, ids, E)  # E: computed elsewhere, sorts last
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(0, key, torch.ones_like(key))[:E]
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    group_start = torch.cumsum(counts, 0) - counts
    padded_start = (block_end - blocks) * block_m
    expert = sorted_key.clamp(max=E - 1)
    rank = torch.arange(M, device=device) - group_start[expert]
    dest = torch.where(sorted_key < E, padded_start[expert] + rank, P)  # P: a trash entry, cut below
    sorted_rows = torch.full((P + 1,), M, dtype=torch.int32, device=device)
    sorted_rows.scatter_(0, dest, order.to(torch.int32))
    block_expert = torch.searchsorted(block_end, torch.arange(B, device=device), right=True)
    block_slot = torch.where(block_expert < E, slots[block_expert.clamp(max=E - 1)], -1).to(torch.int32)
    return sorted_rows[:P], block_slot


# One program does the routing: fine for decode and small prefill (M rows in chunks, two passes), slower
# than the torch version's ~30 launches beyond this many rows, and its [chunk, BLOCK_E] tiles grow with E.
ROUTING_KERNEL_MAX_ROWS = 1024
ROUTING_KERNEL_MAX_EXPERTS = 1024


def routing_tiles(num_experts: int) -> tuple[int, int]:
    """(BLOCK_E, CHUNK) of `_group_rows_kernel`: a [CHUNK, BLOCK_E] one-hot tile of about 4096 entries."""
    block_e = max(16, triton.next_power_of_2(num_experts))
    return block_e, max(16, min(256, 4096 // block_e))


@triton.jit
def _group_rows_kernel(
    topk_ids_ptr, slot_of_expert_ptr, sorted_rows_ptr, block_slot_ptr,
    num_rows, num_experts, num_blocks,
    BM: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
):
    """`group_rows_by_expert_torch` in one program (grid (1,)), the same output bit for bit.

    Writes every entry of sorted_rows [B*BM] and block_slot [B] exactly once (real rows in pass 2,
    padding in pass 3), so no ordering between the program's threads is needed.
    """
    experts = tl.arange(0, BLOCK_E)
    # Pass 1: rows per expert, counting only experts that have a slot.
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, num_rows, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + rows, mask=rows < num_rows, other=0).to(tl.int32)
        slot = tl.load(slot_of_expert_ptr + ids, mask=rows < num_rows, other=-1)
        key = tl.where(slot >= 0, ids, BLOCK_E)  # BLOCK_E matches no expert column
        counts += tl.sum((key[:, None] == experts[None, :]).to(tl.int32), axis=0)
    blocks = (counts + BM - 1) // BM
    block_end = tl.cumsum(blocks, axis=0)
    padded_start = (block_end - blocks) * BM
    # Pass 2: each row's place = its group's padded start + rows of its expert before it.
    seen = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, num_rows, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + rows, mask=rows < num_rows, other=0).to(tl.int32)
        slot = tl.load(slot_of_expert_ptr + ids, mask=rows < num_rows, other=-1)
        key = tl.where(slot >= 0, ids, BLOCK_E)
        hit = (key[:, None] == experts[None, :]).to(tl.int32)
        earlier = tl.cumsum(hit, axis=0) - hit
        dest = tl.sum(hit * (earlier + (padded_start + seen)[None, :]), axis=1)
        tl.store(sorted_rows_ptr + dest, rows, mask=key < BLOCK_E)
        seen += tl.sum(hit, axis=0)
    # Pass 3: per block, its expert's slot, and padding (M) past the group's last row.
    filled_end = padded_start + counts
    for start in range(0, num_blocks, CHUNK):
        block = start + tl.arange(0, CHUNK)
        owner = tl.sum((block_end[None, :] <= block[:, None]).to(tl.int32), axis=1)  # searchsorted, right
        is_owner = (owner[:, None] == experts[None, :]).to(tl.int32)
        pad_from = tl.sum(is_owner * filled_end[None, :], axis=1)  # 0 past the last group: all padding
        slot = tl.load(slot_of_expert_ptr + owner, mask=owner < num_experts, other=-1)
        tl.store(block_slot_ptr + block, slot, mask=block < num_blocks)
        places = block[:, None] * BM + tl.arange(0, BM)[None, :]
        pad = (block[:, None] < num_blocks) & (places >= pad_from[:, None])
        tl.store(sorted_rows_ptr + places, tl.full((CHUNK, BM), 0, tl.int32) + num_rows, mask=pad)
