"""The C++ CPU expert runtime (`dali::cpu_experts`, `_submit`, `_wait`) against the fp32 reference.

# T tokens, K top-k, E experts, H hidden, I intermediate, X = 2I (gated) or I

The oracle is `ops.expert_math.expert_forward` on a `LayerSpec` of the same tensors: each selected
slot must equal topk_weight * expert(hidden), every other slot exactly 0.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from dali_compile import Activation, ExpertLayout, LayerSpec
from dali_compile.ops import cpu_experts as ops
from dali_compile.ops.expert_math import expert_forward, expert_weights, gate_and_activate
from dali_compile.runtime import cpu_extension

# Every dtype gets the same bound: both sides widen the identical bf16/fp16/fp32 inputs exactly to
# fp32 and compute in fp32, so they differ only by fp32 summation order (measured below 1e-6 of the
# largest output); AVX-512 BF16 dot products also round each pair sum, still far inside this.
RTOL = 2e-5

E, H, I = 6, 150, 37  # noqa: E741  H: two 64-column tiles + one vector + a scalar tail; I odd

LAYOUTS = {  # one per family shape, covering every activation
    "mixtral": ExpertLayout(Activation("silu")),
    "gpt_oss": ExpertLayout(
        Activation("clamped_swiglu", alpha=1.702, limit=0.7), interleaved=True, transposed=True, has_bias=True
    ),
    "nemotron": ExpertLayout(Activation("relu2"), gated=False),
    "aria": ExpertLayout(Activation("gelu"), transposed=True),
    "interleaved_bias": ExpertLayout(Activation("gelu_tanh"), interleaved=True, has_bias=True),
    "nogate_transposed_bias": ExpertLayout(Activation("quick_gelu"), gated=False, transposed=True, has_bias=True),
    "relu": ExpertLayout(Activation("relu")),
    "deepseek_v4": ExpertLayout(Activation("clamped_silu", limit=0.7)),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


pytestmark = pytest.mark.usefixtures("cpu_runtime")


@pytest.fixture
def isa():
    """Runs the test body on a forced ISA path, then goes back to the best one."""
    yield cpu_extension.set_isa
    cpu_extension.set_isa("auto")


def make_spec(layout: ExpertLayout, dtype, seed=0, experts=E) -> LayerSpec:
    gen = torch.Generator().manual_seed(seed)
    X = 2 * I if layout.gated else I

    def draw(*shape):
        return (torch.randn(*shape, generator=gen) * 0.2).to(dtype)

    up = draw(experts, H, X) if layout.transposed else draw(experts, X, H)
    down = draw(experts, I, H) if layout.transposed else draw(experts, H, I)
    biases = (draw(experts, X), draw(experts, H)) if layout.has_bias else (None, None)
    return LayerSpec(layout, up, down, *biases, name=f"test-{dtype}")


def make_routing(case: str, dtype, seed=0, experts=E):
    """hidden [T, H], topk_ids [T, K], topk_weights [T, K] for one routing case."""
    gen = torch.Generator().manual_seed(seed)

    def topk(T, K, pool):
        return torch.stack([pool[torch.randperm(len(pool), generator=gen)[:K]] for _ in range(T)])

    every = torch.arange(experts)
    if case == "decode":  # one token: the memory-bound case the kernels are tuned for
        ids = topk(1, 2, every)
    elif case == "odd":  # T not a multiple of the 3-token register tile
        ids = topk(7, 2, every)
    elif case == "zero_tokens":  # expert E-1 gets no token; 33 = 11 groups of 3 tokens
        ids = topk(33, 3, every[:-1])
    elif case == "one_expert":  # every token on expert 2: one expert's long token loop, others idle
        ids = torch.full((9, 1), 2)
    elif case == "k_equals_e":  # each token visits every expert
        ids = topk(5, experts, every)
    else:
        raise ValueError(case)
    T, K = ids.shape
    hidden = (torch.randn(T, H, generator=gen) * 0.5).to(dtype)
    weights = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    return hidden, ids, weights


def reference(spec: LayerSpec, hidden, ids, weights, mask=None) -> torch.Tensor:
    T, K = ids.shape
    out = torch.zeros(T, K, hidden.shape[1])
    for t in range(T):
        for k in range(K):
            expert = int(ids[t, k])
            if mask is None or mask[expert]:
                out[t, k] = float(weights[t, k]) * expert_forward(spec, expert, hidden[t : t + 1].float())[0]
    return out


def assert_matches(got: torch.Tensor, want: torch.Tensor, mask_slots: torch.Tensor | None = None):
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().max().clamp_min(1e-30)
    err = float((got - want).abs().max() / scale)
    assert err <= RTOL, f"relative error {err:.2e} > {RTOL:.0e}"
    if mask_slots is not None:
        assert torch.all(got[~mask_slots] == 0), "slots of unselected experts must be exactly zero"


def run(spec, hidden, ids, weights, mask=None):
    return ops.cpu_experts(spec, hidden, ids, weights, mask)


@pytest.mark.parametrize("case", ["decode", "odd", "zero_tokens", "one_expert", "k_equals_e"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_reference(layout, dtype, case):
    spec = make_spec(LAYOUTS[layout], dtype)
    hidden, ids, weights = make_routing(case, dtype)
    assert_matches(run(spec, hidden, ids, weights), reference(spec, hidden, ids, weights))
    # int32 ids and low-precision topk weights take the same path
    assert_matches(run(spec, hidden, ids.int(), weights.to(dtype)), reference(spec, hidden, ids, weights.to(dtype)))
    # bf16 / fp16 routing weights are widened by the kernel itself, fp64 ones rounded by ATen: exactly their fp32
    for low in (weights.to(dtype), weights.double()):
        assert torch.equal(run(spec, hidden, ids, low), run(spec, hidden, ids, low.float()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_blocks_of_many_short_rows(dtype):
    """A decode step with short expert rows and many of them: a task's block is sized in bytes of weights
    (csrc/core/stream_blocks.h), so it holds more than 64 rows here (gate/up: 76 of 300, down: 132 of 520), the
    last block of each projection partial."""
    gen = torch.Generator().manual_seed(5)
    wide, inter = 520, 300
    up = (torch.randn(E, 2 * inter, wide, generator=gen) * 0.2).to(dtype)
    down = (torch.randn(E, wide, inter, generator=gen) * 0.2).to(dtype)
    spec = LayerSpec(LAYOUTS["mixtral"], up, down, None, None, name="short-rows")
    hidden = (torch.randn(1, wide, generator=gen) * 0.5).to(dtype)
    ids, weights = torch.tensor([[1, 4]]), torch.tensor([[0.7, 0.3]])
    assert_matches(run(spec, hidden, ids, weights), reference(spec, hidden, ids, weights))


@pytest.mark.parametrize("case", ["odd", "k_equals_e"])
@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss", "nemotron"])
def test_expert_mask_selects_slots(layout, case):
    """Masked-out experts' slots are exactly zero; the rest equal the unmasked result."""
    spec = make_spec(LAYOUTS[layout], torch.bfloat16)
    hidden, ids, weights = make_routing(case, torch.bfloat16)
    for mask in (torch.tensor([True, False, True, True, False, False]), torch.zeros(E, dtype=torch.bool)):
        got = run(spec, hidden, ids, weights, mask)
        assert_matches(got, reference(spec, hidden, ids, weights, mask), mask_slots=mask[ids])
        if mask.any():
            # Splitting experts between devices is exact: the CPU part plus the complement is the whole.
            other = run(spec, hidden, ids, weights, ~mask)
            torch.testing.assert_close(got + other, run(spec, hidden, ids, weights), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_isa_paths_agree(layout, dtype, isa):
    """Every path this CPU supports matches the reference and the other paths beyond rounding."""
    spec = make_spec(LAYOUTS[layout], dtype, seed=3)
    hidden, ids, weights = make_routing("zero_tokens", dtype, seed=3)
    want = reference(spec, hidden, ids, weights)
    results = {}
    for name in cpu_extension.supported_isas():
        isa(name)
        assert cpu_extension.cpu_isa() == name
        results[name] = run(spec, hidden, ids, weights)
        assert_matches(results[name], want)
    assert "portable" in results and len(results) >= 2 or cpu_extension.best_isa() == "portable"
    first = next(iter(results.values()))
    for got in results.values():
        assert_matches(got, first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_silu_at_extreme_gate_values(dtype, isa):
    """The vectorised SiLU (its own exp, range-clamped) matches torch where exp over- or underflows:
    gate pre-activations span about +-150, on every ISA path, for the streamed and the dense path."""
    spec = make_spec(LAYOUTS["mixtral"], dtype, seed=5)
    spec = LayerSpec(spec.layout, (spec.up_weight.float() * 60).to(dtype), spec.down_weight, name="extreme")
    hidden, ids, weights = make_routing("zero_tokens", dtype, seed=5)
    gates = hidden.float() @ spec.up_weight.float()[0, :I].T
    assert gates.min() < -88 and gates.max() > 88, "the case must reach exp's overflow range"
    want = reference(spec, hidden, ids, weights)
    default = cpu_extension.get_dense_gemm_min_tokens()
    try:
        for name in cpu_extension.supported_isas():
            isa(name)
            for min_tokens in (0, 1):  # streamed kernels, then (fp32) the dense GEMM path
                cpu_extension.set_dense_gemm_min_tokens(min_tokens)
                got = run(spec, hidden, ids, weights)
                assert torch.isfinite(got).all()
                assert_matches(got, want)
    finally:
        cpu_extension.set_dense_gemm_min_tokens(default)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_every_isa_path_is_compiled_in():
    """The AVX-512 path cannot run on an AVX2-only machine, but it must be in the library: one binary for all."""
    if not any(name in platform.machine() for name in ("x86_64", "AMD64")):
        pytest.skip("the SIMD paths are x86-64 only")
    library = cpu_extension.library_path()
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True).stdout
    assert "%zmm" in code and "vdpbf16ps" in code  # AVX-512 and its BF16 dot products
    assert "vfmadd231ps %ymm" in code  # AVX2 + FMA


def test_isa_selection_errors(isa):
    with pytest.raises(ValueError, match="unknown ISA path"):
        isa("sse9")
    missing = [name for name in cpu_extension.ISA_NAMES if name not in cpu_extension.supported_isas()]
    for name in missing:
        with pytest.raises(RuntimeError, match="cannot run"):
            isa(name)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(threads):
    default = cpu_extension.get_num_threads()
    try:
        cpu_extension.set_num_threads(threads)
        assert cpu_extension.get_num_threads() == threads
        for layout in ("mixtral", "gpt_oss"):
            spec = make_spec(LAYOUTS[layout], torch.bfloat16, seed=4)
            hidden, ids, weights = make_routing("zero_tokens", torch.bfloat16, seed=4)
            assert_matches(run(spec, hidden, ids, weights), reference(spec, hidden, ids, weights))
    finally:
        cpu_extension.set_num_threads(default)


@pytest.mark.parametrize("transposed_max_rows", [0, 1 << 20], ids=["plain_gemm", "transposed_gemm"])
@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss", "nemotron", "aria"])
def test_dense_gemm_path_for_many_tokens(layout, transposed_max_rows):
    """fp32 experts with at least `min_tokens` tokens run as two ATen GEMMs (either form: x . w^T, or
    w . x^T and a transposing copy); the rest stream, in the same call."""
    default = cpu_extension.get_dense_gemm_min_tokens()
    default_rows = cpu_extension.get_transposed_gemm_max_rows()
    spec = make_spec(LAYOUTS[layout], torch.float32, seed=11)
    hidden, ids, weights = make_routing("zero_tokens", torch.float32, seed=11)  # 2 to 30 tokens per expert
    counts = torch.bincount(ids.flatten(), minlength=E)
    try:
        cpu_extension.set_dense_gemm_min_tokens(int(counts[counts > 0].median()))  # some experts each way
        cpu_extension.set_transposed_gemm_max_rows(transposed_max_rows)
        assert_matches(run(spec, hidden, ids, weights), reference(spec, hidden, ids, weights))
    finally:
        cpu_extension.set_dense_gemm_min_tokens(default)
        cpu_extension.set_transposed_gemm_max_rows(default_rows)


def bf16_gemm_reference(spec: LayerSpec, hidden, ids, weights) -> torch.Tensor:
    """What the bf16 GEMM path computes: each projection a bf16 linear (its input rounded to bf16, fp32 sums rounded
    to bf16); biases, activation and the weighting in fp32."""
    layout = spec.layout

    def bf16_linear(x, w):
        return (x.bfloat16().float() @ (w if layout.transposed else w.T)).bfloat16().float()

    out = torch.zeros(*ids.shape, hidden.shape[1])
    for e in range(spec.up_weight.shape[0]):
        t, k = (ids == e).nonzero(as_tuple=True)
        up, down = expert_weights(spec, e)
        h = bf16_linear(hidden[t].float(), up)
        if layout.has_bias:
            h = h + spec.up_bias[e].float()
        y = bf16_linear(gate_and_activate(layout, h), down)
        if layout.has_bias:
            y = y + spec.down_bias[e].float()
        out[t, k] = weights[t, k, None] * y
    return out


@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss", "nemotron", "aria", "interleaved_bias"])
def test_bf16_gemm_path_for_many_tokens(layout):
    """bf16 experts with at least `bf16_gemm_min_tokens` tokens (default on AMX-BF16 CPUs; forced here) run as two
    ATen bf16 GEMMs on the stored weights: equal to their own bf16-rounding reference (all but a few elements
    exactly, the rest where an fp32 sum's order flips one bf16 rounding) and within bf16 rounding of the fp32
    reference; the other experts stream, in the same call."""
    default = cpu_extension.get_bf16_gemm_min_tokens()
    spec = make_spec(LAYOUTS[layout], torch.bfloat16, seed=12)
    hidden, ids, weights = make_routing("zero_tokens", torch.bfloat16, seed=12)  # 2 to 30 tokens per expert
    counts = torch.bincount(ids.flatten(), minlength=E)
    threshold = int(counts[counts > 0].median())
    try:
        cpu_extension.set_bf16_gemm_min_tokens(threshold)  # some experts each way
        got = run(spec, hidden, ids, weights)
    finally:
        cpu_extension.set_bf16_gemm_min_tokens(default)
    by_gemm = (counts >= threshold)[ids]  # [T, K]: slots whose expert took the GEMM
    assert by_gemm.any() and not by_gemm.all()
    own = bf16_gemm_reference(spec, hidden, ids, weights)
    scale = own.abs().max()
    differ = (got[by_gemm] - own[by_gemm]).abs() > 1e-6 * scale
    assert float(differ.float().mean()) < 0.02, f"{int(differ.sum())} of {differ.numel()} elements differ"
    assert float((got[by_gemm] - own[by_gemm]).abs().max() / scale) < 1e-2
    want = reference(spec, hidden, ids, weights)
    assert float((got - want).abs().max() / want.abs().max()) < 2e-2  # bf16 rounding of h, act and y
    assert_matches(got[~by_gemm], want[~by_gemm])  # the streamed experts: as exact as ever


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_decode_step_uses_every_thread():
    """One token, two active experts: both phases split experts *and* rows, so both threads get tasks."""
    default = cpu_extension.get_num_threads()
    # Decode-sized projections (hidden 2048, intermediate 4096): the kernel's split heuristics see real shapes.
    up = torch.full((2, 8192, 2048), 0.01, dtype=torch.bfloat16)
    down = torch.full((2, 2048, 4096), 0.01, dtype=torch.bfloat16)
    hidden, ids, weights = torch.randn(1, 2048).bfloat16(), torch.tensor([[1, 0]]), torch.rand(1, 2)
    args = (hidden, ids, weights, up, down, None, None, None, True, False, False, "silu", 0.0, 0.0)
    try:
        cpu_extension.set_num_threads(2)
        torch.ops.dali.cpu_experts(*args)
        # The down projection's region was split across both threads (which thread then claims which task is
        # up to the OS scheduler: on a busy host one may run them all before the other wakes).
        assert cpu_extension.last_region_width() == 2
    finally:
        cpu_extension.set_num_threads(default)


def test_default_thread_count_is_physical_cores():
    assert cpu_extension.get_num_threads() == int(os.environ.get("DALI_CPU_THREADS") or cpu_extension.physical_cores())


def test_weights_read_in_place_at_any_alignment():
    """Weights may be views with padded rows and an odd element offset (addresses not 16/32/64-byte
    aligned): only unit stride along the last dimension is required, and they are never copied."""
    spec = make_spec(LAYOUTS["mixtral"], torch.bfloat16, seed=5)
    hidden, ids, weights = make_routing("odd", torch.bfloat16, seed=5)
    up, down = spec.up_weight, spec.down_weight
    padded_up = torch.zeros(E, up.shape[1], H + 3, dtype=up.dtype)[:, :, 1 : H + 1]
    padded_up.copy_(up)
    flat_down = torch.zeros(down.numel() + 1, dtype=down.dtype)
    shifted_down = flat_down[1:].view(down.shape)
    shifted_down.copy_(down)
    assert padded_up.data_ptr() % 32 != 0 and shifted_down.data_ptr() % 32 != 0
    views = spec.with_tensors(padded_up, shifted_down)
    assert_matches(run(views, hidden, ids, weights), reference(spec, hidden, ids, weights))


def test_transposed_weights_view_is_refused():
    """A transposed view has stride 1 in the wrong dimension: reading it in place would stream
    across rows, so the op refuses it and says what to do instead."""
    spec = make_spec(LAYOUTS["mixtral"], torch.float32)
    hidden, ids, weights = make_routing("decode", torch.float32)
    up_view = spec.up_weight.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, column-major
    with pytest.raises(ValueError, match="unit stride in its last dimension"):
        torch.ops.dali.cpu_experts(
            hidden, ids, weights, up_view, spec.down_weight, None, None, None, True, False, False, "silu", 0.0, 0.0
        )


def _args(spec, hidden, ids, weights, mask=None):
    (up, down, up_bias, down_bias), flags, _ = ops.spec_args(spec)
    return [hidden, ids, weights, up, down, up_bias, down_bias, mask, *flags]


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.__setitem__(0, a[0].float()), TypeError, "same dtype"),
        (lambda a: a.__setitem__(4, a[4].float()), TypeError, "share one dtype"),
        (lambda a: a.__setitem__(0, a[0][:, :-1]), ValueError, "hidden size"),
        (lambda a: a.__setitem__(4, a[4][:-1]), ValueError, r"down has shape .* expected"),
        (lambda a: a.__setitem__(3, a[3][:, :-2]), ValueError, r"up has shape .* expected"),
        (lambda a: a.__setitem__(1, a[1][:-1]), ValueError, r"topk_ids must be \[T, K\]"),
        (lambda a: a.__setitem__(1, a[1].float()), TypeError, "int64 or int32"),
        (lambda a: a.__setitem__(1, torch.where(a[1] == 1, E, a[1])), IndexError, f"expert id {E} .* out of range"),
        (lambda a: a.__setitem__(1, torch.where(a[1] == 1, -1, a[1])), IndexError, "expert id -1 .* out of range"),
        (lambda a: a.__setitem__(11, "swish"), ValueError, "unknown activation 'swish'"),
        (lambda a: a.__setitem__(7, torch.ones(E - 1, dtype=torch.bool)), ValueError, r"expert_mask must be \[E\]"),
        (lambda a: a.__setitem__(8, False), ValueError, r"interleaved gate/up layout needs gated=True"),
    ],
    ids=[
        "hidden_dtype", "down_dtype", "hidden_size", "down_shape", "up_shape", "ids_shape", "ids_dtype",
        "id_too_large", "id_negative", "activation", "mask_shape", "interleaved_without_gate",
    ],
)
@pytest.mark.parametrize("op", ["cpu_experts", "cpu_experts_submit"])
def test_bad_inputs_raise_clear_errors(op, change, error, match):
    layout = LAYOUTS["interleaved_bias"]  # has biases and interleaving, so every check applies
    spec = make_spec(layout, torch.bfloat16)
    args = _args(spec, *make_routing("odd", torch.bfloat16))
    change(args)
    with pytest.raises(error, match=match):
        getattr(torch.ops.dali, op)(*args)
    assert cpu_extension.outstanding_jobs() == 0  # a refused submit queues nothing


