"""Decide what a captured experts region computes, by running it.

Shapes narrow the candidates (which tensor is up/down, transposed or not,
gated or not); the region's own ops hint the activation (F.silu, F.gelu with its
`approximate`, clamp bounds and scalar factors for GPT-OSS's clamped SwiGLU).
Each candidate `ExpertLayout` is then checked numerically: the region, cut out
as a small graph module, runs on random routing against `moe_reference` with
the model's real weights. The first candidate that reproduces the region at two
input scales (the larger one drives activations into their clamps) is the
layout; if none does, the region is refused and stays as it was. So a layout is
never guessed from names, and a region we do not understand is never rewritten.

# T tokens, H hidden, K top-k, E experts, I intermediate, X = 2I or I
"""

from __future__ import annotations

import itertools
import operator

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from dali_compile.ops.expert_math import moe_reference
from dali_compile.runtime.layer_spec import CLAMPED_ACTIVATIONS, Activation, ExpertLayout, LayerSpec

from .find_moe_regions import MoeRegion, example_value

# Relative L2 error below which the region and a candidate agree, by probe dtype. A wrong
# layout with random weights is off by O(1); these bounds sit far above each dtype's
# rounding noise through two matmuls and far below that.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 4e-2}
PROBE_SCALES = (1.0, 8.0)

_ELEMENTWISE = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "quick_gelu")


def concrete_value(value):
    """The traced example's value of a (possibly symbolic) int/float/bool."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = value.node.hint
        if hint is None:
            raise ValueError("a data-dependent scalar feeds the experts region")
        value = hint
    return value


def concrete_int(value) -> int:
    return int(concrete_value(value))


def _scalar(arg) -> float | None:
    """A number in a node's arguments: a Python constant, or a symbolic scalar node dynamo made of one."""
    if isinstance(arg, Node):
        value = example_value(arg)
        if not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) or isinstance(value, bool):
            return None
        arg = concrete_value(value)
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    return None


def region_signature(region: MoeRegion) -> tuple:
    """Identical for two layers built from the same code and shapes (so one probe serves both)."""
    index = {n: i for i, n in enumerate(region.nodes)}

    def arg_key(arg):
        return map_arg(arg, lambda n: f"%{index.get(n, 'in')}")

    body = tuple((n.op, str(n.target), repr(arg_key(n.args)), repr(arg_key(n.kwargs))) for n in region.nodes)
    tensors = tuple((tuple(w.value.shape), w.value.dtype) for w in region.weights + region.biases)
    return body, tensors


def _activation_hints(region: MoeRegion) -> list[Activation]:
    """Activations suggested by the region's ops, most specific first."""
    hints: list[Activation] = []
    targets = {n.target for n in region.nodes}
    methods = {n.target for n in region.nodes if n.op == "call_method"}
    clamps = [n for n in region.nodes if n.target in ("clamp", torch.clamp, torch.clip, "clip")]
    if clamps:
        limits = sorted({v for n in clamps for v in _clamp_bounds(n)}, key=abs, reverse=True)
        factors = {v for n in region.nodes if n.target in (operator.mul, torch.mul, "mul")
                   for v in map(_scalar, n.args) if v is not None}
        positive_limits = [abs(v) for v in limits if v != 0]
        for limit, alpha in itertools.product(positive_limits, sorted(factors)):
            hints.append(Activation("clamped_swiglu", alpha=alpha, limit=limit))
        hints.extend(Activation("clamped_silu", limit=limit) for limit in positive_limits)
    for node in region.nodes:
        if node.target in (F.gelu, torch._C._nn.gelu):
            tanh = node.kwargs.get("approximate", "none") == "tanh"
            hints.append(Activation("gelu_tanh" if tanh else "gelu"))
    if targets & {F.silu, torch.nn.functional.silu} or "silu" in methods:
        hints.append(Activation("silu"))
    if targets & {F.relu, torch.relu} or "relu" in methods:
        hints.extend([Activation("relu2"), Activation("relu")])
    if targets & {torch.sigmoid, F.sigmoid} or "sigmoid" in methods:
        hints.extend([Activation("quick_gelu"), Activation("silu")])
    ordered = list(dict.fromkeys(hints))
    return ordered + [Activation(a) for a in _ELEMENTWISE if Activation(a) not in ordered]


def _clamp_bounds(node: Node) -> list[float]:
    values = list(node.args[1:]) + [node.kwargs.get("min"), node.kwargs.get("max")]
    return [v for v in map(_scalar, values) if v is not None]


