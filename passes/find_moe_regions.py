"""Find the MoE expert-dispatch regions in a dynamo FX graph.

A region is the set of nodes under one module scope that owns stacked expert
weights (>= two 3-D floating tensors with the same leading size E >= 2). It must
read exactly three activations and produce one tensor:

    hidden [T, H] float, topk_ids [T, K] int, topk_weights [T, K] float  ->  out [T, H]

(transformers' fused experts module). A hand-written experts module that reads
only (hidden, topk_ids) and returns per-slot outputs [T, K, H] is also accepted
when its single consumer is the weighted combine with a [T, K] float tensor
(gpt-fast's style); the combine then joins the region. Everything else is
refused with a reason, and the graph is left as it was.

Nothing here looks at class names: scope ownership comes from each parameter's
`nn_module_stack`, shapes from `meta["example_value"]`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

_NON_TENSOR_VALUES = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)

# Methods and functions that write into their first argument.
_INPLACE_FUNCTIONS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
}


@dataclass
class WeightInput:
    """A module-owned tensor the region reads (an expert weight or bias)."""

    node: Node
    value: torch.Tensor
    name: str
    input_index: int | None  # position among the graph's placeholders, None for get_attr


@dataclass
class MoeRegion:
    scope: str
    nodes: list[Node]  # topological order; the graph's non-SymInt nodes of the region
    hidden: Node
    topk_ids: Node
    topk_weights: Node
    output: Node
    weights: list[WeightInput]  # 3-D expert tensors, first-use order
    biases: list[WeightInput]  # 2-D [E, *] tensors, first-use order
    owned: list[WeightInput]  # every module tensor of the scope the region reads
    scalar_inputs: list[Node] = field(default_factory=list)  # SymInt/int nodes read from outside


@dataclass
class RefusedRegion:
    scope: str
    reason: str
    graph_broken: bool = False  # the experts reached this graph in pieces (a graph break inside them)


def example_value(node: Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _scope_path(entry) -> str:
    path = entry[0] if isinstance(entry, tuple) else str(entry)
    return path[len("L['self']."):] if path.startswith("L['self'].") else path


# The scope of a module tensor whose module is the compiled root (no nn_module_stack entry): either the
# user compiled the experts module itself, or dynamo resumed inside it after a graph break.
ROOT_SCOPE = "<graph root>"


def _owner_scope(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return _scope_path(list(stack.values())[-1])
    return ROOT_SCOPE


def _in_scope(node: Node, scope: str) -> bool:
    if scope == ROOT_SCOPE:
        return True
    return scope in _scopes_of(node)


def _scopes_of(node: Node) -> set[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return {_scope_path(v) for v in stack.values()}


def _module_tensor_inputs(gm: GraphModule, example_inputs) -> dict[Node, WeightInput]:
    """Graph inputs that are module parameters or buffers, with their real tensors."""
    found: dict[Node, WeightInput] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        value = example_inputs[index] if index < len(example_inputs) else None
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None and getattr(grapharg, "source", None) else ""
        is_module_tensor = isinstance(value, torch.nn.Parameter) or "._buffers[" in source
        if isinstance(value, torch.Tensor) and is_module_tensor:
            found[node] = WeightInput(node, value, source or node.name, index)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                found[node] = WeightInput(node, value, node.target, None)
    return found


def _get_attr(gm: GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _expert_scopes(module_tensors: dict[Node, WeightInput]) -> dict[str, list[WeightInput]]:
    """Scopes owning >= 2 stacked 3-D floating tensors with one leading size E >= 2."""
    by_scope: dict[str, list[WeightInput]] = {}
    for node, weight in module_tensors.items():
        scope = _owner_scope(node) if node.op == "placeholder" else node.target.rpartition(".")[0]
        by_scope.setdefault(scope, []).append(weight)
    scopes = {}
    for scope, tensors in by_scope.items():
        stacked = [w for w in tensors if w.value.dim() == 3 and w.value.is_floating_point()]
        if len(stacked) >= 2 and len({w.value.shape[0] for w in stacked}) == 1 and stacked[0].value.shape[0] >= 2:
            scopes[scope] = tensors
    return scopes


def _is_non_tensor(node: Node) -> bool:
    return isinstance(example_value(node), _NON_TENSOR_VALUES)


def _mutated_argument(node: Node) -> Node | None:
    if node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        first = node.args[0] if node.args else None
    elif node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("_"):
        first = node.args[0] if node.args else None
    else:
        return None
    return first if isinstance(first, Node) else None


def _shape(node: Node):
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _classify_inputs(tensor_inputs: list[Node]):
    """-> (topk_ids, [T, K] float candidates, [T, *] float candidates, all floats), or a reason string."""
    ints = [n for n in tensor_inputs if not example_value(n).is_floating_point()]
    floats = [n for n in tensor_inputs if example_value(n).is_floating_point()]
    if len(ints) != 1:
        return f"expected one integer routing input (topk_ids), found {len(ints)}"
    ids = ints[0]
    if len(_shape(ids)) != 2:
        return f"topk_ids must be [T, K], found shape {_shape(ids)}"
    weights = [n for n in floats if _shape(n) == _shape(ids)]
    hidden = [n for n in floats if n not in weights and len(_shape(n)) == 2 and _shape(n)[0] == _shape(ids)[0]]
    return ids, weights, hidden, floats


def _combine_extension(output: Node, ids: Node, region_set: set[Node]):
    """A [T, K, H] per-slot output consumed only by a weighted combine with a [T, K] float tensor.

    Returns (combine_nodes, topk_weights, final_output) or None. Follows the single
    consumer chain (einsum, or mul then sum) until a [T, H] value appears. The
    combine's semantics are not trusted here: the layout probe checks the whole
    region numerically against the reference.
    """
    out_shape, ids_shape = _shape(output), _shape(ids)
    if out_shape is None or len(out_shape) != 3 or out_shape[:2] != ids_shape:
        return None
    combine: list[Node] = []
    frontier = output
    for _ in range(4):  # a combine is a few nodes: einsum, or mul + sum (+ a cast)
        users = list(frontier.users)
        if len(users) != 1:
            return None
        frontier = users[0]
        combine.append(frontier)
        if _shape(frontier) == (ids_shape[0], out_shape[2]):
            inside = region_set | set(combine)
            outside = [a for n in combine for a in n.all_input_nodes if a not in inside]
            weights = [a for a in outside if _shape(a) == ids_shape and example_value(a).is_floating_point()]
            if len(weights) == 1 and all(a is weights[0] or _is_non_tensor(a) for a in outside):
                return combine, weights[0], frontier
            return None
    return None


def find_moe_regions(gm: GraphModule, example_inputs) -> tuple[list[MoeRegion], list[RefusedRegion]]:
    module_tensors = _module_tensor_inputs(gm, example_inputs)
    regions, refused = [], []
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for scope, tensors in _expert_scopes(module_tensors).items():
        result = _region_for_scope(gm, scope, tensors, module_tensors, order)
        if result is not None:
            (regions if isinstance(result, MoeRegion) else refused).append(result)
    regions.sort(key=lambda r: order[r.output])
    return regions, refused + find_split_dispatch(gm)


def find_split_dispatch(gm: GraphModule) -> list[RefusedRegion]:
    """The head of a loop-over-experts dispatch cut off by a graph break.

    transformers' 'eager' experts build a mask one_hot(topk_ids [T, K], E) -> [T, K, E], permute it
    and reduce it to "which experts are hit", then break the graph at nonzero; the expert matmuls
    never reach a graph. Such a graph holds the one_hot of a 2-D integer input and no stacked expert
    weights. Reported (so the user gets the fix), never rewritten.
    """
    found = []
    for node in gm.graph.nodes:
        if node.target is not torch.nn.functional.one_hot or not node.args:
            continue
        ids = node.args[0]
        value = example_value(ids) if isinstance(ids, Node) else None
        if isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point():
            scope = _owner_scope(node)
            found.append(RefusedRegion(
                scope, "an expert-mask dispatch (one_hot of top-k ids) whose expert loop is outside the graph",
                graph_broken=True,
            ))
    return found


def _region_for_scope(gm, scope, tensors, module_tensors, order) -> MoeRegion | RefusedRegion | None:
    """The scope's region, a refusal with its reason, or None when the scope is no expert dispatch."""
    owned = {w.node for w in tensors}
    nodes = [
        n for n in gm.graph.nodes
        if n.op not in ("placeholder", "get_attr", "output") and _in_scope(n, scope) and not _is_non_tensor(n)
    ]
    if not nodes:
        return RefusedRegion(scope, "the expert weights are not used in this graph", graph_broken=True)
    region_set = set(nodes)
    external = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in region_set and a not in owned and a not in external:
                external.append(a)
    scalars = [a for a in external if _is_non_tensor(a)]
    tensor_inputs = [a for a in external if isinstance(example_value(a), torch.Tensor)]
    if not any(not example_value(a).is_floating_point() for a in tensor_inputs if a not in module_tensors):
        return None  # stacked weights but no integer routing input: not an expert dispatch (e.g. attention)
    if any(a in module_tensors for a in external):
        return RefusedRegion(scope, "the experts read module tensors owned by another module")
    if len(scalars) + len(tensor_inputs) != len(external):
        return RefusedRegion(
            scope, "the experts read inputs of unknown type (graph broken inside the experts?)", graph_broken=True
        )
    for n in nodes:
        mutated = _mutated_argument(n)
        if mutated is not None and mutated not in region_set:
            return RefusedRegion(scope, f"the experts write in place into an outside tensor ({n.name})")
    outputs = [n for n in nodes if any(u not in region_set for u in n.users)]
    if len(outputs) != 1:
        return RefusedRegion(
            scope,
            f"the experts produce {len(outputs)} values used outside (expected one [T, H] result); "
            "the graph may be broken inside the experts (e.g. the 'eager' experts implementation)",
            graph_broken=True,
        )
    output = outputs[0]
    classified = _classify_inputs(tensor_inputs)
    if isinstance(classified, str):
        return RefusedRegion(scope, classified)
    ids, weight_candidates, hidden_candidates, floats = classified
    if len(weight_candidates) == 0 and len(floats) == 1:
        extension = _combine_extension(output, ids, region_set)
        if extension is None:
            return RefusedRegion(scope, "the experts read no routing weights and no weighted combine follows")
        extra, topk_weights, output = extension
        nodes = nodes + extra
        region_set.update(extra)
        for n in extra:
            for a in n.all_input_nodes:
                if a not in region_set and a not in external:
                    (scalars if _is_non_tensor(a) else tensor_inputs).append(a)
                    external.append(a)
        hidden = floats[0]
    elif len(weight_candidates) == 1 and len(hidden_candidates) == 1:
        topk_weights, hidden = weight_candidates[0], hidden_candidates[0]
    else:
        return RefusedRegion(
            scope,
            f"could not tell hidden [T, H] from topk_weights [T, K] among inputs "
            f"{[(_shape(n)) for n in tensor_inputs]}",
        )
    out_shape = _shape(output)
    if out_shape != _shape(hidden):
        return RefusedRegion(scope, f"the experts output {out_shape} differs from hidden {_shape(hidden)}")
    stray = [a for a in tensor_inputs if a not in (hidden, ids, topk_weights)]
    if stray:
        return RefusedRegion(scope, f"the experts read extra activations {[a.name for a in stray]}")

    hidden_value, expert_value = example_value(hidden), next(w.value for w in tensors if w.value.dim() == 3)
    if hidden_value.dtype != expert_value.dtype or hidden_value.device != expert_value.device:
        return RefusedRegion(
            scope,
            f"hidden is {hidden_value.dtype} on {hidden_value.device} but the expert weights are "
            f"{expert_value.dtype} on {expert_value.device} (autocast or a partly moved model?)",
        )
    first_use = {w.node: min((order[u] for u in w.node.users if u in region_set), default=1 << 60) for w in tensors}
    used = sorted((w for w in tensors if first_use[w.node] < 1 << 60), key=lambda w: first_use[w.node])
    E = next(w.value.shape[0] for w in used if w.value.dim() == 3)
    weights = [w for w in used if w.value.dim() == 3]
    biases = [w for w in used if w.value.dim() == 2 and w.value.shape[0] == E]
    return MoeRegion(scope, nodes, hidden, ids, topk_weights, output, weights, biases, used, scalars)