def test_fake_kernels_reject_bad_shapes_too():
    spec = make_spec(LAYOUTS["mixtral"], torch.float32)
    args = _args(spec, *make_routing("odd", torch.float32))
    args[4] = args[4][:-1]
    with torch._subclasses.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match="down has shape"):
            torch.ops.dali.cpu_experts(*fake)


# ---- the async pair


def test_submit_then_wait_matches_sync_and_fake_metadata():
    spec = make_spec(LAYOUTS["gpt_oss"], torch.bfloat16, seed=6)
    hidden, ids, weights = make_routing("zero_tokens", torch.bfloat16, seed=6)
    handle = ops.cpu_experts_submit(spec, hidden, ids, weights)
    assert handle.dtype == torch.int64 and handle.shape == (1,) and int(handle) > 0
    got = ops.cpu_experts_wait(handle, spec, hidden, ids, weights)
    assert_matches(got, reference(spec, hidden, ids, weights))
    torch.testing.assert_close(got, run(spec, hidden, ids, weights), rtol=0, atol=0)
    with torch._subclasses.FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) if t is not None else None for t in _args(spec, hidden, ids, weights)[:8]]
        fake = ops._cpu_experts_wait_fake(mode.from_tensor(handle), *fake_args)
    assert (fake.shape, fake.dtype, fake.stride()) == (got.shape, got.dtype, got.stride())
    assert cpu_extension.outstanding_jobs() == 0