def candidate_layouts(region: MoeRegion, hidden_size: int):
    """(layout, up, down, up_bias, down_bias) tuples consistent with the tensors' shapes."""
    if len(region.weights) != 2 or len(region.biases) not in (0, 2):
        return []
    activations = _activation_hints(region)
    out = []
    for up, down in (region.weights, region.weights[::-1]):
        u, d = up.value.shape, down.value.shape
        for transposed in (False, True):
            u_h, x = (u[1], u[2]) if transposed else (u[2], u[1])
            d_i, d_h = (d[1], d[2]) if transposed else (d[2], d[1])
            if u_h != hidden_size or d_h != hidden_size:
                continue
            gate_options = [g for g in (True, False) if x == (2 * d_i if g else d_i)]
            for gated in gate_options:
                biases = [(None, None)]
                if region.biases:
                    b0, b1 = region.biases
                    biases = [(b.value, c.value) for b, c in ((b0, b1), (b1, b0))
                              if b.value.shape[1] == x and c.value.shape[1] == hidden_size]
                interleavings = (False, True) if gated else (False,)
                for (up_bias, down_bias), interleaved in itertools.product(biases, interleavings):
                    for act in activations:
                        if act.name in CLAMPED_ACTIVATIONS and not gated:
                            continue
                        layout = ExpertLayout(act, gated, interleaved, transposed, has_bias=up_bias is not None)
                        out.append((layout, up.value, down.value, up_bias, down_bias))
    return out


def extract_region(gm: GraphModule, region: MoeRegion) -> tuple[GraphModule, list[Node]]:
    """The region as its own graph module; returns it and the outer nodes its inputs stand for."""
    graph = Graph()
    env: dict[Node, Node] = {}
    inputs: list[Node] = []

    def lookup(node: Node) -> Node:
        if node not in env:
            inputs.append(node)
            env[node] = graph.placeholder(f"in_{len(inputs)}")
        return env[node]

    for node in region.nodes:
        for arg in node.all_input_nodes:
            lookup(arg)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[region.output])
    return GraphModule(gm, graph), inputs


def _probe_routing(region: MoeRegion, num_experts: int, scale: float, generator: torch.Generator):
    hidden_value = example_value(region.hidden)
    T = concrete_int(hidden_value.shape[0])
    H = concrete_int(hidden_value.shape[1])
    K = concrete_int(example_value(region.topk_ids).shape[1])
    device = hidden_value.device
    hidden = (torch.randn(T, H, generator=generator) * scale).to(hidden_value.dtype).to(device)
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:K] for _ in range(T)]) if K <= num_experts \
        else torch.randint(0, num_experts, (T, K), generator=generator)
    ids = ids.to(example_value(region.topk_ids).dtype).to(device)
    weights = torch.rand(T, K, generator=generator).to(example_value(region.topk_weights).dtype).to(device)
    return hidden, ids, weights


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


@torch.no_grad()
def infer_expert_layout(gm: GraphModule, region: MoeRegion):
    """-> (ExpertLayout, up, down, up_bias, down_bias) that reproduces the region, or a refusal reason."""
    real_inputs = {w.node: w.value for w in region.owned}
    hidden_size = concrete_int(example_value(region.hidden).shape[1])
    candidates = candidate_layouts(region, hidden_size)
    if not candidates:
        shapes = [tuple(w.value.shape) for w in region.weights + region.biases]
        return f"no supported expert layout has tensors of shapes {shapes} for hidden size {hidden_size}"
    module, inputs = extract_region(gm, region)
    num_experts = region.weights[0].value.shape[0]
    generator = torch.Generator().manual_seed(0)
    probes = []
    for scale in PROBE_SCALES:
        hidden, ids, weights = _probe_routing(region, num_experts, scale, generator)
        probe_values = {region.hidden: hidden, region.topk_ids: ids, region.topk_weights: weights}
        args = []
        for node in inputs:
            if node in probe_values:
                args.append(probe_values[node])
            elif node in real_inputs:
                args.append(real_inputs[node])
            else:
                args.append(concrete_value(example_value(node)))
        probes.append((hidden, ids, weights, module(*args)))
    tolerance = PROBE_TOLERANCE.get(example_value(region.hidden).dtype, 4e-2)
    for layout, up, down, up_bias, down_bias in candidates:
        spec = LayerSpec(layout, up, down, up_bias, down_bias, name=region.scope)
        if all(
            _relative_error(moe_reference(spec, hidden, ids, weights), expected) < tolerance
            for hidden, ids, weights, expected in probes
        ):
            return layout, up, down, up_bias, down_bias
    return f"none of {len(candidates)} candidate expert layouts reproduces the region numerically"
