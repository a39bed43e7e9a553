"""`dali::gpu_experts` and its Triton kernels against the fp32 reference, on a machine without a GPU.

# T tokens, K top-k, E experts, S pool slots, H hidden, I intermediate

A GPU kernel is checked here in four ways, each in the process it needs:
- interpreter: every case of `triton_cases.py` runs the real kernels in triton's interpreter, in a
  subprocess with TRITON_INTERPRET=1 (the flag is process-wide and read when kernels are decorated);
- compile: every launch the launcher can make is compiled for sm_80 and sm_90 in a subprocess without
  it: compiles, fits shared memory, does not spill, uses tensor cores where it should;
- in process: the op's CPU kernel (the emulated GPU of CPU-only CI), its errors, the routing spec;
- `cuda`-marked: real launches against the reference, skipped without a GPU.
The two subprocesses start together on first use and run beside the in-process tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from triton_cases import CASES, DTYPES, GPT_OSS, ROUTING_CASES, TOLERANCE, Case, build_args, check_against_reference

import dali_compile
from dali_compile.ops.expert_math import moe_reference
from dali_compile.ops.gpu_experts import gpu_experts, gpu_experts_reference

TESTS = Path(__file__).parent
SUBPROCESS_TIMEOUT_S = 900


class _Background:
    """A script of tests/ running in its own process, writing JSON results."""

    def __init__(self, script: str, env: dict, *args: str):
        self.dir = tempfile.TemporaryDirectory(prefix="dali-triton-")
        self.out = Path(self.dir.name) / "results.json"
        self.log = open(Path(self.dir.name) / "log.txt", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / script), str(self.out), *args],
            cwd=TESTS.parent, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def results(self) -> dict:
        try:
            self.proc.wait(timeout=SUBPROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.out.exists():
            return json.loads(self.out.read_text())
        self.log.seek(0)
        script = Path(self.proc.args[1]).name
        pytest.fail(f"{script} exited with {self.proc.returncode} and no results:\n{self.log.read()[-4000:]}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.dir.cleanup()


@pytest.fixture(scope="module")
def background_runs():
    pytest.importorskip("triton")
    interpret_env = {**os.environ, "TRITON_INTERPRET": "1"}
    compile_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = str(max(1, min(4, (os.cpu_count() or 1))))
    runs = {
        "interpreter": _Background("triton_interpreter_run.py", interpret_env),
        "compile": _Background("triton_compile_run.py", compile_env, workers),
    }
    yield runs
    for run in runs.values():
        run.close()


@pytest.fixture(scope="module")
def interpreter_results(background_runs):
    results = background_runs["interpreter"].results()
    if "interpreter_unusable" in results:  # an environment limit (see triton_interpreter_run.py), not a bug here
        pytest.skip(results["interpreter_unusable"])
    return results


@pytest.fixture(scope="module")
def compile_results(background_runs):
    return background_runs["compile"].results()


# ---- interpreter: the real kernels on CPU tensors --------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernels_match_reference_in_interpreter(case, interpreter_results):
    """Reference within TOLERANCE[dtype], rows computed elsewhere exactly 0, two runs bit-identical."""
    result = interpreter_results.get(case.id)
    assert result is not None, f"the interpreter run has no result for {case.id}"
    assert result["error"] is None, f"{case.why}:\n{result['error']}"


@pytest.mark.parametrize("case", ROUTING_CASES, ids=lambda c: c.id)
def test_routing_kernel_equals_its_torch_spec(case, interpreter_results):
    result = interpreter_results.get(case.id)
    assert result is not None, f"the interpreter run has no result for {case.id}"
    assert result["error"] is None, f"{case.why}:\n{result['error']}"


# ---- compile: sm_80 and sm_90 code from a CPU-only machine ----------------------------------------------

COMPILE_GROUPS = [f"{g}-sm{cc}" for g in (*DTYPES, "routing", "variants", "quantized") for cc in (80, 90)]


@pytest.mark.parametrize("group", COMPILE_GROUPS)
def test_kernels_compile_for_gpu(group, compile_results):
    """Each launch compiles, fits the target's shared memory, keeps to registers (no stack: spills), and
    16-bit expert kernels use tensor cores: mma everywhere, Hopper's wgmma for the 64-row prefill tiles."""
    limit = compile_results["limits"][group.rsplit("sm", 1)[1]]
    jobs = [j for j in compile_results["jobs"] if j["group"] == group]
    assert jobs, f"nothing compiled in group {group}"
    problems = []
    for job in jobs:
        where = f"{job['name']} sm_{job['capability']}"
        if job["error"] is not None:
            problems.append(f"{where} does not compile:\n{job['error'][-3000:]}")
            continue
        if job["shared"] > limit:
            problems.append(f"{where} needs {job['shared']} B of shared memory > {limit}")
        if job["stack"]:
            problems.append(f"{where} spills: {job['stack']} B of stack at {job['registers']} registers")
        expert_kernel = not job["name"].startswith("_group_rows")
        half_precision = job["dtype"] in ("fp16", "bf16")  # fp32 and quantized pools compute exact fp32 dots
        if expert_kernel and half_precision and not job["mma"]:
            problems.append(f"{where} does not use tensor cores")
        if expert_kernel and half_precision and job["capability"] == 90 and "prefill" in job["config"]:
            if not job["wgmma"]:
                problems.append(f"{where} uses mma.sync, not Hopper's wgmma")
    assert not problems, "\n".join(problems)


