"""The build cache of the C++ runtime: hash-keyed folders, the inter-process build lock, the safety check.

Builds here compile a tiny stand-in C++ source (about a second) through the same path as the real library
(`build_cache.compile_library`): the locking and checks do not depend on what is compiled. The real
sources are built from an empty cache once, in tests/test_cpu_experts.py. Every test points
DALI_COMPILE_CACHE at its own tmp_path, and anything that could hang runs in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dali_compile.runtime import build_cache, cpu_extension

TIMEOUT = 300  # seconds for any subprocess: far above a stand-in build, far below "forever"
FLAGS = ("-O1",)


def stand_in(directory: Path, answer: int = 42) -> str:
    """A one-function C++ library whose answer tells two builds apart."""
    source = directory / f"answer_{answer}.cpp"
    source.write_text(f'extern "C" int dali_test_answer() {{ return {answer}; }}\n')
    return str(source)


# Builds a stand-in in a fresh process, after a start barrier (so two of them really start together), and
# reports when it held the build lock: cpp_extension.load is wrapped to record its entry and exit times and
# to take a second longer, so that two processes' builds would overlap if the lock did not serialise them.
_BUILD = textwrap.dedent(
    """
    import ctypes, json, os, sys, time
    from pathlib import Path
    from torch.utils import cpp_extension
    from dali_compile.runtime import build_cache

    source, name, barrier = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    real_load, held = cpp_extension.load, []

    def slow_load(*args, **kwargs):
        start = time.time()
        time.sleep(1.0)
        path = real_load(*args, **kwargs)
        held.append((start, time.time()))
        return path

    cpp_extension.load = slow_load
    (barrier / f"ready-{os.getpid()}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.01)
    path = build_cache.compile_library([source], ("-O1",), (), name=name)
    print(json.dumps({"path": path, "answer": ctypes.CDLL(path).dali_test_answer(), "held": held}))
    """
)


def start_builds(tmp_path: Path, sources: list[str], names: list[str]) -> list[dict]:
    """Runs one _BUILD process per source, releases them together, returns their reports."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "DALI_COMPILE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, source, name, str(barrier)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for source, name in zip(sources, names, strict=True)]
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(list(barrier.glob("ready-*"))) < len(procs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a builder died early"
            time.sleep(0.05)
        (barrier / "go").touch()
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reports = []
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def test_concurrent_first_builds_take_turns_and_both_load(tmp_path):
    """Two processes start the same first build at the same moment: one builds while the other waits for the
    lock, then loads the finished library; neither crashes, hangs or loads a half-written file."""
    source = stand_in(tmp_path)
    first, second = start_builds(tmp_path, [source, source], ["dali_test_same", "dali_test_same"])
    assert first["answer"] == second["answer"] == 42
    assert first["path"] == second["path"]
    (a_start, a_end), (b_start, b_end) = first["held"][0], second["held"][0]
    assert a_end <= b_start or b_end <= a_start, "the two builds ran inside the lock at the same time"
    assert len(list((tmp_path / "cache").rglob("*.so"))) == 1


def test_builds_of_different_sources_or_flags_get_their_own_folders(tmp_path, monkeypatch):
    """Two versions of dali_compile (here: two contents of one source) built at once: two folders, and each
    process loads its own library instead of overwriting the other's."""
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path / "cache"))
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    sources = [stand_in(old, 41), stand_in(new, 42)]
    reports = start_builds(tmp_path, sources, ["dali_test_old", "dali_test_new"])
    assert [r["answer"] for r in reports] == [41, 42]
    assert Path(reports[0]["path"]).parent != Path(reports[1]["path"]).parent
    # The key also follows the flags, the headers' contents and torch's version (the folder above).
    key = build_cache.build_key([sources[0]], [], FLAGS, ())
    assert key != build_cache.build_key([sources[0]], [], ("-O2",), ())
    assert key != build_cache.build_key([sources[0]], [sources[1]], FLAGS, ())
    assert build_cache.build_dir([sources[0]], [], FLAGS, ()).parent == tmp_path / "cache" / torch.__version__
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert key != build_cache.build_key([sources[0]], [], FLAGS, ())
    assert build_cache.build_dir([sources[0]], [], FLAGS, ()).parent == tmp_path / "cache" / "0.0.0+other"


def test_the_key_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """The same build asked for from two working directories is one folder: `dali-compile` runs from anywhere,
    and a key that followed the working directory rebuilt the runtime (minutes on 2 cores) in every new one."""
    source = stand_in(tmp_path)
    monkeypatch.chdir(tmp_path)
    key = build_cache.build_key([source], [source], FLAGS, ())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert build_cache.build_key([source], [source], FLAGS, ()) == key


_BUILD_ONCE = textwrap.dedent(
    """
    import ctypes, sys
    from dali_compile.runtime import build_cache
    path = build_cache.compile_library([sys.argv[1]], ("-O1",), (), name="dali_test_once")
    print(ctypes.CDLL(path).dali_test_answer())
    """
)


def build_once(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DALI_COMPILE_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", _BUILD_ONCE, source], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_a_torch_lock_left_by_a_killed_build_is_removed(tmp_path, monkeypatch):
    """torch's own build lock (`lock`, no owner recorded) left behind by a killed build: torch alone would
    wait for it forever; under dali's lock it is known to be stale, removed, and the build goes on."""
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path / "cache"))
    source = stand_in(tmp_path)
    directory = build_cache.make_private_dirs(build_cache.build_dir([source], [], FLAGS, ()))
    (directory / "lock").write_text("")
    done = build_once(tmp_path, source)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42"]
    assert not (directory / "lock").exists()


_HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dali_compile.runtime import build_cache
    with build_cache.build_lock(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(600)
    """
)


def hold_build_lock(directory: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_the_lock_of_a_build_killed_mid_way_is_released(tmp_path, monkeypatch):
    """A builder killed while holding dali's lock (SIGKILL: no cleanup at all) does not block the next one."""
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path / "cache"))
    source = stand_in(tmp_path)
    directory = build_cache.make_private_dirs(build_cache.build_dir([source], [], FLAGS, ()))
    holder = hold_build_lock(directory)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=TIMEOUT)
    assert (directory / "dali_build.lock").exists()  # the file stays; the kernel dropped the flock
    done = build_once(tmp_path, source)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42"]


def test_a_live_holder_is_waited_for_a_bounded_time_and_named(tmp_path, monkeypatch):
    """A build that never ends (a stuck compiler) holds the lock: the next process gives up after
    BUILD_LOCK_TIMEOUT_SECONDS with an error naming the holder, instead of waiting forever."""
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build_cache, "BUILD_LOCK_TIMEOUT_SECONDS", 0.5)
    source = stand_in(tmp_path)
    directory = build_cache.make_private_dirs(build_cache.build_dir([source], [], FLAGS, ()))
    holder = hold_build_lock(directory)
    try:
        start = time.monotonic()
        with pytest.raises(build_cache.BuildLockTimeout, match=f"held by process {holder.pid}"):
            build_cache.compile_library([source], FLAGS, (), name="dali_test_waits")
        assert time.monotonic() - start < 30
    finally:
        holder.kill()
        holder.wait(timeout=TIMEOUT)
    assert not list(directory.glob("*.so"))


def test_cache_folders_are_created_private(tmp_path, monkeypatch):
    root = tmp_path / "fresh" / "cache"
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(root))
    directory = build_cache.make_private_dirs(build_cache.build_dir([stand_in(tmp_path)], [], FLAGS, ()))
    for folder in (root, root / torch.__version__, directory):
        assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700, folder


@pytest.mark.parametrize("where", ["root", "build folder"])
def test_a_world_writable_cache_is_refused(tmp_path, monkeypatch, where):
    """Anyone could swap the library in a world-writable folder: nothing is built or loaded from it."""
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path / "cache"))
    source = stand_in(tmp_path)
    directory = build_cache.make_private_dirs(build_cache.build_dir([source], [], FLAGS, ()))
    unsafe = tmp_path / "cache" if where == "root" else directory
    unsafe.chmod(0o777)
    with pytest.raises(build_cache.UnsafeCacheError, match=re.escape(f"{unsafe} is writable by group or others")):
        build_cache.compile_library([source], FLAGS, (), name="dali_test_unsafe")
    assert not list(directory.glob("*.so"))


def test_a_cache_owned_by_someone_else_is_refused(tmp_path, monkeypatch):
    """Simulated by playing another user: the folder's owner is then not the current user."""
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path / "cache"))
    source = stand_in(tmp_path)
    (tmp_path / "cache").mkdir(mode=0o700)
    monkeypatch.setattr(build_cache, "_current_uid", lambda: os.geteuid() + 1)
    with pytest.raises(build_cache.UnsafeCacheError, match=f"is owned by uid {os.geteuid()}, not this user"):
        build_cache.compile_library([source], FLAGS, (), name="dali_test_foreign")


def test_a_library_writable_by_others_is_not_loaded(tmp_path, monkeypatch):
    """A safe folder with a library file that others may write (copied in, say): refused before loading."""
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path / "cache"))
    source = stand_in(tmp_path)
    directory = build_cache.make_private_dirs(build_cache.build_dir([source], [], FLAGS, ()))
    (directory / "dali_test_lib.so").write_bytes(b"not a library")
    (directory / "dali_test_lib.so").chmod(0o666)
    with pytest.raises(build_cache.UnsafeCacheError, match="dali_test_lib.so is writable"):
        build_cache.compile_library([source], FLAGS, (), name="dali_test_lib")


def test_an_unsafe_cache_means_the_reference_with_one_clear_warning(tmp_path, monkeypatch):
    """What a user meets: the loader refuses the cache (no build starts), warns once naming the folder and
    the fix, and the ops run the PyTorch reference."""
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path / "shared"))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o777)
    monkeypatch.setattr(cpu_extension, "_library", None)
    monkeypatch.setattr(cpu_extension, "_load_attempted", False)
    with pytest.warns(RuntimeWarning, match="UnsafeCacheError.*shared is writable.*DALI_COMPILE_CACHE") as caught:
        assert not cpu_extension.cpu_extension_available()
    assert len(caught) == 1
    assert cpu_extension.cpu_isa() == "reference"
    assert not list((tmp_path / "shared").rglob("*.so"))


def test_a_linked_cache_root_is_judged_by_its_target(tmp_path, monkeypatch):
    """~/.cache/dali_compile linked to a bigger disk is common: fine if the target is private, refused if not."""
    target, link = tmp_path / "disk", tmp_path / "link"
    target.mkdir(mode=0o700)
    link.symlink_to(target)
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(link))
    directory = build_cache.make_private_dirs(build_cache.build_dir([stand_in(tmp_path)], [], FLAGS, ()))
    assert directory.resolve().parent.parent == target
    target.chmod(0o777)
    with pytest.raises(build_cache.UnsafeCacheError, match="is writable by group or others"):
        build_cache.make_private_dirs(directory)