def busy_job():
    """A job of about a tenth of a second at the head of the queue: jobs submitted after it wait in the
    queue (one runner, in order) while the test looks at them. Returns its handle and arguments."""
    gen = torch.Generator().manual_seed(12)
    up, down = torch.randn(4, 1024, 512, generator=gen) * 0.05, torch.randn(4, 512, 512, generator=gen) * 0.05
    hidden, ids = torch.randn(256, 512, generator=gen), torch.randint(0, 4, (256, 4), generator=gen)
    args = [hidden, ids, torch.rand(256, 4, generator=gen), up, down, None, None, None,
            True, False, False, "silu", 0.0, 0.0]
    return torch.ops.dali.cpu_experts_submit(*args), args


def test_queued_job_holds_its_inputs_until_done():
    """The job owns a reference to each input while it is queued (so they outlive a caller that fails
    before its wait), and drops them once done: use counts rise at submit and are back after the wait."""
    spec = make_spec(LAYOUTS["gpt_oss"], torch.float32, seed=7)  # biases too
    hidden, ids, weights = make_routing("k_equals_e", torch.float32, seed=7)
    mask = torch.ones(E, dtype=torch.bool)
    args = _args(spec, hidden, ids, weights, mask)
    inputs = [t for t in args[:8] if t is not None]
    assert len(inputs) == 8
    before = [t._use_count() for t in inputs]
    busy, busy_args = busy_job()
    handle = torch.ops.dali.cpu_experts_submit(*args)
    queued = [t._use_count() for t in inputs]
    torch.ops.dali.cpu_experts_wait(busy, *busy_args[:8])
    got = torch.ops.dali.cpu_experts_wait(handle, *args[:8])
    assert all(q > b for q, b in zip(queued, before, strict=True)), (before, queued)
    assert [t._use_count() for t in inputs] == before
    assert_matches(got, reference(spec, hidden, ids, weights, mask))


