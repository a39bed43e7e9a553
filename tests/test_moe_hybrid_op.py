"""`dali::moe_hybrid` against an independent fp64 oracle and against transformers' own experts modules.

# T tokens, H hidden, I intermediate, X = 2I (gated) or I, K top-k, E experts

The oracle below is written from the op's contract, not from `dali_compile.ops.expert_math`
(which is the op's implementation), so a mistake there cannot hide in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dali_compile
from dali_compile import Activation, ExpertLayout, LayerSpec, layer_registry
from dali_compile.experts_interface import spec_of_module
from dali_compile.runtime import UnknownLayerError
from dali_compile.tiny_models import tiny_config

H, I = 16, 12  # noqa: E741  distinct from each other, from X = 2I = 24 and from every E below

# The op computes in fp32 and rounds once to the output dtype; the oracle is fp64 on the very same
# (already rounded) inputs. So the error is one output rounding (half an ulp: 2^-8 relative for
# bf16's 8 significant bits, 2^-11 for fp16's 11) plus fp32 accumulation noise (~1e-6), with
# headroom. fp32 has only the accumulation noise.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}
DTYPES = list(TOLERANCES)
GPT_OSS_ALPHA = 1.702
SMALL_LIMIT = 0.5  # up-projection outputs are ~N(0, 1.2) here, so a 0.5 clamp changes most entries


# ----------------------------------------------------------------------------- independent oracle


def naive_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """Elementwise activations, written out from their definitions (fp64 in, fp64 out)."""
    if name == "silu":
        return x / (1 + torch.exp(-x))
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    if name == "relu2":
        return torch.where(x > 0, x * x, torch.zeros_like(x))
    if name == "quick_gelu":
        return x / (1 + torch.exp(-1.702 * x))
    raise AssertionError(f"no oracle for {name}")


def naive_expert(spec: LayerSpec, e: int, x: torch.Tensor) -> torch.Tensor:
    """expert e on one token x [H] in fp64 -> [H]."""
    layout, act = spec.layout, spec.layout.activation
    up = spec.up_weight[e].double()
    down = spec.down_weight[e].double()
    if layout.transposed:  # stored [H, X] and [I, H]: bring both to out-features-first
        up, down = up.T, down.T
    h = up @ x  # [X]
    if layout.has_bias:
        h = h + spec.up_bias[e].double()
    if not layout.gated:
        a = naive_activation(act.name, h)
    else:
        n = h.shape[0] // 2
        gate, lin = (h[0::2], h[1::2]) if layout.interleaved else (h[:n], h[n:])
        if act.limit is not None:  # clamped_swiglu (GPT-OSS) and clamped_silu (DeepSeek-V4)
            gate = torch.minimum(gate, torch.full_like(gate, act.limit))
            lin = torch.maximum(torch.minimum(lin, torch.full_like(lin, act.limit)),
                                torch.full_like(lin, -act.limit))
        if act.name == "clamped_swiglu":
            a = (lin + 1) * gate / (1 + torch.exp(-act.alpha * gate))
        elif act.name == "clamped_silu":
            a = naive_activation("silu", gate) * lin
        else:
            a = naive_activation(act.name, gate) * lin
    y = down @ a  # [H]
    if layout.has_bias:
        y = y + spec.down_bias[e].double()
    return y


def naive_moe(spec: LayerSpec, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """[T, H] fp64: per token, sum over k in order of weights[t, k] * expert(hidden[t])."""
    T, K = ids.shape
    out = torch.zeros(T, hidden.shape[1], dtype=torch.float64)
    for t in range(T):
        x = hidden[t].double()
        for k in range(K):
            out[t] += weights[t, k].double() * naive_expert(spec, int(ids[t, k]), x)
    return out


# ----------------------------------------------------------------------------- layers and routing


@pytest.fixture
def layers():
    """Registers layers in the process registry and releases every handle it gave out afterwards."""
    handles: list[int] = []

    def register(spec: LayerSpec) -> int:
        handle = layer_registry().register(spec)
        handles.append(handle)
        return handle

    yield register
    for handle in handles:
        layer_registry().release(handle)


def make_spec(layout: ExpertLayout, E: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 0.3):
    """Random weights of `layout` with E experts, drawn in fp32 then cast (every dtype sees one draw)."""
    X = 2 * I if layout.gated else I
    up_shape = (E, H, X) if layout.transposed else (E, X, H)
    down_shape = (E, I, H) if layout.transposed else (E, H, I)

    def draw(*shape):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    biases = (draw(E, X), draw(E, H)) if layout.has_bias else (None, None)
    return LayerSpec(layout, draw(*up_shape), draw(*down_shape), *biases, name="test")


def softmax_weights(T: int, K: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(T, K, generator=gen), dim=-1)


def distinct_topk(T: int, K: int, E: int, gen: torch.Generator, experts: list[int] | None = None):
    """Router-like ids: K distinct experts per token, drawn from `experts` (default: all E)."""
    pool = torch.tensor(experts if experts is not None else list(range(E)))
    rows = [pool[torch.randperm(len(pool), generator=gen)[:K]] for _ in range(T)]
    return torch.stack(rows)


def random_inputs(T: int, K: int, E: int, gen: torch.Generator):
    """fp32 hidden [T, H], router-like ids [T, K] and softmax weights [T, K]."""
    return torch.randn(T, H, generator=gen), distinct_topk(T, K, E, gen), softmax_weights(T, K, gen)


def assert_matches_oracle(out, spec, hidden, ids, weights):
    torch.testing.assert_close(out.double(), naive_moe(spec, hidden, ids, weights), **TOLERANCES[out.dtype])


@dataclass(frozen=True)
class Routing:
    T: int
    K: int
    E: int
    ids: Callable[[torch.Generator], torch.Tensor]


ROUTINGS = {
    # decode: one token, the smallest batch a kernel must handle (smaller than any tile)
    "decode_T1": Routing(1, 2, 4, lambda g: distinct_topk(1, 2, 4, g)),
    # odd T that is no power of two and no multiple of K, so no tile/row alignment is assumed
    "odd_T7": Routing(7, 2, 6, lambda g: distinct_topk(7, 2, 6, g)),
    # expert 3 of 8 gets no token: an empty per-expert group must contribute nothing and not crash
    "expert_without_tokens": Routing(5, 2, 8, lambda g: distinct_topk(5, 2, 8, g, [0, 1, 2, 4, 5, 6, 7])),
    # K=1 and every token to expert 2: one maximal group, all other experts empty
    "all_to_one_expert_K1": Routing(6, 1, 5, lambda g: torch.full((6, 1), 2)),
    # K == E: every token visits every expert, in a different order per token
    "K_equals_E": Routing(4, 4, 4, lambda g: distinct_topk(4, 4, 4, g)),
}

SILU, RELU2 = Activation("silu"), Activation("relu2")
GPT_OSS_SWIGLU = Activation("clamped_swiglu", alpha=GPT_OSS_ALPHA, limit=SMALL_LIMIT)
ELEMENTWISE = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "quick_gelu")
VARIANTS = {
    # every elementwise activation as a gate, in the common Mixtral/Qwen layout
    **{f"concatenated-{a}": ExpertLayout(Activation(a)) for a in ELEMENTWISE},
    "interleaved": ExpertLayout(SILU, interleaved=True),
    "transposed": ExpertLayout(SILU, transposed=True),  # Aria
    "transposed-interleaved": ExpertLayout(SILU, interleaved=True, transposed=True),
    "bias": ExpertLayout(SILU, has_bias=True),
    "transposed-bias": ExpertLayout(SILU, transposed=True, has_bias=True),
    # no gate (Nemotron-H): down(act(up x)); X = I
    "nogate-relu2": ExpertLayout(RELU2, gated=False),
    "nogate-gelu": ExpertLayout(Activation("gelu"), gated=False),
    "nogate-silu": ExpertLayout(SILU, gated=False),
    "nogate-transposed-bias-relu": ExpertLayout(
        Activation("relu"), gated=False, transposed=True, has_bias=True
    ),
    # GPT-OSS exactly: interleaved, transposed, biased, clamped SwiGLU with a limit small enough to bite
    "gpt_oss": ExpertLayout(GPT_OSS_SWIGLU, interleaved=True, transposed=True, has_bias=True),
    "clamped_swiglu-concatenated": ExpertLayout(GPT_OSS_SWIGLU),
    # DeepSeek-V4: silu(gate) * up after the same clamps, no alpha, no +1
    "clamped_silu": ExpertLayout(Activation("clamped_silu", limit=SMALL_LIMIT)),
}


def run_case(register, layout, routing: Routing, dtype, seed=0, ids_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    spec = make_spec(layout, routing.E, dtype, gen)
    hidden = torch.randn(routing.T, H, generator=gen).to(dtype)
    ids = routing.ids(gen).to(ids_dtype)
    weights = softmax_weights(routing.T, routing.K, gen).to(dtype)
    out = torch.ops.dali.moe_hybrid(hidden, ids, weights, register(spec))
    return out, naive_moe(spec, hidden, ids, weights), (spec, hidden, ids, weights)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", VARIANTS.values(), ids=VARIANTS.keys())
def test_matches_naive_oracle(layers, layout, dtype, routing):
    out, expected, (_, hidden, _, _) = run_case(layers, layout, routing, dtype)
    assert out.shape == hidden.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[dtype])


def test_routing_cases_are_what_they_claim():
    """The comments on ROUTINGS are only true if the generated ids really have those properties."""
    gen = torch.Generator().manual_seed(0)
    cases = {name: (r, r.ids(gen)) for name, r in ROUTINGS.items()}
    for r, ids in cases.values():
        assert ids.shape == (r.T, r.K) and 0 <= int(ids.min()) and int(ids.max()) < r.E
    assert 3 not in cases["expert_without_tokens"][1].tolist()
    assert set(cases["all_to_one_expert_K1"][1].flatten().tolist()) == {2}
    assert all(sorted(row) == [0, 1, 2, 3] for row in cases["K_equals_E"][1].tolist())


def test_small_limit_clamps_bite():
    """Guards the gpt_oss cases' sensitivity: with limit 0.5 the clamp must change the answer."""
    gen = torch.Generator().manual_seed(0)
    spec = make_spec(VARIANTS["gpt_oss"], 4, torch.float32, gen)
    unclamped = LayerSpec(
        ExpertLayout(Activation("clamped_swiglu", alpha=GPT_OSS_ALPHA, limit=1e9), True, True, True, True),
        *spec.tensors(),
    )
    hidden, ids, weights = random_inputs(5, 2, 4, gen)
    clamped_out, free_out = naive_moe(spec, hidden, ids, weights), naive_moe(unclamped, hidden, ids, weights)
    assert (clamped_out - free_out).abs().max() > 0.1


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_int32_ids(layers, ids_dtype):
    """Both index dtypes the schema accepts give the same answer."""
    out, expected, _ = run_case(
        layers, VARIANTS["gpt_oss"], ROUTINGS["odd_T7"], torch.float32, ids_dtype=ids_dtype
    )
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])


