"""Every `dali::*` op passes `torch.library.opcheck`, and no op exists outside `all_op_names()`.

# T tokens, H hidden, I intermediate, K top-k, E experts

opcheck compares the real kernel with the fake one (shapes, dtypes, strides), checks the schema's
mutation/aliasing claims and that the op traces under AOT dispatch with dynamic shapes. A new op
must add a sample builder below or `test_opcheck` fails for it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from op_samples import SAMPLE_BUILDERS

import dali_compile  # defines the dali::* ops
from dali_compile import LayerSpec, layer_registry

all_op_names = dali_compile.ops.all_op_names

# Every tests/op_samples*.py module registers its builders on import.
for _path in sorted(Path(__file__).parent.glob("op_samples*.py")):
    importlib.import_module(_path.stem)


@pytest.fixture
def register_layer():
    """Registers layers for the samples and releases every handle afterwards."""
    handles: list[int] = []

    def register(spec: LayerSpec) -> int:
        handles.append(layer_registry().register(spec))
        return handles[-1]

    yield register
    for handle in handles:
        layer_registry().release(handle)


def _op(qualified_name: str) -> torch._ops.OpOverload:
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


@pytest.mark.parametrize("op_name", all_op_names())
def test_opcheck(op_name, register_layer):
    if op_name not in SAMPLE_BUILDERS:
        pytest.fail(f"{op_name} has no sample builder in SAMPLE_BUILDERS, so it is never opchecked; add one")
    samples = SAMPLE_BUILDERS[op_name](register_layer)
    assert samples, f"the sample builder of {op_name} returned no samples"
    for args in samples:
        torch.library.opcheck(_op(op_name), args)


def test_sample_builders_have_no_stale_entries():
    """A builder for a removed or renamed op would silently test nothing."""
    assert set(SAMPLE_BUILDERS) <= set(all_op_names())


def test_all_op_names_lists_every_dali_op():
    """No op can be defined in the dali namespace without going through `define_op`."""
    listed = set(all_op_names())
    # The dispatcher knows every defined schema, whether or not Python has touched it yet.
    in_dispatcher = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("dali::")}
    assert in_dispatcher == listed
    # torch.ops.dali lists an op only after its first attribute access, so touch the listed ones
    # first; anything else that shows up there must also be listed.
    for name in listed:
        _op(name)
    packets = {
        f"dali::{attr}"
        for attr in dir(torch.ops.dali)
        if not attr.startswith("__")
        and isinstance(getattr(torch.ops.dali, attr), torch._ops.OpOverloadPacket)
    }
    assert packets == listed