def test_concurrent_submits_waited_out_of_order():
    """Two Python threads keep several jobs in flight each and wait in reverse order."""
    layouts = ["mixtral", "gpt_oss", "nemotron"]
    cases = {(name, seed): make_spec(LAYOUTS[name], torch.bfloat16, seed=seed) for name in layouts for seed in (8, 9)}
    routings = {key: make_routing("zero_tokens", torch.bfloat16, seed=key[1]) for key in cases}
    want = {key: reference(cases[key], *routings[key]) for key in cases}
    errors = []

    def worker(seed):
        try:
            keys = [(name, seed) for name in layouts] * 2
            handles = [(key, ops.cpu_experts_submit(cases[key], *routings[key])) for key in keys]
            for key, handle in reversed(handles):
                assert_matches(ops.cpu_experts_wait(handle, cases[key], *routings[key]), want[key])
        except Exception as error:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (8, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert cpu_extension.outstanding_jobs() == 0


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda a: a.__setitem__(0, a[0][:, :-1]), "hidden"),  # same data_ptr, other shape
        (lambda a: a.__setitem__(1, a[1].clone()), "topk_ids"),  # equal values, another buffer
        (lambda a: a.__setitem__(2, a[2].clone()), "topk_weights"),  # what buffer reuse would look like
        (lambda a: a.__setitem__(4, a[4].clone()), "down"),
        (lambda a: a.__setitem__(7, torch.ones(E, dtype=torch.bool)), "expert_mask"),  # absent at submit
    ],
    ids=["hidden_shape", "ids_copy", "weights_copy", "down_copy", "mask_added"],
)
def test_wait_refuses_other_tensors_than_the_submits(change, name):
    """The job reads its inputs until it is done: the wait must be given the submit's very tensors."""
    spec = make_spec(LAYOUTS["mixtral"], torch.float32)
    args = _args(spec, *make_routing("odd", torch.float32))
    handle = torch.ops.dali.cpu_experts_submit(*args)
    waited = list(args[:8])
    change(waited)
    with pytest.raises(ValueError, match=f"{name} is not the tensor given to dali::cpu_experts_submit"):
        torch.ops.dali.cpu_experts_wait(handle, *waited)
    with pytest.raises(ValueError, match="already waited"):  # the job is consumed, and the error said why
        torch.ops.dali.cpu_experts_wait(handle, *args[:8])
    assert cpu_extension.outstanding_jobs() == 0