def test_fp32_routing_weights_with_bf16_hidden(layers):
    """Routers often keep their softmax in fp32 while hidden states are bf16; the op accepts both."""
    gen = torch.Generator().manual_seed(1)
    spec = make_spec(VARIANTS["concatenated-silu"], 6, torch.bfloat16, gen)
    hidden = torch.randn(7, H, generator=gen).bfloat16()
    ids, weights = distinct_topk(7, 2, 6, gen), softmax_weights(7, 2, gen)
    out = torch.ops.dali.moe_hybrid(hidden, ids, weights, layers(spec))
    assert out.dtype == torch.bfloat16
    assert_matches_oracle(out, spec, hidden, ids, weights)


def test_same_expert_twice_in_one_token(layers):
    """A repeated id in one token's top-k (an EP sentinel remap can produce it) counts twice."""
    gen = torch.Generator().manual_seed(2)
    spec = make_spec(VARIANTS["bias"], 4, torch.float32, gen)
    hidden = torch.randn(3, H, generator=gen)
    ids = torch.tensor([[1, 1, 2], [0, 3, 0], [2, 2, 2]])
    weights = softmax_weights(3, 3, gen)
    out = torch.ops.dali.moe_hybrid(hidden, ids, weights, layers(spec))
    assert_matches_oracle(out, spec, hidden, ids, weights)


