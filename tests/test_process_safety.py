"""Process-level safety of the C++ runtime and the cost-model store.

- C++ exceptions never cross the `extern "C"` functions called through ctypes (one would abort the
  process): each returns an error code and Python raises a clear error. Checked in subprocesses, so a
  regression shows as a failed test, not a dead test run.
- A child forked after the pool's workers, the job runner and ATen's OpenMP team have started still
  runs the kernels (sync and async) instead of hanging.
- cost_models.json: concurrent writers keep each other's entries; a damaged file warns and is rewritten.
Anything that could hang or abort runs in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from dali_compile.runtime import cpu_extension, profiling
from dali_compile.runtime.planner import CostModel

TIMEOUT = 300  # seconds: the library is built by then (the cpu_runtime fixture), so this is only a guard


def run_script(script: str, env: dict | None = None) -> dict:
    """Runs `script` in a fresh interpreter and returns the JSON object its last line prints."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- bad values and C++ exceptions at the ctypes boundary


def test_thread_counts_out_of_range_are_value_errors(cpu_runtime):
    before = cpu_extension.get_num_threads()
    for bad in (0, -3, cpu_extension.MAX_THREADS + 1, 10**9, 10**30):
        with pytest.raises(ValueError, match=f"1 <= n <= {cpu_extension.MAX_THREADS}.*got {bad}"):
            cpu_extension.set_num_threads(bad)
    with pytest.raises(ValueError, match="integer thread count"):
        cpu_extension.set_num_threads(2.5)
    # The C function checks the range itself too (ctypes callers skip the Python check).
    assert cpu_extension._require().dali_cpu_set_num_threads(10**9) == -1
    assert cpu_extension.get_num_threads() == before


_EXCEPTIONS = """
    import ctypes, json, resource
    import numpy as np
    from dali_compile.runtime import cpu_extension
    assert cpu_extension.cpu_extension_available()
    out = {}

    def error_of(call):
        try:
            call()
            return "no error"
        except (RuntimeError, ValueError) as error:
            return f"{type(error).__name__}: {error}"

    # An allocation the C++ side cannot make (std::bad_alloc inside the C function).
    out["bandwidth"] = error_of(lambda: cpu_extension.read_bandwidth_gbps(1 << 62, 1))
    # The planner's scratch vectors for an absurd expert count (std::length_error): -99, Python path.
    plan = cpu_extension.greedy_plan_function()
    out["plan"] = plan(1 << 62, None, None, None, None, None, 8, 0, None)
    # Threads the system cannot start: address space capped just above what the process maps now, so
    # the 8 MiB thread stacks of 1000 workers cannot be mapped (works as root too, unlike RLIMIT_NPROC).
    cpu_extension.set_num_threads(2)
    mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (256 << 20), resource.RLIM_INFINITY))
    out["threads"] = error_of(lambda: cpu_extension.set_num_threads(1000))
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out["threads_after"] = cpu_extension.get_num_threads()
    # The pool still works after the failed resize.
    words = np.arange(1 << 18, dtype=np.int64)
    import torch
    out["checksum_ok"] = cpu_extension.read_tensors(torch.from_numpy(words)) == int(words.sum())
    print(json.dumps(out))
"""


def test_cpp_exceptions_become_python_errors_not_an_abort(cpu_runtime):
    result = run_script(_EXCEPTIONS)
    assert result["bandwidth"].startswith("RuntimeError: read_bandwidth_gbps"), result
    assert result["plan"] == cpu_extension.CPP_EXCEPTION, result
    assert result["threads"].startswith("RuntimeError: set_num_threads(1000): could not start the threads"), result
    assert result["threads_after"] == 2, "a failed resize keeps the previous size"
    assert result["checksum_ok"]