def test_wait_errors():
    spec = make_spec(LAYOUTS["mixtral"], torch.float32)
    hidden, ids, weights = make_routing("odd", torch.float32)
    with pytest.raises(ValueError, match="unknown handle"):
        ops.cpu_experts_wait(torch.tensor([10**12]), spec, hidden, ids, weights)
    with pytest.raises(ValueError, match="int64 \\[1\\]"):
        ops.cpu_experts_wait(torch.tensor([1, 2]), spec, hidden, ids, weights)
    with pytest.raises(ValueError, match="topk_weights must have the shape of topk_ids"):
        ops.cpu_experts_wait(torch.tensor([0]), spec, hidden, ids, weights[:, :1])


def test_empty_job_runs_nothing():
    spec = make_spec(LAYOUTS["mixtral"], torch.float32)
    hidden, ids, weights = make_routing("odd", torch.float32)
    handle = ops.cpu_experts_submit(spec, hidden, ids, weights, torch.zeros(E, dtype=torch.bool))
    assert int(handle) == ops.EMPTY_JOB
    for _ in range(2):  # the empty job may be waited on repeatedly
        got = ops.cpu_experts_wait(handle, spec, hidden, ids, weights, torch.zeros(E, dtype=torch.bool))
        assert got.shape == (7, 2, H) and not got.any()


