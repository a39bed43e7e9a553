"""One command for a lent GPU: the CUDA tests, the GPU kernel benchmark, bench_e2e and the simulator's
GPU-side validation, each under its own time limit, within one total budget (default 8 minutes).

    python benchmarks/gpu_check.py OUT_DIR                     # everything, summary printed and in OUT_DIR
    python benchmarks/gpu_check.py OUT_DIR --dry-run           # the stages, their commands and limits
    python benchmarks/gpu_check.py OUT_DIR --stages tests gpu_bench --budget-s 300

Stages, in order (each writes OUT_DIR/<stage>.log, stdout and stderr together):
- env: python, torch, triton and transformers versions, the GPUs and their memory, nvidia-smi. Always run:
  the GPU stages run only where it counted a CUDA device;
- prepare: installs this checkout (`pip install --no-deps --no-build-isolation -e .`) where `dali_compile.ops`
  is not importable, then builds the C++ CPU runtime, so the build is timed here and not inside a test;
- tests: every test marked `cuda` (`-m cuda` over the test files that use the marker), across pytest-xdist
  workers where it is installed;
- gpu_bench: benchmarks/bench_gpu_experts.py at 1, 16 and 256 rows per expert, CSV into OUT_DIR;
- e2e: benchmarks/bench_e2e.py --device cuda, 2 layers, the policies its targets compare, Qwen3 first (the
  smaller, so a cut-short run still has one model), CSV into OUT_DIR;
- validate: benchmarks/validate_simulator.py --device cuda --quick --out OUT_DIR/validate (skipped while the
  script does not exist).

Limits: the budget is shared out by each stage's weight; a stage that ends early leaves its time to the
stages after it. At its limit a stage's whole process group gets SIGINT (pytest then prints its counts so
far), a few seconds later SIGKILL. A failing or timed-out stage does not stop the later ones. The summary
(OUT_DIR/summary.txt, also printed) gives each stage's status, seconds, limit and key lines, and ends with
one RESULT line. Exit status: 0 when every stage that ran passed, 1 when one failed or timed out, 2 when no
CUDA device was found (the GPU stages were skipped: nothing was checked on a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0
GRACE_S = 5.0  # between SIGINT and SIGKILL at a stage's limit, taken out of the stage's own limit
MAX_KEY_LINES = 40
MIN_STAGE_S = 0.5  # a stage left less than this by the stages before it is not started
NO_CUDA = "no CUDA device"


def last_lines(text: str, count: int = 10) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-count:]


def matching(pattern: str) -> Callable[[str], list[str]]:
    """Key lines: those matching a regex."""
    regex = re.compile(pattern)
    return lambda text: [line for line in text.splitlines() if regex.search(line)]


def blocks(*starts: str, lines: str | None = None) -> Callable[[str], list[str]]:
    """Key lines: each block opened by a line matching one of `starts` (up to the next blank line), and the
    single lines matching `lines`."""
    openers = [re.compile(s) for s in starts]
    single = re.compile(lines) if lines else None

    def extract(text: str) -> list[str]:
        keys, inside = [], False
        for line in text.splitlines():
            inside = any(o.search(line) for o in openers) or (inside and bool(line.strip()))
            if inside or (single and single.search(line)):
                keys.append(line)
        return keys

    return extract


def pytest_keys(text: str) -> list[str]:
    """The short summary's FAILED / ERROR / SKIPPED lines (a few each) and the final counts."""
    keys = []
    for prefix, count in (("FAILED", 10), ("ERROR", 5), ("SKIPPED", 5)):
        keys += [line for line in text.splitlines() if line.startswith(prefix)][:count]
    counts = re.compile(r"\d+ (passed|failed|errors?|skipped|deselected)|no tests ran|Interrupted")
    keys += [line for line in text.splitlines() if counts.search(line)][-1:]
    return keys


@dataclass(frozen=True)
class Stage:
    name: str
    command: tuple[str, ...]
    weight: float  # share of the budget; the default stages' weights are their seconds at 480 s
    needs_cuda: bool = True
    requires: str | None = None  # a file (relative to the repository) without which the stage is skipped
    key_lines: Callable[[str], list[str]] = last_lines


