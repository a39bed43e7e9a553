"""The expert shapes of the real MoE models the benchmarks measure at: one table for all of them.

# H hidden, I one expert's intermediate size, E routed experts, K experts per token

Imported by the benchmark scripts (`python benchmarks/<name>.py` puts this folder on sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int  # H
    intermediate: int  # I (one expert's)
    experts: int  # E
    top_k: int  # K: active experts of one token
    moe_layers: int = 0  # L (benchmarks/simulate_pc.py)
    # Weights of one MoE layer besides its routed experts (attention, router, shared experts), and the
    # embedding table's rows (the lm_head reads as many again): what a GPU keeps resident (simulate_pc.py).
    dense_params_per_layer: int = 0
    vocab: int = 0

    @property
    def bytes(self) -> int:
        """One expert's gate, up and down projections in bf16."""
        return 3 * self.hidden * self.intermediate * 2

    @property
    def flop_per_token(self) -> int:
        """One expert's FLOPs for one token (three matrix-vector products)."""
        return 6 * self.hidden * self.intermediate


    @property
    def non_expert_bytes(self) -> int:
        """Every weight but the routed experts, bf16: the layers' dense parts, embedding and lm_head."""
        return (self.moe_layers * self.dense_params_per_layer + 2 * self.vocab * self.hidden) * 2


# Dense parameters per MoE layer, from the models' configs (bf16 counts, biases and norms left out):
# Mixtral: q, o 4096x4096, k, v 4096x1024, router 4096x8. Qwen3-30B-A3B: q 2048x4096, o 4096x2048, k, v
# 2048x512, router 2048x128. DeepSeek-V2-Lite (26 MoE layers of 27): MLA q 2048x3072, kv_a 2048x576,
# kv_b 512x4096, o 2048x2048, two shared experts 3 x 2048 x 1408 each, router 2048x64. OLMoE: q, k, v, o
# 2048x2048, router 2048x64.
MODELS = (
    ModelShape("mixtral-8x7b", 4096, 14336, 8, 2, 32, 4096 * (2 * 4096 + 2 * 1024 + 8), 32000),
    ModelShape("qwen3-30b-a3b", 2048, 768, 128, 8, 48, 2048 * (2 * 4096 + 2 * 512 + 128), 151936),
    ModelShape("deepseek-v2-lite", 2048, 1408, 64, 6, 26,
               2048 * (3072 + 576 + 2048 + 64) + 512 * 4096 + 2 * 3 * 2048 * 1408, 102400),
    ModelShape("olmoe", 2048, 1024, 64, 8, 16, 2048 * (4 * 2048 + 64), 50304),
)


def model_shape(name: str) -> ModelShape:
    for shape in MODELS:
        if shape.name == name:
            return shape
    raise KeyError(f"no model shape {name!r}; known: {', '.join(m.name for m in MODELS)}")
