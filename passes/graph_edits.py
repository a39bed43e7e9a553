"""Graph edits shared by the passes that swap one call for a dali op."""

from __future__ import annotations

from torch.fx import GraphModule, Node


def substitute_call(node: Node, target, args: tuple) -> Node:
    """Put `target(*args)` where `node` was: same place, same metadata (example values), same users."""
    graph = node.graph
    with graph.inserting_before(node):
        call = graph.call_function(target, args)
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    return call


def recompile_if_edited(gm: GraphModule, edits: int) -> None:
    if edits:
        gm.graph.lint()
        gm.recompile()
