"""Compiles every launch the expert launcher can make, for sm_80 and sm_90, on a machine without a GPU.

    python tests/triton_compile_run.py results.json [workers]

Spawned by `test_triton_experts.py` in a process without TRITON_INTERPRET (the interpreter would
replace the kernels). The launches come from `plan_expert_launches` itself, so the compiled argument
types, constexprs and tile configs are exactly what a real launch specializes on. Per job we record
whether it compiled, its shared memory against the target's per-block limit, and whether its PTX uses
tensor cores (`mma`, and Hopper's `wgmma`).

The `ASTSource` call is the one API here that moved between triton versions: `ast_source` adapts it.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor

import torch
from triton_cases import DTYPES, Case, build_args

# Capability -> the most shared memory one block may use (bytes): sm_80 163 KiB, sm_90 227 KiB.
TARGETS = {80: 166912, 90: 232448}

# Layout x activation variants on top of the main grid's Mixtral-like one: every flag and activation once.
VARIANTS = [
    Case("gpt-oss", "", interleaved=True, transposed=True, bias=True, activation="clamped_swiglu"),
    Case("interleaved-gelu", "", interleaved=True, activation="gelu"),
    Case("transposed-gelu-tanh", "", transposed=True, activation="gelu_tanh"),
    Case("concat-relu", "", activation="relu"),
    Case("clamped-silu", "", activation="clamped_silu"),
    Case("no-gate-relu2", "", gated=False, activation="relu2"),
    Case("no-gate-quick-gelu", "", gated=False, transposed=True, bias=True, activation="quick_gelu"),
]
# Real models have H and I multiples of 16, which triton specializes on; T*K = 16 rows.
SIZES = dict(T=8, K=2, E=8, S=8, H=64, I=48)

_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
               torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8"}


def ast_source(kernel, signature: dict, constexprs: dict, attrs: dict):
    """triton.compiler.ASTSource across versions.

    Triton >= 3.2 (3.6 to 3.9 checked): `ASTSource(fn, signature, constexprs, attrs)` with signature
    keyed by argument name, constexpr arguments typed "constexpr", attrs keyed by (index,) paths.
    Triton 3.0/3.1 took `constants` keyed by index and an AttrsDescriptor: not supported here.
    """
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in params:
        raise RuntimeError("triton < 3.2: ASTSource takes `constants`; this check supports triton >= 3.2")
    full = dict(signature)
    full.update({name: "constexpr" for name in constexprs})
    return ASTSource(fn=kernel, signature=full, constexprs=dict(constexprs), attrs=attrs)


def specialize(launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as triton's JIT would specialize the launch's arguments.

    Like the JIT: tensors are pointers, 16-byte aligned ones with a divisibility hint; ints equal to 1
    become constexprs, ints divisible by 16 get the hint; Python floats are fp32.
    """
    names = launch.kernel.arg_names
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for name, value in launch.args.items():
        index = (names.index(name),)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPE_NAMES[value.dtype]
            divisible = value.data_ptr() % 16 == 0
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"unexpected kernel argument {name}={value!r}")
        elif isinstance(value, float):
            signature[name], divisible = "fp32", False
        elif value == 1:
            constexprs[name] = 1
            continue
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        if divisible:
            attrs[index] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_launch(launch, capability: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs = specialize(launch)
    src = ast_source(launch.kernel, signature, constexprs, attrs)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {"shared": compiled.metadata.shared, "mma": "mma.sync" in ptx or "wgmma" in ptx, "wgmma": "wgmma" in ptx,
            **resource_usage(compiled.asm["cubin"])}


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread from triton's bundled cuobjdump; stack > 0 means spills."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report))
    return {"registers": int(usage["REG"]), "stack": int(usage["STACK"]) + int(usage["LOCAL"])}


@functools.cache
def jobs() -> list[dict]:
    """Main grid: kernels x dtypes x every config x targets; routing kernel by E; every layout flag and activation."""
    from dali_compile.ops import triton_experts

    def launches(case, config):  # (int4's rounding step between the launches is torch, nothing to compile)
        steps = triton_experts.plan_expert_launches(*build_args(case), config=config)[1]
        return [step for step in steps if isinstance(step, triton_experts.Launch)]

    def add(job):
        key = _job_key(job)
        if key not in seen:  # e.g. the routing kernel is the same for every dtype
            seen.add(key)
            out.append(job)

    out, seen = [], set()
    for dtype_name, dtype in DTYPES.items():
        base = Case("mixtral-bias", "", dtype=dtype_name, bias=True, **SIZES)
        for config in triton_experts.all_configs(dtype):
            for launch in launches(base, config):
                for cc in TARGETS:
                    add(dict(group=f"{dtype_name}-sm{cc}", name=f"{launch.kernel.__name__}/{config.name}",
                             dtype=dtype_name, config=config.name, capability=cc, launch=launch))
    # The routing kernel's tiles grow with E (Mixtral 8 ... DeepSeek-V3 256), and int32 ids load differently.
    decode = next(c for c in triton_experts.all_configs(torch.bfloat16) if c.name == "decode")
    for E, ids_dtype in ((64, "int64"), (128, "int64"), (256, "int64"), (128, "int32")):
        case = Case(f"routing-E{E}-{ids_dtype}", "", dtype="bf16", **{**SIZES, "E": E, "S": E}, ids_dtype=ids_dtype)
        routing = launches(case, decode)[0]
        for cc in TARGETS:
            add(dict(group=f"routing-sm{cc}", name=f"{routing.kernel.__name__}/E{E}-{ids_dtype}", dtype="bf16",
                     config=decode.name, capability=cc, launch=routing))
    prefill = next(c for c in triton_experts.all_configs(torch.bfloat16) if c.name == "prefill")
    for variant in VARIANTS:
        case = Case(variant.name, "", dtype="bf16", gated=variant.gated, interleaved=variant.interleaved,
                    transposed=variant.transposed, bias=variant.bias, activation=variant.activation, **SIZES)
        for launch in launches(case, prefill):
            for cc in TARGETS:  # the down kernel ignores the gate and the activation: add() drops repeats
                add(dict(group=f"variants-sm{cc}", name=f"{launch.kernel.__name__}/{variant.name}",
                         dtype="bf16", config=prefill.name, capability=cc, launch=launch))
    # Quantized pools (int8 codes, int4 nibbles) dequantized in the kernels, which then run the fp32 tiles.
    for quant in ("int8", "int4"):
        for variant in (Case(quant, "", dtype="bf16", quant=quant, group=16, **SIZES),
                        Case(f"{quant}-gpt-oss", "", interleaved=True, bias=True, activation="clamped_swiglu",
                             quant=quant, group=16, **SIZES)):
            for config in triton_experts.all_configs(torch.float32):
                for launch in launches(variant, config):
                    for cc in TARGETS:
                        name = f"{launch.kernel.__name__}/{variant.name}/{config.name}"
                        add(dict(group=f"quantized-sm{cc}", name=name, dtype=quant, config=config.name,
                                 capability=cc, launch=launch))
    return out


def _job_key(job: dict) -> str:
    launch = job["launch"]
    return repr((launch.kernel.__name__, specialize(launch), job["capability"], launch.num_warps, launch.num_stages))


def _run(index: int) -> dict:
    """Compile job `index`; by index, because kernels do not pickle (each worker rebuilds the job list)."""
    job = jobs()[index]
    record = {k: v for k, v in job.items() if k != "launch"}
    try:
        record.update(compile_launch(job["launch"], job["capability"]), error=None)
    except Exception:  # noqa: BLE001  (reported per job to the parent test)
        record.update(error=traceback.format_exc())
    return record


def main(out_path: str, workers: int) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")
    todo = range(len(jobs()))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_run, todo))
    else:
        results = [_run(index) for index in todo]
    with open(out_path, "w") as f:
        json.dump({"limits": TARGETS, "jobs": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