def test_non_contiguous_inputs(layers):
    """Views (a column slice of hidden, transposed routing) must be read by index, not by raw memory."""
    gen = torch.Generator().manual_seed(3)
    spec = make_spec(VARIANTS["interleaved"], 5, torch.float32, gen)
    hidden = torch.randn(6, 2 * H, generator=gen)[:, ::2]
    ids = distinct_topk(6, 2, 5, gen).T.contiguous().T
    weights = softmax_weights(2, 6, gen).T
    assert not (hidden.is_contiguous() or ids.is_contiguous() or weights.is_contiguous())
    out = torch.ops.dali.moe_hybrid(hidden, ids, weights, layers(spec))
    assert_matches_oracle(out, spec, hidden, ids, weights)


def test_empty_batch(layers):
    """T = 0 (a rank or a chunk that received no tokens) gives an empty [0, H], like the fake kernel."""
    spec = make_spec(VARIANTS["concatenated-silu"], 4, torch.float32, torch.Generator().manual_seed(0))
    hidden, ids, weights = torch.empty(0, H), torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2)
    out = torch.ops.dali.moe_hybrid(hidden, ids, weights, layers(spec))
    assert out.shape == (0, H)


@settings(max_examples=30, deadline=None)
@given(
    variant=st.sampled_from(sorted(VARIANTS)),
    E=st.integers(1, 6),
    T=st.integers(1, 9),
    data=st.data(),
)
def test_random_shapes_match_oracle(variant, E, T, data):
    """Any routing (repeats allowed) of any small shape agrees with the oracle."""
    K = data.draw(st.integers(1, E + 1), label="K")  # K may exceed E when ids repeat
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    spec = make_spec(VARIANTS[variant], E, torch.float32, gen)
    hidden = torch.randn(T, H, generator=gen)
    ids = torch.randint(0, E, (T, K), generator=gen)
    weights = torch.randn(T, K, generator=gen)  # any real weights, not only a softmax
    handle = layer_registry().register(spec)
    try:
        out = torch.ops.dali.moe_hybrid(hidden, ids, weights, handle)
    finally:
        layer_registry().release(handle)
    assert_matches_oracle(out, spec, hidden, ids, weights)


