"""What the backend did to each graph: MoE layers rewritten, regions refused and why.

    import dali_compile
    compiled(inputs)
    print(dali_compile.last_report())      # the most recent graph
    for r in dali_compile.reports(): ...   # every graph compiled in this process, oldest first
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger("dali_compile")

_MAX_KEPT = 256


@dataclass(frozen=True)
class RewrittenLayer:
    scope: str  # module path of the experts, e.g. "model.layers.3.mlp.experts"
    layer: int  # the registry handle the dali::moe_hybrid call carries
    num_experts: int
    hidden_size: int
    intermediate_size: int
    layout: str


@dataclass(frozen=True)
class RefusedLayer:
    scope: str
    reason: str
    graph_broken: bool = False


@dataclass
class CompileReport:
    graph_index: int
    rewritten: list[RewrittenLayer] = field(default_factory=list)
    refused: list[RefusedLayer] = field(default_factory=list)
    inductor: bool = True
    prefetch_hooks: list[int] = field(default_factory=list)  # layers whose gate input starts a prefetch
    cpu_linears: int = 0  # linear calls sent to dali::cpu_linear
    cpu_attention: int = 0  # attention calls sent to dali::cpu_attention

    @property
    def num_rewritten(self) -> int:
        return len(self.rewritten)

    def __str__(self) -> str:
        lines = [
            f"dali graph {self.graph_index}: {len(self.rewritten)} MoE layer(s) rewritten, "
            f"{len(self.refused)} refused; rest of the graph -> {'inductor' if self.inductor else 'eager FX'}"
        ]
        for r in self.rewritten:
            lines.append(
                f"  rewritten {r.scope} -> dali::moe_hybrid(layer={r.layer}) "
                f"E={r.num_experts} H={r.hidden_size} I={r.intermediate_size} [{r.layout}]"
            )
        for r in self.refused:
            lines.append(f"  refused   {r.scope}: {r.reason}")
        if self.prefetch_hooks:
            lines.append(f"  prefetch hooks after the gate inputs of layers {self.prefetch_hooks}")
        if self.cpu_linears:
            lines.append(f"  {self.cpu_linears} CPU linear(s) -> dali::cpu_linear")
        if self.cpu_attention:
            lines.append(f"  {self.cpu_attention} CPU decode attention call(s) -> dali::cpu_attention")
        return "\n".join(lines)


_REPORTS: list[CompileReport] = []


def new_report(inductor: bool) -> CompileReport:
    report = CompileReport(graph_index=len(_REPORTS) and _REPORTS[-1].graph_index + 1, inductor=inductor)
    _REPORTS.append(report)
    del _REPORTS[:-_MAX_KEPT]
    return report


def publish(report: CompileReport) -> None:
    logger.info("%s", report)
    for refused in report.refused:
        logger.warning("dali: MoE region %s left as it was: %s", refused.scope, refused.reason)


def last_report() -> CompileReport | None:
    """The report of the most recent graph the dali backend compiled, or None."""
    return _REPORTS[-1] if _REPORTS else None


def reports() -> list[CompileReport]:
    """Reports of the graphs compiled in this process (the latest 256), oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()