@pytest.mark.inductor
def test_inductor_keeps_submit_before_other_work_and_wait():
    """submit -> unrelated torch work -> wait, compiled by inductor, equals eager."""
    spec = make_spec(LAYOUTS["mixtral"], torch.float32, seed=10)
    hidden, ids, weights = make_routing("odd", torch.float32, seed=10)
    (up, down, _, _), flags, _ = ops.spec_args(spec)

    def step(hidden, ids, weights, other):
        handle = torch.ops.dali.cpu_experts_submit(hidden, ids, weights, up, down, None, None, None, *flags)
        busy = torch.tanh(other @ other.T).sum(dim=1)  # stands in for the GPU experts
        contributions = torch.ops.dali.cpu_experts_wait(handle, hidden, ids, weights, up, down, None, None, None)
        return contributions.sum(dim=1) + busy[: hidden.shape[0], None]

    other = torch.randn(16, 16)
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    want = reference(spec, hidden, ids, weights).sum(dim=1) + torch.tanh(other @ other.T).sum(dim=1)[:7, None]
    got, (code,) = run_and_get_code(compiled, hidden, ids, weights, other)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-5)
    # Both calls survive, once each, submit first (the handle is the data dependency between them).
    submit, wait = "torch.ops.dali.cpu_experts_submit.default(", "torch.ops.dali.cpu_experts_wait.default("
    assert code.count(submit) == 1 and code.count(wait) == 1 and code.index(submit) < code.index(wait)
    # The second call reuses the compiled graph: a fresh job, a fresh handle.
    torch.testing.assert_close(compiled(hidden, ids, weights, other), want, rtol=RTOL, atol=1e-5)
    assert cpu_extension.outstanding_jobs() == 0


# ---- building and the fallback, in fresh processes

_PROBE = textwrap.dedent(
    """
    import json, time, warnings
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        from dali_compile.ops import cpu_experts as ops
        from dali_compile.runtime import cpu_extension
        import os
        if os.environ.get("PROBE_QUICK_BUILD"):  # the cache's mechanism is under test, not the optimiser: -O0
            cpu_extension.EXTRA_CFLAGS = ("-O0", "-fopenmp")
        available = cpu_extension.cpu_extension_available()
    seconds = time.perf_counter() - start
    from dali_compile import Activation, ExpertLayout, LayerSpec
    torch.manual_seed(0)
    spec = LayerSpec(ExpertLayout(Activation("silu")), torch.randn(3, 8, 16), torch.randn(3, 16, 4))
    hidden, ids, weights = torch.randn(5, 16), torch.randint(0, 3, (5, 2)), torch.rand(5, 2)
    (up, down, ub, db), flags, _ = ops.spec_args(spec)
    want = ops.cpu_experts_reference(hidden, ids, weights, up, down, ub, db, None, *flags)
    sync = ops.cpu_experts(spec, hidden, ids, weights)
    handle = ops.cpu_experts_submit(spec, hidden, ids, weights)
    waited = ops.cpu_experts_wait(handle, spec, hidden, ids, weights)
    try:
        ops.cpu_experts_wait(handle, spec, hidden, ids, weights)
        double_wait = "no error"
    except ValueError as error:
        double_wait = str(error)
    print(json.dumps({
        "available": available, "seconds": seconds, "isa": cpu_extension.cpu_isa(),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "sync_err": float((sync - want).abs().max()), "async_err": float((waited - want).abs().max()),
        "double_wait": double_wait,
    }))
    """
)