# ----------------------------------------------------------------------------- transformers as the oracle


def _nemotron_h_config():
    import transformers

    return transformers.NemotronHConfig(
        hidden_size=H, moe_intermediate_size=I, n_routed_experts=6, num_experts_per_tok=2
    )


def _experts_module(family: str) -> torch.nn.Module:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    if family == "nemotron_h":
        config, cls = _nemotron_h_config(), NemotronHExperts
    else:
        config = tiny_config(family)
        cls = {"mixtral": MixtralExperts, "gpt_oss": GptOssExperts}[family]
    # batched_mm: transformers' straight per-(token, k) bmm, independent of our op and of grouped_mm
    config._experts_implementation = "batched_mm"
    module = cls(config)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return module


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "nemotron_h"])
def test_matches_transformers_experts(layers, family, T):
    """The op on spec_of_module(module) reproduces the module's own forward (fp32, same weights)."""
    torch.manual_seed(0)
    module = _experts_module(family)
    spec = spec_of_module(module)
    E, hidden_size = spec.num_experts, spec.hidden_size
    K = 2
    hidden = torch.randn(T, hidden_size)
    logits = torch.randn(T, E)
    top_logits, ids = logits.topk(K, dim=-1)
    weights = torch.softmax(top_logits, dim=-1)
    with torch.no_grad():
        expected = module(hidden, ids, weights)
    out = torch.ops.dali.moe_hybrid(hidden, ids, weights, layers(spec))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if family == "gpt_oss":  # its tiny config's 0.05 limit must be read through, not defaulted
        assert spec.layout.activation.limit == pytest.approx(module.limit)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def good(layers):
    """A registered fp32 layer (E=4) and valid inputs for it: (hidden, ids, weights, handle)."""
    gen = torch.Generator().manual_seed(0)
    spec = make_spec(VARIANTS["concatenated-silu"], 4, torch.float32, gen)
    return (*random_inputs(3, 2, 4, gen), layers(spec))


