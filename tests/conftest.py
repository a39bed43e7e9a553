"""Shared helpers: tolerances, compile shortcuts, counting executed dali::moe_hybrid calls."""

from __future__ import annotations

import os

import pytest
import torch

import dali_compile

# The bf16 GEMM paths on stored weights are on by default on AMX-BF16 CPUs only: off for every test (and the
# subprocesses tests start), so each host runs the same paths against the same tolerances. The tests of those
# paths turn them on themselves (tests/test_cpu_experts.py, test_cpu_linear.py, test_families.py).
os.environ["DALI_CPU_BF16_GEMM"] = "0"


@pytest.fixture(scope="module")
def cpu_runtime():
    """The C++ CPU runtime, built: tests of its kernels skip under DALI_CPU_EXTENSION=0 and fail if it cannot build."""
    import os

    from dali_compile.runtime import cpu_extension

    if os.environ.get("DALI_CPU_EXTENSION") == "0":
        pytest.skip("DALI_CPU_EXTENSION=0: the C++ runtime is disabled")
    assert cpu_extension.cpu_extension_available(), "the C++ CPU runtime failed to build (see the warning)"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, so graphs (and reports) never leak between tests."""
    torch._dynamo.reset()
    dali_compile.clear_reports()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["sync", "async"])
def emulated_mode(request, monkeypatch):
    """Runs a test in both modes of the emulated accelerator (`DALI_EMULATED_MODE`, read whenever
    device='emulated' makes one): synchronous, and asynchronous (compute and copies on worker threads with
    seeded random delays, so a missing wait gives wrong numbers). Use it module-wide with
    `pytestmark = pytest.mark.usefixtures("emulated_mode")`."""
    monkeypatch.setenv("DALI_EMULATED_MODE", request.param)
    return request.param


def pytest_collection_modifyitems(config, items):
    """Tests marked `one_emulated_mode` spend their time compiling, which neither mode of the emulated
    accelerator changes (the runtime under a compiled graph runs in both modes elsewhere): they run in the
    synchronous mode only, keeping the suite under 15 minutes on 2 cores."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        one_mode = params.get("emulated_mode") == "async" and item.get_closest_marker("one_emulated_mode")
        (drop if one_mode else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def gemm_rows():
    """Sets the dense kernels' streaming/GEMM crossover for the test body (call it with the row count), then
    restores it."""
    from dali_compile.runtime import cpu_extension

    default = cpu_extension.get_linear_gemm_min_rows()
    default_bf16 = cpu_extension.get_linear_bf16_gemm_min_rows()
    default_quantized = cpu_extension.get_quantized_bf16_gemm_min_rows()
    cpu_extension.set_linear_bf16_gemm_min_rows(0)  # off in tests (above); restored as the test found it
    cpu_extension.set_quantized_bf16_gemm_min_rows(0)
    yield cpu_extension.set_linear_gemm_min_rows
    cpu_extension.set_linear_gemm_min_rows(default)
    cpu_extension.set_linear_bf16_gemm_min_rows(default_bf16)
    cpu_extension.set_quantized_bf16_gemm_min_rows(default_quantized)


@pytest.fixture(params=("portable", "avx2", "avx512"))
def isa(request):
    """Runs the test body on one ISA path of the C++ runtime (skipped where this CPU lacks it, or without the
    runtime), then back to the best."""
    from dali_compile.runtime import cpu_extension

    if not cpu_extension.cpu_extension_available():
        pytest.skip("C++ extension not built")
    if request.param not in cpu_extension.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} path")
    cpu_extension.set_isa(request.param)
    yield request.param
    cpu_extension.set_isa("auto")
