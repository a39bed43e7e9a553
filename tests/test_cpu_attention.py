"""`dali::cpu_attention` against plain PyTorch attention, and the replace_decode_attention pass: a decode
step's attention runs on the kernel, equal to eager; attention the kernel does not compute is left to ATen.

# B batch, Hq query heads, Hk key/value heads, L query rows, S cached positions, D head dim
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FP32_RTOL, assert_close_to_eager, compile_dali
from transformers import DynamicCache

import dali_compile
from dali_compile.hf_compat import cache_keyword
from dali_compile.ops.cpu_attention import cpu_attention, cpu_attention_reference
from dali_compile.runtime import cpu_extension
from dali_compile.tiny_models import tiny_model

# Tolerance of the op's output against fp32 attention: one rounding of the output to the dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

needs_extension = pytest.mark.skipif(not cpu_extension.cpu_extension_available(), reason="C++ runtime not built")


def draw(*shape, dtype=torch.float32, gen):
    return torch.randn(*shape, generator=gen).to(dtype)


def fp32_attention(q, k, v, scale, mask=None):
    """torch's own attention in fp32: the oracle."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                          enable_gqa=True)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "B,Hq,Hk,L,S",
    [(1, 4, 4, 1, 1), (1, 16, 16, 1, 33), (3, 8, 2, 1, 300), (2, 32, 4, 1, 1100), (2, 6, 3, 3, 257)],
    ids=["one-position", "mha", "gqa-batch3", "gqa-chunked", "three-query-rows"],
)
def test_kernel_equals_fp32_attention(isa, dtype, B, Hq, Hk, L, S):
    """Shapes that exercise one position, several chunks per head (merged) and grouped-query heads, on every
    ISA path this CPU has (the `isa` fixture)."""
    gen = torch.Generator().manual_seed(B * 1000 + S)
    D = 64
    q, k, v = draw(B, Hq, L, D, dtype=dtype, gen=gen), draw(B, Hk, S, D, dtype=dtype, gen=gen), \
        draw(B, Hk, S, D, dtype=dtype, gen=gen)
    got = cpu_attention(q, k, v)
    truth = fp32_attention(q, k, v, D ** -0.5)
    assert got.dtype == dtype and got.shape == (B, Hq, L, D) and got.is_contiguous()
    err = ((got.float() - truth).abs().max() / truth.abs().max()).item()
    assert err <= TOLERANCE[dtype], err
    ref = cpu_attention_reference(q, k, v, None, D ** -0.5)
    assert ((ref.float() - truth).abs().max() / truth.abs().max()).item() <= TOLERANCE[dtype]