def _with(good, hidden=None, ids=None, weights=None, layer=None):
    h, i, w, handle = good
    return (
        h if hidden is None else hidden,
        i if ids is None else ids,
        w if weights is None else weights,
        handle if layer is None else layer,
    )


BAD_INPUTS = {
    "id_equal_to_E": (lambda g: _with(g, ids=torch.tensor([[0, 1], [4, 2], [3, 0]])),
                      IndexError, r"expert id 4 out of range for layer \d+ \(test\) with 4 experts"),
    "negative_id": (lambda g: _with(g, ids=torch.tensor([[0, 1], [-1, 2], [3, 0]])),
                    IndexError, r"expert id -1 out of range .* with 4 experts"),
    "hidden_size_mismatch": (lambda g: _with(g, hidden=torch.randn(3, H + 1)),
                             ValueError, rf"hidden size {H + 1} does not match .* hidden size {H}"),
    "T_mismatch": (lambda g: _with(g, hidden=torch.randn(4, H)),
                   ValueError, r"hidden has 4 tokens but the routing has 3"),
    "ids_weights_shape_mismatch": (lambda g: _with(g, weights=torch.rand(3, 3)),
                                   ValueError, r"topk_ids and topk_weights must both be \[T, K\]"),
    "hidden_not_2d": (lambda g: _with(g, hidden=torch.randn(1, 3, H)),
                      ValueError, r"hidden must be \[T, H\], got shape \(1, 3, 16\)"),
    "ids_1d": (lambda g: _with(g, ids=torch.tensor([0, 1, 2]), weights=torch.rand(3)),
               ValueError, r"must both be \[T, K\]"),
    "float_ids": (lambda g: _with(g, ids=g[1].float()),
                  TypeError, r"topk_ids must be int64 or int32, got torch.float32"),
    "int16_ids": (lambda g: _with(g, ids=g[1].to(torch.int16)),
                  TypeError, r"topk_ids must be int64 or int32, got torch.int16"),
    "integer_hidden": (lambda g: _with(g, hidden=torch.ones(3, H, dtype=torch.int32)),
                       TypeError, r"hidden must be floating point, got torch.int32"),
    "integer_weights": (lambda g: _with(g, weights=torch.ones(3, 2, dtype=torch.int64)),
                        TypeError, r"topk_weights must be floating point"),
    "hidden_dtype_differs_from_layer": (lambda g: _with(g, hidden=g[0].bfloat16()),
                                        TypeError, r"hidden is torch.bfloat16 but layer .* torch.float32"),
    "unknown_layer": (lambda g: _with(g, layer=10**6),
                      UnknownLayerError, r"unknown MoE layer id 1000000; it was never registered"),
    "hidden_on_meta": (lambda g: _with(g, hidden=g[0].to("meta")),
                       ValueError, r"on different devices"),
}