def _probe(env_update: dict) -> dict:
    import json

    env = {**os.environ, **env_update}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_builds_from_empty_cache_then_loads_without_rebuilding(tmp_path):
    env = {"DALI_COMPILE_CACHE": str(tmp_path), "DALI_CPU_EXTENSION": "1", "PROBE_QUICK_BUILD": "1"}
    first = _probe(env)
    libraries = list(Path(tmp_path).rglob("*.so"))
    assert first["available"] and first["warnings"] == [], first
    assert len(libraries) == 1 and libraries[0].parent.parent == Path(tmp_path) / torch.__version__
    assert libraries[0].parent.name.startswith("cpu_ext-")  # one folder per hash of sources and flags
    built_at = libraries[0].stat().st_mtime_ns
    second = _probe(env)
    assert second["available"] and libraries[0].stat().st_mtime_ns == built_at, "the second import rebuilt"
    assert second["seconds"] < first["seconds"] / 2, (first["seconds"], second["seconds"])
    for run_ in (first, second):
        assert run_["sync_err"] < 1e-4 and run_["async_err"] < 1e-4 and "already waited" in run_["double_wait"]


_BF16_GEMM_PROBE = textwrap.dedent(
    """
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from dali_compile.runtime import cpu_extension as c
        assert c.cpu_extension_available()
    print(json.dumps({"amx": c.has_amx_bf16(), "experts": c.get_bf16_gemm_min_tokens(),
                      "rows": c.get_linear_bf16_gemm_min_rows(), "quantized": c.get_quantized_bf16_gemm_min_rows(),
                      "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))
    """
)


@pytest.mark.parametrize("value", ["auto", "0", "sometimes"])
def test_bf16_gemm_env_setting(value):
    """DALI_CPU_BF16_GEMM: "0" turns the bf16 GEMM paths off, "auto" keeps the default (16 tokens per expert and 8
    linear rows with AMX-BF16, 32 for quantized weights, off without), anything else warns and keeps the default."""
    import json

    done = subprocess.run([sys.executable, "-c", _BF16_GEMM_PROBE], env={**os.environ, "DALI_CPU_BF16_GEMM": value},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    default = (16, 8, 32) if got["amx"] else (0, 0, 0)
    assert (got["experts"], got["rows"], got["quantized"]) == ((0, 0, 0) if value == "0" else default)
    expected_warnings = 1 if value == "sometimes" else 0
    assert len(got["warnings"]) == expected_warnings, got["warnings"]
    assert all("DALI_CPU_BF16_GEMM" in w for w in got["warnings"])


def test_reference_fallback_without_the_extension():
    """DALI_CPU_EXTENSION=0 stands in for a machine without a compiler: same ops, same results."""
    result = _probe({"DALI_CPU_EXTENSION": "0"})
    assert not result["available"] and result["isa"] == "reference"
    assert result["sync_err"] == 0 and result["async_err"] == 0 and "already waited" in result["double_wait"]


def test_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    """A broken toolchain: one warning, then the reference (checked in-process on a copy of the loader state)."""
    monkeypatch.setattr(cpu_extension, "_library", None)
    monkeypatch.setattr(cpu_extension, "_load_attempted", False)

    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu_extension, "_build_and_load", broken)
    with pytest.warns(RuntimeWarning, match="could not be built or loaded .*no C\\+\\+ compiler") as caught:
        assert not cpu_extension.cpu_extension_available()
        assert not cpu_extension.cpu_extension_available()
    assert len(caught) == 1
    assert cpu_extension.cpu_isa() == "reference"


def test_runtime_of_a_decode_step_is_sane():
    """Catches a grossly slow path (e.g. a debug build or a serialised pool), not a benchmark."""
    spec = make_spec(LAYOUTS["mixtral"], torch.bfloat16)
    hidden, ids, weights = make_routing("decode", torch.bfloat16)
    run(spec, hidden, ids, weights)
    start = time.perf_counter()
    for _ in range(20):
        run(spec, hidden, ids, weights)
    assert (time.perf_counter() - start) / 20 < 0.05