def test_a_bad_thread_count_in_the_environment_warns_and_keeps_the_default(cpu_runtime):
    result = run_script("""
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from dali_compile.runtime import cpu_extension
            available = cpu_extension.cpu_extension_available()
        print(json.dumps({"available": available, "threads": cpu_extension.get_num_threads(),
                          "cores": cpu_extension.physical_cores(),
                          "warnings": [str(w.message) for w in caught if "DALI_CPU_THREADS" in str(w.message)]}))
    """, {"DALI_CPU_THREADS": str(10**9)})
    assert result["available"] and result["threads"] >= 1
    assert len(result["warnings"]) == 1 and "1 <= n <= 1024" in result["warnings"][0], result


# ---- fork

_FORK = """
    import json, os, select, signal, torch
    from dali_compile import Activation, ExpertLayout, LayerSpec
    from dali_compile.ops import cpu_experts as ops
    from dali_compile.runtime import cpu_extension
    assert cpu_extension.cpu_extension_available()
    torch.manual_seed(0)
    spec = LayerSpec(ExpertLayout(Activation("silu")), torch.randn(4, 64, 256) * 0.1, torch.randn(4, 256, 32) * 0.1)
    hidden, ids, weights = torch.randn(9, 256), torch.randint(0, 4, (9, 2)), torch.rand(9, 2)

    def wait(handle):
        return ops.cpu_experts_wait(handle, spec, hidden, ids, weights)
    (up, down, ub, db), flags, _ = ops.spec_args(spec)
    want = ops.cpu_experts_reference(hidden, ids, weights, up, down, ub, db, None, *flags)
    scale = float(want.abs().max())
    cpu_extension.set_num_threads(2)
    # Start everything that has threads: the pool's workers, the job runner, ATen's OpenMP team.
    for _ in range(3):
        ops.cpu_experts(spec, hidden, ids, weights)
        wait(ops.cpu_experts_submit(spec, hidden, ids, weights))
        (torch.randn(512, 512) * 2).sum()
    pending = ops.cpu_experts_submit(spec, hidden, ids, weights)  # outstanding across the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        out = {}
        try:
            out["sync_err"] = float((ops.cpu_experts(spec, hidden, ids, weights) - want).abs().max()) / scale
            handle = ops.cpu_experts_submit(spec, hidden, ids, weights)
            out["async_err"] = float((wait(handle) - want).abs().max()) / scale
            out["threads"] = cpu_extension.get_num_threads()
            out["step_threads"] = cpu_extension.get_step_threads()
            try:
                wait(pending)
                out["parent_handle"] = "no error"
            except ValueError as error:
                out["parent_handle"] = str(error)
            out["outstanding"] = cpu_extension.outstanding_jobs()
        except BaseException as error:
            out["error"] = repr(error)
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    if select.select([read], [], [], 120)[0]:
        child = json.loads(os.read(read, 1 << 16).decode())
    else:  # hung: kill it here, since the test's timeout would only kill this process
        os.kill(pid, signal.SIGKILL)
        child = {"error": "the forked child hung"}
    os.waitpid(pid, 0)
    parent_err = float((wait(pending) - want).abs().max()) / scale
    outstanding = cpu_extension.outstanding_jobs()
    print(json.dumps({"child": child, "parent_err": parent_err, "parent_outstanding": outstanding}))
"""


def test_a_forked_child_runs_the_kernels(cpu_runtime):
    """Forked after every runtime thread started and with a job outstanding: the child's sync and async
    calls compute on a fresh pool (same size), the parent's pending handle is a clear error there, and the
    parent is unaffected. Without the fork handler the child hangs (the subprocess timeout fails the test)."""
    result = run_script(_FORK)
    child = result["child"]
    assert "error" not in child, child
    assert child["sync_err"] < 1e-4 and child["async_err"] < 1e-4  # relative to the largest output
    assert child["threads"] == 2 and child["step_threads"] == "pool"
    assert "before this process was forked" in child["parent_handle"]
    assert child["outstanding"] == 0
    assert result["parent_err"] < 1e-4 and result["parent_outstanding"] == 0


