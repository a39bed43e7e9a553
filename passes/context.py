"""What every pass receives besides the graph: config, real inputs, registry, report."""

from __future__ import annotations

from dataclasses import dataclass, field

from dali_compile.config import DaliConfig
from dali_compile.report import CompileReport
from dali_compile.runtime.layer_spec import ExpertLayout
from dali_compile.runtime.registry import LayerRegistry


@dataclass(frozen=True)
class WeightBinding:
    """Graph input positions holding a rewritten layer's (up, down, up_bias, down_bias) tensors.

    The graph keeps those inputs; at each call the backend checks that they are
    still the tensors the layer handle points at. When they are not (another
    model instance behind the same graph, or replaced parameters), it resolves
    them to their own handle, registering them with `layout` if needed, and
    redirects `layer` there for that call and thread only, so a handle never
    serves another call's weights. The registry holds the tensors weakly: the
    graph keeps no model alive.
    """

    layer: int
    input_indices: tuple[int | None, ...]
    layout: ExpertLayout
    name: str = ""


@dataclass
class PassContext:
    config: DaliConfig
    example_inputs: list
    registry: LayerRegistry
    report: CompileReport
    bindings: list[WeightBinding] = field(default_factory=list)
    layout_cache: dict = field(default_factory=dict)