def test_compile_covers_every_config(compile_results):
    """The compile check must follow the launcher: every config it can choose, per dtype."""
    triton_experts = pytest.importorskip("dali_compile.ops.triton_experts")
    compiled = {(j["dtype"], j["config"]) for j in compile_results["jobs"]}
    for name, dtype in DTYPES.items():
        for config in triton_experts.all_configs(dtype):
            assert (name, config.name) in compiled, f"{config.name} ({name}) is never compiled"


# ---- in process: the launcher's pure-Python parts -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_config_choice_by_rows_per_expert(dtype):
    te = pytest.importorskip("dali_compile.ops.triton_experts")
    allowed = set(te.all_configs(dtype))
    for rows in (1, 8, 64, 200, 1024, 4096, 65536):
        for experts in (8, 64, 128):
            assert te.choose_config(rows, experts, dtype) in allowed
    assert te.choose_config(8, 128, dtype).block_m == 16  # decode: Qwen3 top-8, one token
    assert te.choose_config(8 * 512, 128, dtype).block_m == 32  # 32 rows per expert
    assert te.choose_config(2 * 512, 8, dtype).block_m == 64  # Mixtral prefill: 128 rows per expert


def test_kernels_implement_every_layer_activation():
    te = pytest.importorskip("dali_compile.ops.triton_experts")
    assert te.ACTIVATIONS == dali_compile.runtime.layer_spec.ACTIVATIONS


@pytest.mark.parametrize(
    "T, K, E, block_m, elsewhere",
    [
        (1, 8, 128, 16, 0.5),  # decode: at most one row per expert
        (300, 2, 8, 64, 0.25),  # prefill: several blocks per group
        (6, 2, 4, 16, 1.0),  # every expert elsewhere: blocks are all padding
        (0, 2, 4, 16, 0.0),  # no tokens
    ],
)
def test_routing_spec_invariants(T, K, E, block_m, elsewhere):
    """Groups by expert ascending, each in row order, starting at a multiple of block_m; rows of experts
    elsewhere nowhere; padding marked M; block_slot the slot of the block's expert, -1 past the end."""
    te = pytest.importorskip("dali_compile.ops.triton_experts")
    gen = torch.Generator().manual_seed(T)
    ids = torch.randint(0, E, (T, K), generator=gen)
    slot = torch.randperm(E, generator=gen).to(torch.int32)
    slot[torch.rand(E, generator=gen) < elsewhere] = -1
    sorted_rows, block_slot = te.group_rows_by_expert_torch(ids, slot, block_m)
    M = T * K
    B = te.max_blocks(M, E, block_m)
    assert sorted_rows.shape == (B * block_m,) and block_slot.shape == (B,)
    flat = ids.reshape(-1)
    here = [m for m in range(M) if slot[flat[m]] >= 0]
    real = [int(r) for r in sorted_rows if r < M]
    assert sorted(real) == here  # every row computed here exactly once, no other row
    assert real == sorted(here, key=lambda m: (int(flat[m]), m))  # expert ascending, then row order
    for b in range(B):
        rows = [int(r) for r in sorted_rows[b * block_m:(b + 1) * block_m] if r < M]
        if not rows:  # every planned block holds a row: an empty one lies past the last group
            assert block_slot[b] == -1
            continue
        assert rows == [int(r) for r in sorted_rows[b * block_m:b * block_m + len(rows)]]  # padding at the end
        experts = {int(flat[r]) for r in rows}
        assert len(experts) == 1, f"block {b} mixes experts {experts}"
        assert block_slot[b] == slot[experts.pop()]
    used = len({b for b in range(B) if (sorted_rows[b * block_m:(b + 1) * block_m] < M).any()})
    assert (block_slot[used:] == -1).all() and (sorted_rows[used * block_m:] == M).all()


