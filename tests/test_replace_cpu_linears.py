"""The replace_cpu_linears pass: every CPU linear of a decode step runs on dali::cpu_linear, equal to eager;
linears the kernel cannot read in place are left to ATen (must-not-fire cases).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FP32_RTOL, assert_close_to_eager, compile_dali, relative_max_error
from transformers import DynamicCache

import dali_compile
from dali_compile.hf_compat import cache_keyword
from dali_compile.tiny_models import tiny_model


def count_ops(fn, name: str) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == name)


def linear_layers(model: torch.nn.Module) -> int:
    """nn.Linear modules plus the routers (which call F.linear on their own weight)."""
    routers = sum(
        1 for name, m in model.named_modules() if name.endswith("mlp.gate") and not isinstance(m, torch.nn.Linear)
    )
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear)) + routers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_linear_of_a_decode_step_runs_on_the_runtime(dtype):
    """OLMoE: q/k/v/o, router per layer and the lm_head, one decode step over a KV cache."""
    torch._dynamo.reset()
    model = tiny_model("olmoe", dtype)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, use_cache=True, **{cache_keyword(model): cache})
        step = ids[:, -1:]

        def decode(m):
            return m(step, use_cache=True, **{cache_keyword(model): copy.deepcopy(cache)}).logits

        eager = decode(model)
        compiled = compile_dali(model)
        got = decode(compiled)
        calls = count_ops(lambda: decode(compiled), "dali::cpu_linear")
    assert dali_compile.last_report().cpu_linears == linear_layers(model)
    assert calls == linear_layers(model)
    truth = None
    if dtype == torch.bfloat16:
        with torch.no_grad():
            truth = decode(tiny_model("olmoe", torch.bfloat16).float())
    assert_close_to_eager(got, eager, truth)


class TwoLinears(torch.nn.Module):
    """One linear the kernel can take and one it cannot (a transposed weight view)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(16, 8, dtype=dtype))
        self.b = torch.nn.Parameter(torch.randn(16, 8, dtype=dtype))  # used as b.T: [8, 16], column-major

    def forward(self, x):
        return F.linear(F.linear(x, self.a), self.b.T)


def test_transposed_weight_view_is_left_to_aten():
    torch.manual_seed(0)
    module = TwoLinears()
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = module(x)
        got = compile_dali(module)(x)
    assert dali_compile.last_report().cpu_linears == 1
    assert relative_max_error(got, want) <= FP32_RTOL


def test_float64_and_autocast_linears_are_left_to_aten():
    torch.manual_seed(0)
    module64 = TwoLinears(torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(compile_dali(module64)(x), module64(x))
    assert dali_compile.last_report().cpu_linears == 0
    linear = torch.nn.Linear(8, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = linear(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)))
        got = compile_dali(linear)(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)))
    assert dali_compile.last_report().cpu_linears == 0
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_option_off_keeps_aten_linears():
    module = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with torch.no_grad():
        got = torch.compile(module, backend="dali", options={"inductor": False, "cpu_linears": False})(x)
    assert dali_compile.last_report().cpu_linears == 0
    assert torch.allclose(got, module(x))


def test_compiled_with_gradients_stays_differentiable():
    """Traced with grad on (no torch.no_grad()): the op's autograd formula gives linear's gradients."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    compile_dali(module)(x).sum().backward()
    assert dali_compile.last_report().cpu_linears == 2
    ours = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    module(x).sum().backward()
    for mine, theirs in zip(ours, [p.grad for p in module.parameters()], strict=True):
        assert relative_max_error(mine, theirs) <= FP32_RTOL


@pytest.mark.inductor
def test_inductor_runs_the_op_and_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(1, 32)
    with torch.no_grad():
        got = compile_dali(module, inductor=True)(x)
        calls = count_ops(lambda: compile_dali(module, inductor=True)(x), "dali::cpu_linear")
        want = module(x)
    assert calls == 2
    assert relative_max_error(got, want) <= FP32_RTOL


def test_cpp_wrapper_only_for_cpu_graphs():
    """Inductor's C++ wrapper is asked for when every graph input is on the CPU; other devices keep inductor's
    defaults (on CUDA tensors nothing changes), and the option turns it off."""
    from dali_compile.backend import _inductor_patches
    from dali_compile.config import DaliConfig

    cpu_inputs = [torch.zeros(2), 3, torch.zeros(1, dtype=torch.bfloat16)]
    assert _inductor_patches(DaliConfig(), cpu_inputs) == {"cpp_wrapper": True}
    assert _inductor_patches(DaliConfig(), [torch.zeros(2), torch.zeros(2, device="meta")]) == {}
    assert _inductor_patches(DaliConfig(cpp_wrapper=False), cpu_inputs) == {}
