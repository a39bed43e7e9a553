"""Small models written in plain PyTorch (no transformers), for pass tests.

# T tokens, H hidden, K top-k, E experts, I intermediate
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class StackedExperts(nn.Module):
    """gpt-fast style: gather each token's experts from stacked 3-D weights, return per-slot outputs."""

    def __init__(self, E: int, H: int, I: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.randn(E, 2 * I, H) * 0.3)  # [E, 2I, H] gate rows then up rows
        self.w2 = nn.Parameter(torch.randn(E, H, I) * 0.3)  # [E, H, I]

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        w13 = self.w13[expert_indices]  # [T, K, 2I, H]
        w2 = self.w2[expert_indices]  # [T, K, H, I]
        gate, up = torch.einsum("th,tkoh->tko", x, w13).chunk(2, dim=-1)
        return torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, w2)  # [T, K, H]


class HandWrittenMoE(nn.Module):
    def __init__(self, E: int = 6, K: int = 2, H: int = 16, I: int = 24):
        super().__init__()
        self.k = K
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = StackedExperts(E, H, I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores = F.softmax(self.gate(flat), dim=-1)
        weights, ids = torch.topk(scores, self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(flat, ids)
        return torch.einsum("tkh,tk->th", out, weights).view_as(x)


class HandWrittenLM(nn.Module):
    """Embedding, two residual MoE blocks, a head: the pass must find both MoE layers."""

    def __init__(self, vocab: int = 50, H: int = 16, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, H)
        self.norms = nn.ModuleList(nn.LayerNorm(H) for _ in range(layers))
        self.moes = nn.ModuleList(HandWrittenMoE(H=H) for _ in range(layers))
        self.head = nn.Linear(H, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for norm, moe in zip(self.norms, self.moes, strict=True):
            x = x + moe(norm(x))
        return self.head(x)


class DenseMLP(nn.Module):
    def __init__(self, H: int = 16, I: int = 32):
        super().__init__()
        self.up = nn.Linear(H, 2 * I)
        self.down = nn.Linear(I, H)

    def forward(self, x):
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class StackedHeadAttention(nn.Module):
    """Per-head projections stored as stacked 3-D tensors [heads, H, d]: stacked weights, but no routing."""

    def __init__(self, H: int = 16, heads: int = 4):
        super().__init__()
        d = H // heads
        self.wq = nn.Parameter(torch.randn(heads, H, d) * 0.3)
        self.wk = nn.Parameter(torch.randn(heads, H, d) * 0.3)
        self.wv = nn.Parameter(torch.randn(heads, H, d) * 0.3)

    def forward(self, x):  # x [T, H]
        q = torch.einsum("th,nhd->ntd", x, self.wq)
        k = torch.einsum("th,nhd->ntd", x, self.wk)
        v = torch.einsum("th,nhd->ntd", x, self.wv)
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return (attn @ v).transpose(0, 1).reshape(x.shape)


class TopKTokenPooling(nn.Module):
    """top-k over tokens (which tokens to keep), then a lookup in a stacked table: top-k, but no routing."""

    def __init__(self, H: int = 16, K: int = 3, slots: int = 5):
        super().__init__()
        self.k = K
        self.score = nn.Linear(H, 1)
        self.table = nn.Parameter(torch.randn(slots, H, H) * 0.3)
        self.bank = nn.Parameter(torch.randn(slots, H, H) * 0.3)

    def forward(self, x):  # x [T, H]
        top = torch.topk(self.score(x).squeeze(-1), self.k).indices  # [K] token indices
        kept = x[top]  # [K, H]
        slot = top % self.table.shape[0]
        return torch.einsum("kh,kho->ko", kept, self.table[slot] + self.bank[slot]).sum(0)
