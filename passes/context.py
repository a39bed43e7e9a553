"""What every pass receives besides the graph: config, real inputs, registry, report."""

from __future__ import annotations

from dataclasses import dataclass, field

from dali_compile.config import DaliConfig
from dali_compile.report import CompileReport
from dali_compile.runtime.registry import LayerRegistry


@dataclass(frozen=True)
class WeightBinding:
    """Graph input positions holding a rewritten layer's (up, down, up_bias, down_bias) tensors.

    The graph keeps those inputs; at each call the backend checks that they are
    still the tensors the layer handle points at, and rebinds the handle if the
    model's parameters were replaced, so a handle can never serve stale weights.
    """

    layer: int
    input_indices: tuple[int | None, ...]


@dataclass
class PassContext:
    config: DaliConfig
    example_inputs: list
    registry: LayerRegistry
    report: CompileReport
    bindings: list[WeightBinding] = field(default_factory=list)
    layout_cache: dict = field(default_factory=dict)