@pytest.mark.parametrize("make_args, error, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_clear_error(good, make_args, error, match):
    with pytest.raises(error, match=match):
        torch.ops.dali.moe_hybrid(*make_args(good))


def test_layer_on_another_device_than_inputs(layers):
    """CPU inputs against a layer whose weights live elsewhere (meta stands in for a GPU here)."""
    gen = torch.Generator().manual_seed(0)
    spec = make_spec(VARIANTS["concatenated-silu"], 4, torch.float32, gen)
    on_meta = LayerSpec(spec.layout, spec.up_weight.to("meta"), spec.down_weight.to("meta"), name="test")
    hidden, ids, weights = torch.randn(3, H), distinct_topk(3, 2, 4, gen), softmax_weights(3, 2, gen)
    with pytest.raises(ValueError, match=r"hidden is on cpu but layer \d+ \(test\) weights are on meta"):
        torch.ops.dali.moe_hybrid(hidden, ids, weights, layers(on_meta))


def _spec_args(layout: ExpertLayout, E=4, up=None, down=None, up_bias=None, down_bias=None):
    gen = torch.Generator().manual_seed(0)
    good_spec = make_spec(layout, E, torch.float32, gen)
    return dict(
        layout=layout,
        up_weight=good_spec.up_weight if up is None else up,
        down_weight=good_spec.down_weight if down is None else down,
        up_bias=good_spec.up_bias if up_bias is None else up_bias,
        down_bias=good_spec.down_bias if down_bias is None else down_bias,
        name="bad",
    )


GATED, BIASED = ExpertLayout(SILU), ExpertLayout(SILU, has_bias=True)
BAD_SPECS = {
    # gated needs X = 2I rows; I rows is the no-gate shape
    "gated_layout_with_nogate_up": (lambda: _spec_args(GATED, up=torch.randn(4, I, H)),
                                    r"layer 'bad': up weight \(4, 12, 16\) does not fit down weight .* "
                                    r"expected up \(4, 24, 16\)"),
    # non-transposed tensors under a transposed layout
    "transposed_layout_with_plain_tensors": (
        lambda: _spec_args(GATED, up=torch.randn(4, 2 * I, H), down=torch.randn(4, H, I))
        | dict(layout=ExpertLayout(SILU, transposed=True)),
        r"does not fit down weight .*transposed"),
    "expert_count_mismatch": (lambda: _spec_args(GATED, down=torch.randn(5, H, I)),
                              r"does not fit down weight"),
    "weights_not_3d": (lambda: _spec_args(GATED, up=torch.randn(2 * I, H)), r"expert weights must be 3-D"),
    "dtypes_differ": (lambda: _spec_args(GATED, down=torch.randn(4, H, I, dtype=torch.float64)),
                      r"must share one floating dtype"),
    "bias_layout_without_biases": (lambda: _spec_args(GATED) | dict(layout=BIASED),
                                   r"has_bias=True needs both biases"),
    "up_bias_wrong_shape": (lambda: _spec_args(BIASED, up_bias=torch.randn(4, I)),
                            r"up bias must be \[4, 24\] on cpu, got \(4, 12\)"),
    "down_bias_wrong_shape": (lambda: _spec_args(BIASED, down_bias=torch.randn(4, I)),
                              r"down bias must be \[4, 16\] on cpu, got \(4, 12\)"),
}


@pytest.mark.parametrize("make_kwargs, match", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_layer_spec_rejects_bad_shapes(make_kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerSpec(**make_kwargs())


def test_layer_spec_rejects_a_lone_bias_on_a_layout_without_bias():
    """has_bias=False with one stray bias would be silently ignored by the math; it must be refused."""
    with pytest.raises(ValueError, match=r"has_bias=False needs no bias"):
        LayerSpec(**_spec_args(GATED, up_bias=torch.randn(4, 2 * I)))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Activation("clamped_swiglu"), r"alpha is required for clamped_swiglu"),
        (lambda: Activation("clamped_swiglu", alpha=1.702), r"limit for clamped_swiglu and clamped_silu"),
        (lambda: Activation("silu", alpha=1.0), r"'silu': alpha is required for clamped_swiglu and only for it"),
        (lambda: Activation("clamped_silu", alpha=1.0, limit=1.0), r"'clamped_silu': alpha is required"),
        (lambda: Activation("swish"), r"unknown activation 'swish'"),
        (lambda: ExpertLayout(SILU, gated=False, interleaved=True), r"interleaved .* needs a gate"),
        (lambda: ExpertLayout(GPT_OSS_SWIGLU, gated=False), r"clamped_swiglu is a gated activation"),
    ],
    ids=["swiglu_no_params", "swiglu_no_limit", "silu_with_alpha", "clamped_silu_with_alpha", "unknown_name",
         "interleaved_nogate",
         "swiglu_nogate"],
)
def test_activation_and_layout_reject_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ----------------------------------------------------------------------------- registry


def _layer(E=4, layout=GATED, seed=0):
    return make_spec(layout, E, torch.float32, torch.Generator().manual_seed(seed))


