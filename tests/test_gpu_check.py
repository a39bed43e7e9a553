"""benchmarks/gpu_check.py, the one command for a lent GPU, tested without one: the plan fits the budget,
failing and hanging stages are reported and do not stop the later ones, a hung stage's whole process group
is killed, and a machine without CUDA is never reported as passing. Fake stages are tiny `python -c` commands;
no benchmark or CUDA test runs here."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402
from gpu_check import NO_CUDA, Stage, default_stages, plan_limits, run_check  # noqa: E402


def py(code: str, weight: float = 1.0, name: str | None = None, **kwargs) -> Stage:
    return Stage(name or code[:12], (sys.executable, "-c", code), weight, needs_cuda=kwargs.pop("needs_cuda", False),
                 **kwargs)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent (an orphan's parent may be a PID 1 that never reaps)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def by_name(results):
    return {r.name: r for r in results}


# ---- the plan ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [480.0, 100.0])  # the default, and one scaled down
def test_dry_run_lists_every_stage_with_a_limit_within_the_budget(tmp_path, capsys, budget):
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--dry-run", "--budget-s", str(budget)]) == 0
    printed = capsys.readouterr().out
    names = [s.name for s in default_stages(out)]
    assert names == ["env", "prepare", "tests", "gpu_bench", "e2e", "validate"]
    for name in names:
        assert any(line.startswith(f"{name} ") and " limit " in line for line in printed.splitlines()), name
    limits = plan_limits(default_stages(out), budget)
    assert all(limit > 0 for limit in limits.values())
    assert sum(limits.values()) <= budget + 1e-6
    assert f"of a budget of {budget:.0f} s" in printed
    assert not out.exists(), "a dry run writes nothing"


def test_dry_run_of_a_subset_keeps_env_which_counts_the_devices(tmp_path, capsys):
    gpu_check.main([str(tmp_path), "--dry-run", "--stages", "gpu_bench"])
    stages = [line.split()[0] for line in capsys.readouterr().out.splitlines() if " limit " in line]
    assert stages == ["env", "gpu_bench"]


def test_the_tests_stage_covers_every_file_with_a_cuda_skip():
    """`-m cuda` over these files: a CUDA-only test in a file without the marker would silently never run."""
    tests = Path(__file__).resolve().parent
    skipping = {f"tests/{p.name}" for p in tests.glob("test_*.py")
                if p.name != Path(__file__).name and "needs a CUDA device" in p.read_text()}
    assert skipping and skipping <= set(gpu_check.cuda_test_files())
    command = by_name(default_stages(Path("out")))["tests"].command
    assert command[command.index("-m", 2) + 1] == "cuda"


# ---- running ---------------------------------------------------------------------------------------------


def test_failing_and_timed_out_stages_are_reported_and_later_stages_still_run(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "print('hanging', flush=True)\n"
            "time.sleep(60)\n")
    stages = [py("print('boom'); raise SystemExit(3)", name="fails"), py(hang, name="hangs"),
              py("print('after ran')", name="after")]
    started = time.monotonic()
    results, status = run_check(stages, tmp_path, budget_s=3.0, cuda_devices=0)
    assert time.monotonic() - started < 3.0 + 1.5  # the budget holds (plus interpreter start and reaping)
    got = by_name(results)
    assert (got["fails"].status, got["fails"].rc, got["fails"].label) == ("failed", 3, "failed (rc 3)")
    assert "boom" in got["fails"].keys
    assert got["hangs"].status == "timed out" and "hanging" in got["hangs"].keys
    assert got["hangs"].seconds <= got["hangs"].limit_s + 0.5
    assert got["after"].status == "ok" and got["after"].keys == ["after ran"]
    assert status == 1
    # The grandchild ignored SIGINT: SIGKILL to the group ended it too.
    deadline = time.monotonic() + 2
    while alive(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(int(pid_file.read_text()))
    summary = (tmp_path / "summary.txt").read_text()
    assert "failed (rc 3)" in summary and "timed out" in summary and "RESULT: FAILED (fails, hangs)" in summary
    assert (tmp_path / "hangs.log").read_text().rstrip().endswith("s")  # "stopped at its limit of N s"


def test_all_ok_exits_zero_and_a_missing_script_is_a_skip_not_a_failure(tmp_path):
    stages = [py("print('fine')", name="one"), py("pass", name="later", requires="benchmarks/not_written_yet.py")]
    results, status = run_check(stages, tmp_path, budget_s=20.0, cuda_devices=0)
    got = by_name(results)
    assert got["one"].status == "ok"
    assert (got["later"].status, got["later"].note) == ("skipped", "benchmarks/not_written_yet.py does not exist")
    assert status == 0
    assert (tmp_path / "summary.txt").read_text().rstrip().endswith("RESULT: OK")


def test_the_device_count_comes_from_the_env_stage(tmp_path):
    stages = [py("print('cuda_devices: 1')", name="env"), py("print('on the gpu')", name="gpu", needs_cuda=True)]
    results, status = run_check(stages, tmp_path, budget_s=20.0)
    assert by_name(results)["gpu"].status == "ok" and status == 0
    assert "cuda devices: 1" in (tmp_path / "summary.txt").read_text()


def test_an_env_stage_that_says_nothing_means_no_device(tmp_path):
    stages = [py("raise SystemExit(1)", name="env"), py("pass", name="gpu", needs_cuda=True)]
    results, status = run_check(stages, tmp_path, budget_s=20.0)
    assert (by_name(results)["gpu"].status, by_name(results)["gpu"].note) == ("skipped", NO_CUDA)
    assert status == 1  # env failed: that outranks the skip


def test_without_cuda_the_gpu_stages_are_skipped_and_the_run_does_not_pass(tmp_path):
    stages = [s for s in default_stages(tmp_path) if s.needs_cuda]
    results, status = run_check(stages, tmp_path, cuda_devices=0)
    assert [r.status for r in results] == ["skipped"] * len(stages)
    assert status == 2
    summary = (tmp_path / "summary.txt").read_text()
    assert "NO CUDA DEVICE: tests, gpu_bench, e2e, validate skipped" in summary
    assert summary.rstrip().endswith("RESULT: NOT CHECKED (no CUDA device)")


def test_a_spent_budget_leaves_the_last_stages_not_run(tmp_path):
    stages = [py("import time; time.sleep(5)", name="slow"), py("pass", weight=1e-2, name="last")]
    results, status = run_check(stages, tmp_path, budget_s=1.5, cuda_devices=0)
    assert [r.status for r in results] == ["timed out", "not run"]
    assert status == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine this would run the real GPU stages")
def test_real_run_on_this_machine_says_there_is_no_cuda_device(tmp_path, capsys):
    """The real entry point: env runs (torch's import, a few seconds) and counts no device."""
    status = gpu_check.main([str(tmp_path), "--stages", "tests", "gpu_bench", "--budget-s", "60"])
    printed = capsys.readouterr().out
    assert status == 2
    assert "cuda_devices: 0" in (tmp_path / "env.log").read_text()
    assert "NO CUDA DEVICE" in printed and "RESULT: NOT CHECKED" in printed
    assert sorted(os.listdir(tmp_path)) == ["env.log", "summary.txt"]


# ---- key lines -----------------------------------------------------------------------------------------


def test_key_lines_of_pytest_and_the_benchmarks():
    pytest_log = "....F.s\nFAILED tests/test_a.py::test_x - boom\nSKIPPED [1] tests/b.py:3: why\n" \
                 "1 failed, 5 passed, 1 skipped in 12.0s\n"
    assert gpu_check.pytest_keys(pytest_log) == ["FAILED tests/test_a.py::test_x - boom",
                                                 "SKIPPED [1] tests/b.py:3: why",
                                                 "1 failed, 5 passed, 1 skipped in 12.0s"]
    e2e = by_name(default_stages(Path("out")))["e2e"].key_lines
    log = ("noise\n\nprefill tok/s = ...\nmodel    budget policy   pre b1\nmixtral     50% dali   10.0\n\n"
           "targets: dali at the 50% budget, batch 8\n  PASS mixtral dali decode >= 2.0x layerwise: 2.10x\n\n"
           "all 5 runs match the reference tokens\n")
    assert e2e(log) == ["model    budget policy   pre b1", "mixtral     50% dali   10.0",
                        "targets: dali at the 50% budget, batch 8",
                        "  PASS mixtral dali decode >= 2.0x layerwise: 2.10x", "all 5 runs match the reference tokens"]
    assert gpu_check.last_lines("a\n\nb\nc\n", 2) == ["b", "c"]