def test_read_tensors_sums_every_whole_word():
    """The benchmark's physical limit reads every 8-byte word of the given tensors exactly once."""
    words = torch.randint(0, 1 << 40, (3 * (1 << 17) + 5,), dtype=torch.int64)  # crosses 1 MiB tasks
    small = torch.arange(7, dtype=torch.int64)
    want = (int(words.sum()) + int(small.sum())) % (1 << 64)
    assert cpu_extension.read_tensors(words, small) == want
    # A view that starts mid-word: its unaligned head and ragged tail are skipped.
    halves = torch.arange(1, 20, dtype=torch.int32)  # 19 int32: the view below starts 4 bytes in
    view = halves[1:]
    assert view.data_ptr() % 8 == 4
    pairs = halves[2:18].view(torch.int64)  # the whole words inside the view
    assert cpu_extension.read_tensors(view) == int(pairs.sum())


def test_read_tensors_refuses_strided_tensors():
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        cpu_extension.read_tensors(torch.zeros(4, 4).t())


def test_cpu_benchmark_runs_and_writes_its_table(tmp_path):
    """bench_cpu_experts end to end at its smallest (one point, one round): the columns it reports."""
    import csv

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_cpu_experts as bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "cpu.csv"
    bench.main(["--models", "olmoe", "--dtypes", "bf16", "--tokens", "1", "--repeats", "1", "--budget", "0",
                "--min-bytes", "0", "--csv", str(out)])
    (row,) = list(csv.DictReader(out.open()))
    assert row["model"] == "olmoe" and row["tokens_per_expert"] == "1"
    for column in ("torch_ms", "ours_ms", "limit_ms", "speedup", "limit_speedup", "bandwidth_fraction"):
        assert float(row[column]) > 0, column
    assert float(row["speedup"]) == pytest.approx(float(row["torch_ms"]) / float(row["ours_ms"]))
    assert float(row["max_rel_diff"]) < 2e-2  # bf16 outputs of both sides agree


@pytest.mark.parametrize("min_tokens", [0, 1], ids=["streamed", "dense_gemm"])
def test_large_call_buffers_are_right_and_reused(min_tokens):
    """A prefill-sized fp32 call (output and gathered inputs of tens of MiB: huge-page hints, working
    buffers above the retained size freed after the call), twice, then a small call on the same
    thread: each equals the reference, so no buffer is reused stale or too small."""
    gen = torch.Generator().manual_seed(21)
    experts, hidden_size, inter = 4, 1024, 64
    spec = LayerSpec(LAYOUTS["mixtral"], torch.randn(experts, 2 * inter, hidden_size, generator=gen) * 0.05,
                     torch.randn(experts, hidden_size, inter, generator=gen) * 0.1, name="large")

    def check(T, K):
        hidden = torch.randn(T, hidden_size, generator=gen)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:K] for _ in range(T)])
        weights = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
        want = torch.zeros(T, K, hidden_size)
        for e in range(experts):
            t, k = (ids == e).nonzero(as_tuple=True)
            want[t, k] = weights[t, k, None] * expert_forward(spec, e, hidden[t])
        assert_matches(ops.cpu_experts(spec, hidden, ids, weights), want)

    default = cpu_extension.get_dense_gemm_min_tokens()
    try:
        cpu_extension.set_dense_gemm_min_tokens(min_tokens)
        for T, K in ((4200, 2), (3000, 2), (5, 2)):  # xs: 8400 x 1024 floats > the 32 MiB kept
            check(T, K)
    finally:
        cpu_extension.set_dense_gemm_min_tokens(default)


_NO_OPENMP_PROBE = textwrap.dedent(
    """
    import json, warnings
    import torch
    from dali_compile.runtime import cpu_extension
    cpu_extension.EXTRA_CFLAGS = (*cpu_extension.EXTRA_CFLAGS, "-fno-such-flag-for-dali")  # a build that fails
    cpu_extension.NO_OPENMP_CFLAGS = ("-O0",)  # the fallback's mechanism is under test, not the optimiser
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = cpu_extension.cpu_extension_available()
    from dali_compile.ops.cpu_linear import cpu_linear, cpu_linear_reference
    x, w = torch.randn(2, 64), torch.randn(96, 64)
    print(json.dumps({
        "available": available, "step_threads": cpu_extension.get_step_threads(),
        "warnings": [str(m.message) for m in caught if issubclass(m.category, RuntimeWarning)],
        "err": float((cpu_linear(x, w) - cpu_linear_reference(x, w, None)).abs().max()),
    }))
    """
)


def test_a_failed_openmp_build_falls_back_to_a_build_without_it(tmp_path):
    """A compiler that rejects the OpenMP build (here: an unknown flag) still gets the C++ kernels, with the
    synchronous calls on the runtime's own pool, and says so once."""
    import json

    env = {**os.environ, "DALI_COMPILE_CACHE": str(tmp_path), "DALI_CPU_EXTENSION": "1"}
    done = subprocess.run([sys.executable, "-c", _NO_OPENMP_PROBE], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["available"] and result["step_threads"] == "pool", result
    assert len(result["warnings"]) == 1 and "without" in result["warnings"][0], result
    assert result["err"] < 1e-4
    assert list((Path(tmp_path) / torch.__version__).glob("cpu_ext_no_openmp-*/*.so"))