@dataclass
class StageResult:
    name: str
    status: str  # "ok", "failed", "timed out", "skipped", "not run"
    limit_s: float = 0.0
    seconds: float = 0.0
    rc: int | None = None
    note: str = ""
    log: Path | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.status == "failed":
            return f"failed (rc {self.rc})"
        return f"{self.status} ({self.note})" if self.note else self.status


# ---------------------------------------------------------------------------------------------------
# The stages


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """The test files that hold tests marked `cuda` (each also skips itself without a device)."""
    marked = re.compile(r"^@pytest\.mark\.cuda\b", re.MULTILINE)
    files = sorted((root / "tests").glob("test_*.py"))
    return [str(p.relative_to(root)) for p in files if marked.search(p.read_text())]


def pytest_options() -> list[str]:
    """xdist workers (half the cores, at most 8: the tests share one GPU and compile on the CPU) and a per-test
    timeout, where those plugins are installed."""
    options = []
    workers = min(8, (os.cpu_count() or 1) // 2)
    if workers >= 2 and importlib.util.find_spec("xdist") is not None:
        options += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        options += ["--timeout", "150"]
    return options


def default_stages(out: Path, python: str = sys.executable, root: Path = ROOT) -> list[Stage]:
    me = str(Path(__file__).resolve().relative_to(root))
    return [
        Stage("env", (python, me, "--report-environment"), 30, needs_cuda=False,
              key_lines=matching(r"^(python|torch|triton|transformers|cuda_devices|gpu\d|cpus)\b")),
        Stage("prepare", (python, me, "--prepare"), 60, needs_cuda=False, key_lines=matching(r"^prepare:")),
        Stage("tests", (python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfEs",
                        *pytest_options(), *cuda_test_files(root)), 150, key_lines=pytest_keys),
        Stage("gpu_bench", (python, "benchmarks/bench_gpu_experts.py", "--tokens", "1", "16", "256",
                            "--warmup", "3", "--repeats", "10", "--csv", str(out / "bench_gpu_experts.csv")), 45,
              key_lines=blocks(r"^model\s+rows/E", lines=r"GB/s.*TFLOP/s")),
        Stage("e2e", (python, "benchmarks/bench_e2e.py", "--device", "cuda", "--models", "qwen3", "mixtral",
                      "--budgets", "0.5", "--policies", "dali", "layerwise", "threshold", "cache_cpu_miss",
                      "--batches", "1", "8", "--layers", "2", "--steps", "8", "--repeats", "2",
                      "--csv", str(out / "bench_e2e.csv")), 130,
              key_lines=blocks(r"^model\s+budget\s+policy", r"^targets:", lines=r"^(FAIL|all \d+ runs)")),
        Stage("validate", (python, "benchmarks/validate_simulator.py", "--device", "cuda", "--quick",
                           "--out", str(out / "validate")), 65, requires="benchmarks/validate_simulator.py"),
    ]


def plan_limits(stages: list[Stage], budget_s: float) -> dict[str, float]:
    """Each stage's share of the budget by weight: the least it gets at run time."""
    total = sum(s.weight for s in stages)
    return {s.name: budget_s * s.weight / total for s in stages}


# ---------------------------------------------------------------------------------------------------
# Running them


def _exited(pid: int, timeout_s: float) -> bool:
    """Waits for the child to exit without reaping it: while it is an unreaped zombie its pid, and so its
    process group's id, cannot be reused, so signalling the group afterwards reaches only what it started."""
    deadline = time.monotonic() + max(timeout_s, 0.0)
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def run_limited(command: tuple[str, ...], log_path: Path, limit_s: float, cwd: Path) -> tuple[int, bool]:
    """Runs `command` in its own process group with its output in `log_path`; at `limit_s` the group gets SIGINT,
    then SIGKILL. Whatever the group still holds when the command ends is killed too. -> (rc, timed out)."""
    grace = min(GRACE_S, limit_s / 4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            timed_out = not _exited(proc.pid, limit_s - grace)
            if timed_out:
                _signal_group(proc.pid, signal.SIGINT)
                _exited(proc.pid, grace)
        finally:  # also when this process is interrupted: no stage outlives it
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        if timed_out:
            log.write(f"\ngpu_check: stopped at its limit of {limit_s:.0f} s\n")
    return proc.returncode, timed_out


def run_stage(stage: Stage, limit_s: float, out: Path, root: Path, cuda_devices: int | None) -> StageResult:
    result = StageResult(stage.name, "skipped", limit_s=limit_s)
    if stage.needs_cuda and not cuda_devices:
        result.note = NO_CUDA
        return result
    if stage.requires and not (root / stage.requires).exists():
        result.note = f"{stage.requires} does not exist"
        return result
    if limit_s < MIN_STAGE_S:
        result.status, result.note = "not run", "the budget is spent"
        return result
    result.log = out / f"{stage.name}.log"
    started = time.monotonic()
    result.rc, timed_out = run_limited(stage.command, result.log, limit_s, root)
    result.seconds = time.monotonic() - started
    result.status = "timed out" if timed_out else ("ok" if result.rc == 0 else "failed")
    text = result.log.read_text(errors="replace").partition("\n")[2]  # not the command line
    result.keys = (stage.key_lines(text) or last_lines(text))[:MAX_KEY_LINES]
    return result


def cuda_devices_in(log: Path | None) -> int:
    """The env stage's device count (0 where it did not say)."""
    text = log.read_text(errors="replace") if log is not None and log.exists() else ""
    found = re.findall(r"^cuda_devices: (\d+)", text, re.MULTILINE)
    return int(found[-1]) if found else 0


def run_check(stages: list[Stage], out: Path, budget_s: float = DEFAULT_BUDGET_S, cuda_devices: int | None = None,
              root: Path = ROOT) -> tuple[list[StageResult], int]:
    """Runs the stages in order within `budget_s`, writes and prints the summary. `cuda_devices`: None reads
    it from the "env" stage's log (no env stage: none). -> (results, exit status)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: list[StageResult] = []
    try:
        for i, stage in enumerate(stages):
            remaining = budget_s - (time.monotonic() - started)
            limit = max(remaining, 0.0) * stage.weight / sum(s.weight for s in stages[i:])
            print(f"gpu_check: {stage.name} (limit {limit:.0f} s)", flush=True)
            result = run_stage(stage, limit, out, root, cuda_devices if cuda_devices is not None else 0)
            if stage.name == "env" and cuda_devices is None:
                cuda_devices = cuda_devices_in(result.log)
            print(f"gpu_check: {stage.name}: {result.label}, {result.seconds:.1f} s", flush=True)
            results.append(result)
    finally:
        results += [StageResult(s.name, "not run", note="interrupted") for s in stages[len(results):]]
        text, status = summarize(results, budget_s, time.monotonic() - started, cuda_devices, root)
        (out / "summary.txt").write_text(text)
        print(text, flush=True)
    return results, status


# ---------------------------------------------------------------------------------------------------
# The summary


def _commit(root: Path) -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def summarize(results: list[StageResult], budget_s: float, used_s: float, cuda_devices: int | None,
              root: Path = ROOT) -> tuple[str, int]:
    """The summary text and the exit status: 1 if a stage failed, timed out or did not run, else 2 if GPU stages
    were skipped for want of a device, else 0."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"gpu_check: {now}, commit {_commit(root)}, budget {budget_s:.0f} s, used {used_s:.0f} s",
             f"cuda devices: {'unknown' if cuda_devices is None else cuda_devices}", "",
             f"{'stage':<10} {'status':<48} {'seconds':>7} {'limit':>6}  log"]
    for r in results:
        log = r.log.name if r.log else "-"
        lines.append(f"{r.name:<10} {r.label:<48} {r.seconds:>7.1f} {r.limit_s:>6.0f}  {log}")
    for r in results:
        if r.keys:
            lines += ["", f"== {r.name}", *(f"  {k}" for k in r.keys)]
    bad = [r.name for r in results if r.status in ("failed", "timed out", "not run")]
    no_gpu = [r.name for r in results if r.status == "skipped" and r.note == NO_CUDA]
    lines.append("")
    if no_gpu:
        lines.append(f"NO CUDA DEVICE: {', '.join(no_gpu)} skipped; nothing was checked on a GPU")
    if bad:
        lines.append(f"RESULT: FAILED ({', '.join(bad)})")
        return "\n".join(lines) + "\n", 1
    if no_gpu:
        lines.append("RESULT: NOT CHECKED (no CUDA device)")
        return "\n".join(lines) + "\n", 2
    lines.append("RESULT: OK")
    return "\n".join(lines) + "\n", 0


# ---------------------------------------------------------------------------------------------------
# The env and prepare stages' own work (run as subprocesses of the check)


def report_environment() -> int:
    import platform
    import shutil

    print(f"python {platform.python_version()} ({sys.executable}), {platform.platform()}")
    print(f"cpus {os.cpu_count()}")
    import torch

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    # The count first: the check reads it from this log even where a later import runs past the limit.
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"cuda_devices: {count}", flush=True)
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        print(f"gpu{i} {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)", flush=True)
    for name in ("triton", "transformers"):
        try:
            print(f"{name} {__import__(name).__version__}", flush=True)
        except ImportError:
            print(f"{name} not installed")
    if shutil.which("nvidia-smi"):
        print("\nnvidia-smi:", flush=True)
        subprocess.run(["nvidia-smi"], timeout=30, check=False)
    return 0


