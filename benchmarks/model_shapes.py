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

    @property
    def bytes(self) -> int:
        """One expert's gate, up and down projections in bf16."""
        return 3 * self.hidden * self.intermediate * 2

    @property
    def flop_per_token(self) -> int:
        """One expert's FLOPs for one token (three matrix-vector products)."""
        return 6 * self.hidden * self.intermediate


MODELS = (
    ModelShape("mixtral-8x7b", 4096, 14336, 8, 2),
    ModelShape("qwen3-30b-a3b", 2048, 768, 128, 8),
    ModelShape("deepseek-v2-lite", 2048, 1408, 64, 6),
    ModelShape("olmoe", 2048, 1024, 64, 8),
)


def model_shape(name: str) -> ModelShape:
    for shape in MODELS:
        if shape.name == name:
            return shape
    raise KeyError(f"no model shape {name!r}; known: {', '.join(m.name for m in MODELS)}")
