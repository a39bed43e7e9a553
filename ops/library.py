"""The `dali` op namespace: where every schema is defined, and the list of them.

Each op file calls `define_op` once at import; `all_op_names()` is what the
registry test walks, so an op cannot exist without being opchecked.
"""

from __future__ import annotations

import torch

# The Library object must live as long as the process: dropping it unregisters the ops.
_LIB = torch.library.Library("dali", "DEF")
_DEFINED: list[str] = []


def define_op(qualified_name: str, schema: str) -> None:
    namespace, name = qualified_name.split("::")
    if namespace != "dali":
        raise ValueError(f"dali ops live in the dali namespace, not {namespace!r}")
    _LIB.define(name + schema)
    _DEFINED.append(qualified_name)


def all_op_names() -> tuple[str, ...]:
    """Qualified names (`dali::...`) of every op this package defines."""
    return tuple(_DEFINED)