# Run in a fresh interpreter (an editable install made by this process is seen only by new ones); exit status 3:
# dali_compile.ops cannot be imported.
BUILD_RUNTIME = """
import sys, time
try:
    import dali_compile.ops
except ImportError as error:
    print(f"prepare: dali_compile.ops cannot be imported ({error})", flush=True)
    raise SystemExit(3)
import dali_compile
from dali_compile.runtime import cpu_extension
where = dali_compile.__file__
print(f"prepare: dali_compile from {where}" + ("" if where.startswith(sys.argv[1]) else " (NOT this checkout)"))
start = time.perf_counter()
ok = cpu_extension.cpu_extension_available()
print(f"prepare: C++ CPU runtime {'built/loaded' if ok else 'FAILED to build'} in {time.perf_counter() - start:.1f} s,"
      f" ISA {cpu_extension.cpu_isa()}")
raise SystemExit(0 if ok else 1)
"""


def prepare() -> int:
    """Builds the C++ CPU runtime; first installs this checkout (editable, offline) where dali_compile.ops cannot
    be imported, as on a bare GPU machine that only received a copy of the repository."""
    build = [sys.executable, "-c", BUILD_RUNTIME, str(ROOT)]
    rc = subprocess.run(build, cwd=ROOT, check=False).returncode
    if rc == 3:
        print("prepare: installing this checkout: pip install --no-deps --no-build-isolation -e .", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                        str(ROOT)], cwd=ROOT, check=False)
        rc = subprocess.run(build, cwd=ROOT, check=False).returncode
    return rc