# ---- in process: the CPU kernel (the emulated GPU) ------------------------------------------------------


def _mixtral_like(dtype=torch.float32, E=6, T=7, K=2, H=32, I=24):
    gen = torch.Generator().manual_seed(1)
    layout = dali_compile.ExpertLayout(dali_compile.Activation("silu"))
    spec = dali_compile.LayerSpec(
        layout, (torch.randn(E, 2 * I, H, generator=gen) * 0.3).to(dtype),
        (torch.randn(E, H, I, generator=gen) * 0.3).to(dtype),
    )
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=gen), -1)
    return spec, hidden, ids, weights


def test_split_between_devices_sums_to_the_reference():
    """Experts split between a 'GPU' slot table and its complement ('CPU'): adding the two contribution
    tensors and summing over k in order reproduces moe_reference bit for bit (x + 0 is exact)."""
    spec, hidden, ids, weights = _mixtral_like()
    E = spec.num_experts
    identity = torch.arange(E, dtype=torch.int32)
    on_gpu = torch.tensor([e % 2 == 0 for e in range(E)])
    gpu_table = torch.where(on_gpu, identity, -1).to(torch.int32)
    cpu_table = torch.where(~on_gpu, identity, -1).to(torch.int32)
    parts = [gpu_experts(hidden, ids, weights, spec.up_weight, spec.down_weight, None, None, table, spec.layout)
             for table in (gpu_table, cpu_table)]
    assert torch.equal((parts[0] + parts[1]).sum(dim=1), moe_reference(spec, hidden, ids, weights))
    assert (parts[0][~on_gpu[ids]] == 0).all() and (parts[1][on_gpu[ids]] == 0).all()


def test_slot_table_selects_pool_slots():
    """Experts cached in shuffled slots of a smaller pool give the same contributions as the model's own
    weights; experts without a slot give exact zeros."""
    spec, hidden, ids, weights = _mixtral_like()
    E, S = spec.num_experts, 4
    cached = [4, 0, 5, 2]  # slot s holds expert cached[s]
    slot_of_expert = torch.full((E,), -1, dtype=torch.int32)
    slot_of_expert[cached] = torch.arange(S, dtype=torch.int32)
    pooled = gpu_experts(hidden, ids, weights, spec.up_weight[cached].contiguous(),
                         spec.down_weight[cached].contiguous(), None, None, slot_of_expert, spec.layout)
    own = gpu_experts(hidden, ids, weights, spec.up_weight, spec.down_weight, None, None,
                      torch.arange(E, dtype=torch.int32), spec.layout)
    here = slot_of_expert.long()[ids] >= 0
    assert torch.equal(pooled[here], own[here])
    assert (pooled[~here] == 0).all()


