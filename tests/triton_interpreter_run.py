"""Runs every case of `triton_cases.py` through the Triton kernels in the interpreter; writes JSON results.

    TRITON_INTERPRET=1 python tests/triton_interpreter_run.py results.json

Spawned by `test_triton_experts.py`: the interpreter flag is read when `@triton.jit` decorates, and is
process-wide, so it lives in its own process and the rest of the suite compiles kernels normally.
Each case: the kernels against the fp32 reference kernel, rows computed elsewhere exactly 0, and two runs
bit-identical; each routing case: the routing kernel equal to its torch spec. Result per case id:
{"error": None or the failure, "max_error": float or None}; or {"interpreter_unusable": why} when this
triton's interpreter cannot run here at all.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
from triton_cases import CASES, DTYPES, ROUTING_CASES, build_args, check_against_reference, relative_max_error

from dali_compile.ops.gpu_experts import gpu_experts_cuda, gpu_experts_reference


def run_case(case) -> dict:
    from dali_compile.ops import triton_experts

    args = build_args(case)
    want = gpu_experts_reference(*args)
    if case.config is None:  # the op's CUDA kernel itself (checks, then the launcher), on CPU tensors
        got, again = gpu_experts_cuda(*args), gpu_experts_cuda(*args)
    else:
        config = next(c for c in triton_experts.all_configs(DTYPES[case.dtype]) if c.name.startswith(case.config))
        got = triton_experts.run_gpu_experts(*args, config=config)
        again = triton_experts.run_gpu_experts(*args, config=config)
    error = check_against_reference(got, want, args)
    if error is None and not torch.equal(got, again):
        error = "two runs differ: the kernels are not deterministic"
    return {"error": error, "max_error": relative_max_error(got, want)}


def run_routing_case(case) -> dict:
    from dali_compile.ops import triton_experts

    ids, slot = case.build()
    M, E = ids.numel(), slot.numel()
    B = triton_experts.max_blocks(M, E, case.block_m)
    sorted_rows = torch.full((B * case.block_m,), -7, dtype=torch.int32)  # -7: an entry never written
    block_slot = torch.full((B,), -7, dtype=torch.int32)
    block_e, chunk = triton_experts.routing_tiles(E)
    triton_experts._group_rows_kernel[(1,)](
        ids, slot, sorted_rows, block_slot, M, E, B, BM=case.block_m, BLOCK_E=block_e, CHUNK=chunk
    )
    want_rows, want_slots = triton_experts.group_rows_by_expert_torch(ids, slot, case.block_m)
    error = None
    if not torch.equal(sorted_rows, want_rows):
        error = f"sorted_rows differ from the torch spec:\n{sorted_rows.tolist()}\n{want_rows.tolist()}"
    elif not torch.equal(block_slot, want_slots):
        error = f"block_slot differs from the torch spec:\n{block_slot.tolist()}\n{want_slots.tolist()}"
    return {"error": error, "max_error": None}


def interpreter_problem() -> str | None:
    """Why this triton's interpreter cannot run kernels here, or None.

    Triton 3.6's interpreter turns scalar arguments used in `range` into Python ints with int() of a
    1-element array, which numpy >= 2.4 refuses; 3.9 squeezes first. Probed rather than version-matched.
    """
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, n):
        for i in range(0, n):
            tl.store(out_ptr + i, i)

    try:
        _probe[(1,)](torch.zeros(2, dtype=torch.int32), 2)
    except Exception as err:  # noqa: BLE001
        return f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__}: {err!r}"
    return None


def main(out_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1: this script runs the kernels in triton's interpreter")
    torch.set_num_threads(1)  # the parent suite runs the compile check beside this on 2 cores
    problem = interpreter_problem()
    if problem is not None:
        with open(out_path, "w") as f:
            json.dump({"interpreter_unusable": problem}, f)
        return
    results = {}
    for case in CASES:
        try:
            results[case.id] = run_case(case)
        except Exception:  # noqa: BLE001  (reported per case to the parent test)
            results[case.id] = {"error": traceback.format_exc(), "max_error": None}
    for case in ROUTING_CASES:
        try:
            results[case.id] = run_routing_case(case)
        except Exception:  # noqa: BLE001
            results[case.id] = {"error": traceback.format_exc(), "max_error": None}
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
