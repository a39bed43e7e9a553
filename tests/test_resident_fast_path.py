"""The C++ kernels that skip Python per call: `dali::moe_hybrid` for published resident layers
(csrc/binding/resident_layers.cpp) and `dali::cpu_linear`'s autograd kernel (csrc/binding/linear_ops.cpp).

The Python kernel of `dali::moe_hybrid` stays the source of truth: each test compares a call served by the
C++ kernel with the Python kernel's own answer (bit for bit: the same arithmetic), and checks that every
change to what serves a layer (release, freed tensors, an attached runtime, a redirect) or an input the
Python kernel refuses goes back to it, with its errors.

# T tokens, H hidden, I intermediate, E experts, K top-k
"""

from __future__ import annotations

import gc

import pytest
import torch

from dali_compile import Activation, ExpertLayout, LayerSpec, layer_registry
from dali_compile.ops.moe_hybrid import moe_hybrid_cpu_kernel
from dali_compile.runtime import UnknownLayerError, cpu_extension

pytestmark = pytest.mark.skipif(not cpu_extension.cpu_extension_available(), reason="needs the C++ CPU runtime")

H, I, E, K, T = 16, 12, 6, 2, 5  # noqa: E741
LAYOUTS = {
    "gated": ExpertLayout(Activation("silu")),
    "transposed biased": ExpertLayout(Activation("clamped_swiglu", alpha=1.702, limit=0.5), interleaved=True,
                                      transposed=True, has_bias=True),
    "no gate": ExpertLayout(Activation("relu2"), gated=False),
}


def make_spec(layout: ExpertLayout, dtype=torch.bfloat16, seed: int = 0) -> LayerSpec:
    gen = torch.Generator().manual_seed(seed)
    X = 2 * I if layout.gated else I

    def draw(*shape):
        return (torch.randn(*shape, generator=gen) * 0.3).to(dtype)

    up, down = ((E, H, X), (E, I, H)) if layout.transposed else ((E, X, H), (E, H, I))
    biases = (draw(E, X), draw(E, H)) if layout.has_bias else (None, None)
    return LayerSpec(layout, draw(*up), draw(*down), *biases, name="fast-path test")


def routing(dtype=torch.bfloat16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=gen)
    return hidden, ids, weights


def op(hidden, ids, weights, handle):
    return torch.ops.dali.moe_hybrid(hidden, ids, weights, handle)


@pytest.fixture
def registry():
    yield layer_registry()
    cpu_extension.forget_resident_layers()