# ---------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    names = [s.name for s in default_stages(Path("OUT"))]
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, help="folder for the logs, CSVs and summary.txt")
    parser.add_argument("--stages", nargs="+", choices=names, default=names,
                        help="a subset, run in the usual order (env always runs)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="total seconds for all stages (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages, commands and limits; run nothing")
    parser.add_argument("--report-environment", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None and not (args.report_environment or args.prepare):
        parser.error("the output folder is required")
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return args


def print_plan(stages: list[Stage], budget_s: float, root: Path = ROOT) -> None:
    limits = plan_limits(stages, budget_s)
    for s in stages:
        missing = s.requires and not (root / s.requires).exists()
        missing = f"  (skipped: {s.requires} does not exist)" if missing else ""
        cuda = "  [needs CUDA]" if s.needs_cuda else ""
        print(f"{s.name:<10} limit {limits[s.name]:>5.0f} s{cuda}{missing}\n    {shlex.join(s.command)}")
    print(f"total {sum(limits.values()):.0f} s of a budget of {budget_s:.0f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_environment:
        return report_environment()
    if args.prepare:
        return prepare()
    out = args.out.resolve()
    stages = [s for s in default_stages(out) if s.name in args.stages or s.name == "env"]
    if args.dry_run:
        print_plan(stages, args.budget_s)
        return 0
    return run_check(stages, out, args.budget_s)[1]


if __name__ == "__main__":
    sys.exit(main())