def test_registering_the_same_layer_twice_gives_one_handle(layers):
    """A recompile re-registers the same tensors: the table must not grow, the handle must not change."""
    spec = _layer()
    before = len(layer_registry())
    first = layers(spec)
    again = layers(LayerSpec(spec.layout, *spec.tensors(), name="renamed"))  # a new spec object, same tensors
    assert first == again and len(layer_registry()) == before + 1
    # same tensors but another layout, or a copy of the tensors, is another layer
    other_layout = layers(LayerSpec(ExpertLayout(Activation("gelu")), *spec.tensors()))
    copied = layers(LayerSpec(spec.layout, spec.up_weight.clone(), spec.down_weight.clone()))
    assert len({first, other_layout, copied}) == 3 and len(layer_registry()) == before + 3


def test_released_handle_is_unknown_to_the_op(layers, good):
    hidden, ids, weights, handle = good
    torch.ops.dali.moe_hybrid(hidden, ids, weights, handle)
    layer_registry().release(handle)
    assert handle not in layer_registry()
    with pytest.raises(UnknownLayerError, match=rf"unknown MoE layer id {handle}; .* has been released"):
        torch.ops.dali.moe_hybrid(hidden, ids, weights, handle)


def test_rebind_changes_the_ops_output(layers):
    """A reloaded model: the handle baked into a compiled graph now computes with the new tensors."""
    old, new = _layer(seed=0), _layer(seed=1)
    handle = layers(old)
    gen = torch.Generator().manual_seed(5)
    hidden, ids, weights = random_inputs(5, 2, 4, gen)
    before = torch.ops.dali.moe_hybrid(hidden, ids, weights, handle)
    layer_registry().rebind(handle, new)
    after = torch.ops.dali.moe_hybrid(hidden, ids, weights, handle)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(before.double(), naive_moe(old, hidden, ids, weights), **tol)
    torch.testing.assert_close(after.double(), naive_moe(new, hidden, ids, weights), **tol)
    assert not torch.allclose(before, after)
    # the handle now answers for the new tensors, and the old tensors are a new layer again
    assert layers(new) == handle
    assert layers(old) != handle


@pytest.mark.parametrize(
    "replacement",
    [lambda: _layer(E=5), lambda: _layer(layout=ExpertLayout(Activation("gelu")))],
    ids=["other_shape", "other_layout"],
)
def test_rebind_to_another_shape_or_layout_raises(layers, good, replacement):
    hidden, ids, weights, handle = good
    before = torch.ops.dali.moe_hybrid(hidden, ids, weights, handle)
    with pytest.raises(ValueError, match=rf"layer {handle} cannot be rebound to tensors of another layout"):
        layer_registry().rebind(handle, replacement())
    torch.testing.assert_close(torch.ops.dali.moe_hybrid(hidden, ids, weights, handle), before)


def test_package_exports_the_op():
    assert "dali::moe_hybrid" in dali_compile.ops.all_op_names()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["concatenated-silu", "gpt_oss", "nogate-relu2", "clamped_silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_hybrid_on_cuda_runs_the_triton_kernels_and_equals_the_reference(layers, variant, dtype):
    """dali::moe_hybrid on CUDA tensors (all experts resident) against the CPU reference."""
    gen = torch.Generator().manual_seed(0)
    routing = ROUTINGS["odd_T7"]
    spec = make_spec(VARIANTS[variant], routing.E, dtype, gen)
    cuda_spec = spec.with_tensors(*[None if t is None else t.cuda() for t in spec.tensors()])
    ids = routing.ids(gen)
    hidden = torch.randn(routing.T, H, generator=gen).to(dtype)
    weights = torch.softmax(torch.randn(routing.T, routing.K, generator=gen), -1)
    want = torch.ops.dali.moe_hybrid(hidden, ids, weights, layers(spec))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = torch.ops.dali.moe_hybrid(hidden.cuda(), ids.cuda(), weights.cuda(), layers(cuda_spec))
    assert any(e.name == "dali::gpu_experts" for e in prof.events())
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOLERANCES[dtype])