def published(registry, spec) -> int:
    """A strongly registered layer, served once by the Python kernel (which publishes it)."""
    handle = registry.register(spec)
    op(*routing(spec.dtype), handle)
    assert cpu_extension.resident_layer_count() >= 1
    return handle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_published_layer_equals_python_kernel(registry, layout, dtype):
    spec = make_spec(LAYOUTS[layout], dtype)
    handle = published(registry, spec)
    try:
        for seed in range(3):
            hidden, ids, weights = routing(dtype, seed=10 + seed)
            fast = op(hidden, ids, weights, handle)
            python = moe_hybrid_cpu_kernel(hidden, ids, weights, handle)
            assert torch.equal(fast, python)
        hidden, ids, weights = routing(dtype)
        empty = op(hidden[:0], ids[:0], weights[:0], handle)
        assert empty.shape == (0, H) and empty.dtype == dtype
    finally:
        registry.release(handle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_path_sum_over_k_equals_python_kernel_at_wide_shapes(registry, dtype):
    """The fast path sums the (token, k) contributions and rounds them in C++ (sum_over_k): with top-8 routing, a
    hidden size past its 512-column chunks and enough tokens to split the rows over threads, bit-equal to the
    Python kernel's `contributions.sum(dim=1).to(dtype)`."""
    hidden_size, experts, top_k, tokens = 600, 10, 8, 40
    gen = torch.Generator().manual_seed(3)
    up = (torch.randn(experts, 2 * I, hidden_size, generator=gen) * 0.1).to(dtype)
    down = (torch.randn(experts, hidden_size, I, generator=gen) * 0.3).to(dtype)
    spec = LayerSpec(LAYOUTS["gated"], up, down, None, None, name="wide fast-path test")
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    handle = registry.register(spec)
    try:
        op(hidden[:1], ids[:1], weights[:1], handle)  # the Python kernel publishes it
        for rows in (1, 3, tokens):
            fast = op(hidden[:rows], ids[:rows], weights[:rows], handle)
            python = moe_hybrid_cpu_kernel(hidden[:rows], ids[:rows], weights[:rows], handle)
            assert fast.dtype == dtype and torch.equal(fast, python), rows
    finally:
        registry.release(handle)


def test_release_forgets_and_raises(registry):
    handle = published(registry, make_spec(LAYOUTS["gated"]))
    registry.release(handle)
    assert cpu_extension.resident_layer_count() == 0
    with pytest.raises(UnknownLayerError, match="unknown MoE layer"):
        op(*routing(), handle)


def test_freed_weights_are_never_read(registry):
    owner = make_spec(LAYOUTS["gated"])
    handle = registry.register(owner, weak=True)
    op(*routing(), handle)
    assert cpu_extension.resident_layer_count() >= 1
    del owner
    gc.collect()
    with pytest.raises(UnknownLayerError, match="freed"):
        op(*routing(), handle)


class _FakeRuntime:
    def __init__(self):
        self.calls = 0

    def forward(self, hidden, ids, weights):
        self.calls += 1
        return torch.full_like(hidden, 7.0)


def test_attached_runtime_serves_after_publication(registry):
    handle = published(registry, make_spec(LAYOUTS["gated"]))
    runtime = _FakeRuntime()
    try:
        registry.attach(handle, runtime)
        assert cpu_extension.resident_layer_count() == 0
        out = op(*routing(), handle)
        assert runtime.calls == 1 and bool((out == 7.0).all())
        registry.detach(handle)
        op(*routing(), handle)
        assert runtime.calls == 1
    finally:
        registry.release(handle)


def test_redirect_uses_the_redirected_weights(registry):
    first = published(registry, make_spec(LAYOUTS["gated"], seed=0))
    second = published(registry, make_spec(LAYOUTS["gated"], seed=1))
    hidden, ids, weights = routing(seed=5)
    try:
        want = moe_hybrid_cpu_kernel(hidden, ids, weights, second)
        assert not torch.equal(want, moe_hybrid_cpu_kernel(hidden, ids, weights, first))
        with registry.redirect({first: second}):
            assert torch.equal(op(hidden, ids, weights, first), want)
        assert torch.equal(op(hidden, ids, weights, first), moe_hybrid_cpu_kernel(hidden, ids, weights, first))
    finally:
        registry.release(first)
        registry.release(second)


def test_inputs_the_python_kernel_refuses_get_its_errors(registry):
    handle = published(registry, make_spec(LAYOUTS["gated"]))
    hidden, ids, weights = routing()
    try:
        with pytest.raises(TypeError, match="weights are torch.bfloat16"):
            op(hidden.float(), ids, weights, handle)
        with pytest.raises(ValueError, match="hidden size 8 does not match layer"):
            op(hidden[:, :8].contiguous(), ids, weights, handle)
        with pytest.raises(IndexError, match=f"expert id {E} out of range for layer {handle}"):
            op(hidden, torch.full_like(ids, E), weights, handle)
        with pytest.raises(ValueError, match="must both be"):
            op(hidden, ids, weights[:, :1], handle)
    finally:
        registry.release(handle)


def test_fake_tensors_never_reach_the_kernel(registry):
    handle = published(registry, make_spec(LAYOUTS["gated"]))
    try:
        with torch._subclasses.FakeTensorMode() as mode:
            hidden, ids, weights = (mode.from_tensor(t) for t in routing())
            out = op(hidden, ids, weights, handle)
        assert isinstance(out, torch._subclasses.FakeTensor) and out.shape == (T, H)
    finally:
        registry.release(handle)


def test_a_gradient_request_warns_and_computes_the_same(registry):
    """The op has no autograd formula: asked for a gradient, it says so (before, only backward warned)."""
    handle = published(registry, make_spec(LAYOUTS["gated"]))
    hidden, ids, weights = routing()
    try:
        with pytest.warns(UserWarning, match="no autograd formula"):
            out = op(hidden.requires_grad_(), ids, weights, handle)
        assert torch.equal(out.detach(), moe_hybrid_cpu_kernel(hidden.detach(), ids, weights, handle))
    finally:
        registry.release(handle)


def test_cpu_linear_autograd_kernel_is_native():
    """The no-grad call goes from the C++ autograd kernel straight to the C++ kernel (no Python autograd)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dali::cpu_linear", "AutogradCPU")
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    with torch.no_grad():
        got = torch.ops.dali.cpu_linear(x, w, None)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5)
    assert got.grad_fn is None