@needs_extension
def test_kernel_reads_a_strided_cache_in_place():
    """k and v as views into larger buffers (position rows apart by D, heads by the buffer's length), q
    transposed from [B, L, H, D] as attention layers produce it; a peaked softmax (large scale) too."""
    gen = torch.Generator().manual_seed(1)
    buffer = torch.randn(2, 4, 600, 32, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    k, v = buffer[:, :, :250], buffer[:, :, 300:550]
    q = torch.randn(2, 1, 8, 32, generator=gen).to(torch.bfloat16).transpose(1, 2)
    for scale in (0.1, 4.0):
        got = cpu_attention(q, k, v, scale)
        truth = fp32_attention(q, k, v, scale)
        assert ((got.float() - truth).abs().max() / truth.abs().max()).item() <= TOLERANCE[torch.bfloat16]


@needs_extension
def test_kernel_equals_reference_exactly_enough_in_fp32():
    gen = torch.Generator().manual_seed(2)
    q, k, v = draw(1, 8, 1, 128, gen=gen), draw(1, 2, 700, 128, gen=gen), draw(1, 2, 700, 128, gen=gen)
    torch.testing.assert_close(cpu_attention(q, k, v, 0.2), cpu_attention_reference(q, k, v, None, 0.2), rtol=FP32_RTOL,
                               atol=1e-6)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_with_a_mask(isa, dtype):
    """Random masks per batch row and query row (broadcast over heads), a whole chunk of positions nobody
    sees (never read), a row that sees nothing (zeros, as ATen's attention gives), a batch-broadcast mask."""
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hk, L, S, D = 3, 8, 2, 2, 700, 32
    q, k, v = draw(B, Hq, L, D, dtype=dtype, gen=gen), draw(B, Hk, S, D, dtype=dtype, gen=gen), \
        draw(B, Hk, S, D, dtype=dtype, gen=gen)
    mask = torch.rand(B, 1, L, S, generator=gen) > 0.5
    mask[1, :, :, 200:] = False  # batch row 1: a static cache filled to 200
    mask[2, :, 1] = False  # batch row 2, query row 1: sees nothing
    got = cpu_attention(q, k, v, 0.3, mask=mask)
    truth = fp32_attention(q, k, v, 0.3, mask)
    assert torch.equal(got[2, :, 1], torch.zeros_like(got[2, :, 1]))
    assert ((got.float() - truth).abs().max() / truth.abs().max()).item() <= TOLERANCE[dtype]
    ref = cpu_attention_reference(q, k, v, mask, 0.3)
    assert ((ref.float() - truth).abs().max() / truth.abs().max()).item() <= TOLERANCE[dtype]
    shared = mask[:1, :, :1]
    got = cpu_attention(q, k, v, 0.3, mask=shared)
    truth = fp32_attention(q, k, v, 0.3, shared)
    assert ((got.float() - truth).abs().max() / truth.abs().max()).item() <= TOLERANCE[dtype]


@pytest.mark.parametrize(
    "case,error",
    [
        ("int", TypeError), ("mixed", TypeError), ("3d", ValueError), ("heads", ValueError), ("empty", ValueError),
        ("head-dim", ValueError), ("kv-shapes", ValueError), ("meta", ValueError), ("float-mask", TypeError),
        ("mask-per-head", ValueError), ("mask-positions", ValueError),
    ],
)
def test_bad_inputs_are_clear_errors(case, error):
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    if case == "int":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
    elif case == "mixed":
        k = k.to(torch.bfloat16)
    elif case == "3d":
        q = q[0]
    elif case == "heads":
        q = torch.randn(1, 3, 1, 8)
    elif case == "empty":
        k, v = k[:, :, :0], v[:, :, :0]
    elif case == "head-dim":
        q = torch.randn(1, 4, 1, 16)
    elif case == "kv-shapes":
        v = torch.randn(1, 2, 6, 8)
    elif case == "meta":
        k = k.to("meta")
    mask = {"float-mask": torch.zeros(1, 1, 1, 5), "mask-per-head": torch.ones(1, 4, 1, 5, dtype=torch.bool),
            "mask-positions": torch.ones(1, 1, 1, 6, dtype=torch.bool)}.get(case)
    with pytest.raises(error, match="dali::cpu_attention"):
        cpu_attention(q, k, v, mask=mask)


# ---------------------------------------------------------------------------------------------------
# The pass


def decode_step(model, dtype, batch=1):
    """(eager logits, a function giving a model's logits) for one decode step over a 6-token cache."""
    ids = torch.randint(0, 96, (batch, 6), generator=torch.Generator().manual_seed(0))
    keyword = cache_keyword(model)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, use_cache=True, **{keyword: cache})

    def decode(m):
        with torch.no_grad():
            return m(ids[:, -1:], use_cache=True, **{keyword: copy.deepcopy(cache)}).logits

    return decode(model), decode


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_attention_runs_on_the_kernel(family, dtype):
    torch._dynamo.reset()
    model = tiny_model(family, dtype)
    eager, decode = decode_step(model, dtype, batch=2)
    got = decode(compile_dali(model))
    layers = model.config.num_hidden_layers
    assert dali_compile.last_report().cpu_attention == layers
    truth = decode(tiny_model(family, torch.bfloat16).float())[0] if dtype == torch.bfloat16 else None
    assert_close_to_eager(got, eager, truth)