def test_a_multiprocessing_fork_worker_runs_the_kernels(cpu_runtime):
    result = run_script("""
        import json, multiprocessing
        import numpy as np
        import torch
        from dali_compile.runtime import cpu_extension
        assert cpu_extension.cpu_extension_available()
        cpu_extension.set_step_threads("pool")  # reads run on the runtime's own pool, not ATen's threads
        cpu_extension.read_tensors(torch.arange(1 << 20))  # the pool's workers are running

        def work(n):  # numpy makes the input: torch's own parallel ops hang in a forked child
            return cpu_extension.read_tensors(torch.from_numpy(np.arange(n)))

        with multiprocessing.get_context("fork").Pool(2) as pool:
            sums = pool.map_async(work, [1 << 18, 1 << 19]).get(timeout=120)
        print(json.dumps({"sums": sums, "want": [sum(range(1 << 18)), sum(range(1 << 19))]}))
    """)
    assert result["sums"] == result["want"]


# ---- the cost-model store


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The cost-model store in tmp_path; measuring returns a fixed model and is counted."""
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(profiling, "_key", lambda accelerator, spec: "machine|shape")
    measured = []
    model = CostModel((1, 2, 4), (1e-4, 2e-4, 4e-4), (5e-5, 6e-5, 7e-5), 1e-3)
    monkeypatch.setattr(profiling, "measure_costs", lambda *args: measured.append(1) or model)
    return profiling._store(), measured, model


@pytest.mark.parametrize("content", [
    "{not json",  # a write cut short by a full disk or a crash of an older version
    "[1, 2, 3]",  # valid JSON, wrong shape
    '{"machine|shape": {"workloads": "1,2", "cpu_seconds": []}}',  # our entry, wrong shape
    '{"machine|shape": {"workloads": [1, 2], "cpu_seconds": [1e-4], "gpu_seconds": [1e-4, 2e-4], '
    '"transfer_seconds": 0.001}}',  # lengths disagree
])
def test_a_damaged_cost_model_store_warns_is_measured_and_rewritten(store, content):
    path, measured, model = store
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="damaged|JSON object was expected"):
        assert profiling.profiled_costs(None, None, None, 0) == model
    assert len(measured) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten store is whole again: read back without a warning
        assert profiling.profiled_costs(None, None, None, 0) == model
    assert len(measured) == 1
    assert set(json.loads(path.read_text())) == {"machine|shape"}
    assert not list(path.parent.glob("*.tmp"))


def test_other_entries_survive_a_damaged_one(store):
    path, measured, model = store
    path.parent.mkdir(parents=True)
    good = {"workloads": [1], "cpu_seconds": [0.5], "gpu_seconds": [0.25], "transfer_seconds": 1.0}
    path.write_text(json.dumps({"other|shape": good, "machine|shape": {"workloads": None}}))
    with pytest.warns(RuntimeWarning, match="dropping 1 damaged"):
        profiling.profiled_costs(None, None, None, 0)
    assert json.loads(path.read_text())["other|shape"] == good


_WRITER = """
    import sys
    from dali_compile.runtime import profiling
    name, count = sys.argv[1], int(sys.argv[2])
    for i in range(count):
        profiling._store_entry(profiling._store(), f"{name}-{i}", {"workloads": [1], "cpu_seconds": [i + 1.0],
                               "gpu_seconds": [1.0], "transfer_seconds": 1.0})
"""


def test_two_processes_writing_at_once_keep_every_entry(tmp_path):
    """Two processes each add 40 entries at the same time: each write is a read-modify-write, so without
    the lock one would drop the other's new entries, and with a fixed temporary name they would collide."""
    env = {**os.environ, "DALI_COMPILE_CACHE": str(tmp_path)}
    writers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_WRITER), name, "40"], env=env,
                                stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for writer in writers:
        _, err = writer.communicate(timeout=TIMEOUT)
        assert writer.returncode == 0, err
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DALI_COMPILE_CACHE", str(tmp_path))
        path = profiling._store()
    assert set(json.loads(path.read_text())) == {f"{name}-{i}" for name in "ab" for i in range(40)}
    assert not list(path.parent.glob("*.tmp"))
    assert (path.parent.stat().st_mode & 0o777) == 0o700