def _error_cases():
    """(why, mutate args list in place, exception, message pattern)."""

    def setitem(i, fn):
        def mutate(a):
            a[i] = fn(a)

        return mutate

    return [
        ("slot past the pool", setitem(7, lambda a: a[7].index_fill(0, torch.tensor([0]), 4)), IndexError,
         r"slot 4 in slot_of_expert is out of range for a pool of 4 slots"),
        ("slot below -1", setitem(7, lambda a: a[7].index_fill(0, torch.tensor([0]), -2)), IndexError,
         r"slot -2 .* out of range"),
        ("expert id past E", setitem(1, lambda a: a[1].index_fill(1, torch.tensor([0]), 6)), IndexError,
         r"expert id 6 out of range for slot_of_expert with 6 experts"),
        ("negative expert id", setitem(1, lambda a: a[1].index_fill(1, torch.tensor([0]), -1)), IndexError,
         r"expert id -1 out of range"),
        ("pool dtype", setitem(3, lambda a: a[3].half()), TypeError,
         r"up_pool is torch.float16 but hidden is torch.float32"),
        ("bias pool dtype", setitem(6, lambda a: a[6].double()), TypeError, r"down_bias_pool is torch.float64"),
        ("non-contiguous pool", setitem(4, lambda a: a[4].transpose(1, 2).contiguous().transpose(1, 2)),
         ValueError, r"down_pool must be contiguous"),
        ("down pool shape", setitem(4, lambda a: a[4][:, :, :-1].contiguous()), ValueError,
         r"pools do not fit hidden size 32, intermediate size 23 .* got \(4, 48, 32\) and \(4, 32, 23\)"),
        ("bias pool shape", setitem(5, lambda a: a[5][:, :-1].contiguous()), ValueError,
         r"expected bias pools \(4, 48\) and \(4, 32\)"),
        ("one bias only", setitem(6, lambda a: None), ValueError, r"both bias pools or neither"),
        ("slot table dtype", setitem(7, lambda a: a[7].long()), TypeError, r"slot_of_expert must be a 1-D int32"),
        ("weights shape", setitem(2, lambda a: a[2][:, :1]), ValueError, r"topk_ids and topk_weights must both"),
        ("hidden rank", setitem(0, lambda a: a[0][None]), ValueError, r"hidden must be a floating \[T, H\]"),
        ("unknown activation", setitem(11, lambda a: "swish"), ValueError, r"unknown activation 'swish'"),
        ("interleaved without gate", lambda a: a.__setitem__(slice(8, 10), [False, True]), ValueError,
         r"interleaved gate/up layout needs a gate"),
    ]


@pytest.mark.parametrize("why, mutate, error, match", _error_cases(), ids=[c[0] for c in _error_cases()])
def test_bad_inputs_raise_clear_errors(why, mutate, error, match):
    args = list(build_args(Case("errors", "", bias=True)))
    mutate(args)
    with pytest.raises(error, match=match):
        torch.ops.dali.gpu_experts(*args)


def test_reference_kernel_cases_shape_and_zero_rows():
    """The CPU kernel on every interpreter case: [T, K, H] fp32, rows elsewhere exactly zero."""
    for case in CASES:
        args = build_args(case)
        got = torch.ops.dali.gpu_experts(*args)
        assert check_against_reference(got, gpu_experts_reference(*args), args) is None, case.id


# ---- cuda: real launches --------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Real expert sizes: Qwen3-30B-A3B (E 128 with 96 cached, top-8, H 2048, I 768) and GPT-OSS-20B (top-4,
# H = I = 2880, not multiples of the tiles; 8 of its 32 experts keep the CPU-side reference quick).
REAL_SHAPES = [
    Case("qwen3", "", dtype="bf16", T=T, K=8, E=128, S=96, H=2048, I=768) for T in (1, 16, 256)
] + [Case("gpt-oss-20b", "", dtype="bf16", T=T, K=4, E=8, S=8, H=2880, I=2880, **GPT_OSS) for T in (1, 64)]


def _cuda_check(case: Case):
    from dali_compile.ops.gpu_experts import _triton_launcher

    assert _triton_launcher() is not None, "triton is not importable: CUDA would run the reference"
    args = build_args(case, device="cuda")
    got = torch.ops.dali.gpu_experts(*args)
    again = torch.ops.dali.gpu_experts(*args)
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    error = check_against_reference(got.cpu(), gpu_experts_reference(*cpu_args), cpu_args)
    assert error is None, f"{case.id} ({case.T}x{case.K}, H {case.H}, I {case.I}): {error}"
    assert torch.equal(got, again), "two CUDA runs differ"


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("case", CASES + REAL_SHAPES, ids=lambda c: f"{c.id}-T{c.T}")
def test_cuda_kernels_match_reference(case):
    _cuda_check(case)


@pytest.mark.cuda
@cuda
def test_cuda_graph_capture_replays_the_same_contributions():
    """No host sync inside the launcher: it captures into a CUDA graph and replays to the same bits."""
    args = build_args(REAL_SHAPES[0], device="cuda")
    eager = torch.ops.dali.gpu_experts(*args)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.dali.gpu_experts(*args)  # warm-up on the capture stream compiles the kernels
        with torch.cuda.graph(graph, stream=stream):
            captured = torch.ops.dali.gpu_experts(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def test_tolerances_are_stated_for_every_dtype():
    assert set(TOLERANCE) == set(DTYPES.values())