def test_prefill_and_option_off_keep_atens_attention():
    """A prompt (causal, several query rows) is not a decode step; cpu_attention=False turns the pass off."""
    torch._dynamo.reset()
    model = tiny_model("olmoe", torch.float32)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
        got = compile_dali(model)(ids).logits
    assert dali_compile.last_report().cpu_attention == 0
    torch.testing.assert_close(got, eager, rtol=FP32_RTOL, atol=1e-5)
    torch._dynamo.reset()
    eager, decode = decode_step(model, torch.float32)
    got = decode(torch.compile(model, backend="dali", options={"inductor": False, "cpu_attention": False}))
    assert dali_compile.last_report().cpu_attention == 0
    torch.testing.assert_close(got, eager, rtol=FP32_RTOL, atol=1e-5)


class _Attention(torch.nn.Module):
    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.sdpa_kwargs = sdpa_kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs)


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({}, 1),
        ({"scale": 0.7}, 1),
        ({"enable_gqa": True}, 1),
        ({"is_causal": True}, 0),
        ({"dropout_p": 0.5}, 0),
        ({"attn_mask": "bool"}, 1),
        ({"attn_mask": "float"}, 0),
        ({"attn_mask": "per-head"}, 0),
    ],
    ids=["plain", "scale", "gqa", "causal", "dropout", "bool-mask", "float-mask", "per-head-mask"],
)
def test_which_calls_the_pass_takes(kwargs, expected):
    """Only what the kernel computes exactly: no mask or a boolean one shared by the heads, no dropout, not
    causal; results equal eager."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    heads_kv = 2 if kwargs.get("enable_gqa") else 4
    q, k, v = torch.randn(2, 4, 1, 16, generator=gen), torch.randn(2, heads_kv, 9, 16, generator=gen), \
        torch.randn(2, heads_kv, 9, 16, generator=gen)
    masks = {"bool": torch.rand(2, 1, 1, 9, generator=gen) > 0.3, "float": torch.randn(2, 1, 1, 9, generator=gen),
             "per-head": torch.rand(2, 4, 1, 9, generator=gen) > 0.3}
    if "attn_mask" in kwargs:
        kwargs = {"attn_mask": masks[kwargs["attn_mask"]]}
    module = _Attention(**kwargs).train(False)
    torch.manual_seed(0)
    eager = module(q, k, v) if "dropout_p" not in kwargs else None
    got = torch.compile(module, backend="dali", options={"inductor": False})(q, k, v)
    assert dali_compile.last_report().cpu_attention == expected
    if eager is not None:
        torch.testing.assert_close(got, eager, rtol=FP32_RTOL, atol=1e-5)


def test_gradients_keep_atens_attention():
    """Inputs that require grad: the pass leaves the call (the op has no autograd formula) and grads flow."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 1, 8, generator=gen, requires_grad=True)
    k, v = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen)
    out = torch.compile(_Attention(), backend="dali", options={"inductor": False})(q, k, v)
    assert dali_compile.last_report().cpu_attention == 0
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_generate_tokens_equal_with_the_cache_length_dynamic(family):
    """generate() over the compiled forward: dynamo recompiles the decode step with a symbolic cache length
    after two steps; the pass takes that graph's attention too, and the greedy tokens equal eager's."""
    torch._dynamo.reset()
    dali_compile.clear_reports()
    model = tiny_model(family, torch.float32)
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))
    eager = model.generate(ids, max_new_tokens=8, do_sample=False)
    model.forward = compile_dali(model.forward)
    got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, eager)
    decode_graphs = [r for r in dali_compile.reports() if r.cpu_attention]
    assert len(decode_graphs) >= 2  # the static first decode graph and the dynamic one
    assert all(r.cpu_attention == model.config.num_hidden_layers for r in decode_graphs)


def test_static_cache_generate_runs_attention_on_the_kernel():
    """generate() with a static cache: its decode step's attention has a boolean mask over the cache's unfilled
    positions; the pass takes it and the greedy tokens equal eager's (bf16 too)."""
    for dtype in (torch.float32, torch.bfloat16):
        torch._dynamo.reset()
        dali_compile.clear_reports()
        model = tiny_model("qwen3_moe", dtype)
        ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(4))
        eager = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
        model.forward = compile_dali(model.forward)
        got = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
        assert torch.equal(got, eager), dtype
        assert any(r.cpu_attention == model.config.num_hidden_layers for r in dali_compile.reports())
