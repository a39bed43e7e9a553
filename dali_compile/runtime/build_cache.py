"""The persistent, per-user build cache of compiled C++ libraries, and the build that fills it.

`compile_library(sources, cflags, ldflags, name=...)` builds `sources` with
`torch.utils.cpp_extension.load(..., is_python_module=False)` into a folder of the cache (unless that exact
build is there already) and loads the library into the process. It knows nothing of what it compiles:
`cpu_extension` passes the runtime's sources and flags, tests pass a stand-in source.

The folder (`build_dir`): `$DALI_COMPILE_CACHE/<torch version>/<stem>-<key>`, by default under
`~/.cache/dali_compile`, where the key hashes the sources' and headers' contents and location, the flags,
the compiler (`$CXX`) and torch's version, so two versions of dali_compile (or of its flags) never
overwrite each other's build; a later process with the same key just loads the library. Old folders are
not removed. `cache_dir()` (the per-torch-version folder) also holds other per-machine state, such as the
cost models of `profiling`. Safety, before anything is built or loaded:
  - every folder from the cache root down is created with mode 0o700 and must be owned by this user
    and not group/world-writable, and so must an existing library; otherwise `UnsafeCacheError` (a
    library that someone else could have replaced is never loaded);
  - compile + load run under an exclusive `fcntl.flock` on `<build dir>/dali_build.lock`. The kernel drops
    it when its holder dies, so a killed build never blocks later processes; while holding it, a `lock`
    file left by torch's own (pid-less) build lock is removed, since nobody else can be building. A live
    holder is waited for at most BUILD_LOCK_TIMEOUT_SECONDS (then `BuildLockTimeout`, naming its pid).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# How long a process waits for another live process's build of the same folder (a build takes 1-2 min on
# 2 cores). A dead holder's lock is released by the kernel at once, so this only bounds a stuck compiler.
BUILD_LOCK_TIMEOUT_SECONDS = 1800
# Bumped when the build folder's layout or the key's recipe changes.
_KEY_VERSION = "1"

# The owner every cache folder must have; a function so that tests can play another user.
_current_uid = os.geteuid


class UnsafeCacheError(RuntimeError):
    """A cache folder or library that another user owns or could write to: it is never loaded from."""


class BuildLockTimeout(TimeoutError):
    """Another live process held the build lock longer than BUILD_LOCK_TIMEOUT_SECONDS."""


def cache_root() -> Path:
    """`$DALI_COMPILE_CACHE`, default `~/.cache/dali_compile`: the folder dali creates and checks."""
    return Path(os.environ.get("DALI_COMPILE_CACHE") or os.path.join(Path.home(), ".cache", "dali_compile"))


def cache_dir() -> Path:
    """Per torch version (the ABI follows torch): holds the build folders and `cost_models.json`."""
    return cache_root() / torch.__version__


def build_key(sources: Sequence[str], headers: Sequence[str], cflags: Sequence[str],
              ldflags: Sequence[str]) -> str:
    """12 hex digits of a hash of everything that changes the library: file contents and places, flags,
    compiler and torch."""
    digest = hashlib.sha256()
    parts = [_KEY_VERSION, torch.__version__, str(torch.version.git_version), sys.platform,
             os.environ.get("CXX", ""), *cflags, "|", *ldflags]
    for part in parts:
        digest.update(part.encode() + b"\0")
    for path in (*sources, "|", *headers):
        if path == "|":  # the separator, not a file: made absolute it would put the working directory in the key
            digest.update(b"|\0")
            continue
        digest.update(os.path.abspath(path).encode() + b"\0")
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def build_dir(sources: Sequence[str], headers: Sequence[str], cflags: Sequence[str], ldflags: Sequence[str],
              stem: str = "cpu_ext") -> Path:
    """`<cache_dir()>/<stem>-<build_key>`: one folder per distinct build."""
    return cache_dir() / f"{stem}-{build_key(sources, headers, cflags, ldflags)}"


def check_private(path: Path) -> None:
    """Raises UnsafeCacheError unless `path` is owned by this user and not group- or world-writable. A symbolic
    link is judged by its target (only its folder's owner could have made it, and that folder is checked too)."""
    info = path.stat()
    problems = []
    if info.st_uid != _current_uid():
        problems.append(f"is owned by uid {info.st_uid}, not this user (uid {_current_uid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})")
    if problems:
        raise UnsafeCacheError(
            f"dali_compile's cache {path} {' and '.join(problems)}: another user could replace the compiled "
            f"library, so it is not used. Fix it (chmod 700, chown to yourself) or point DALI_COMPILE_CACHE to a "
            f"private folder")


def make_private_dirs(path: Path) -> Path:
    """Creates `path` and the folders between it and `cache_root()` with mode 0o700 (the root's own parents as
    usual) and checks each of them, existing or new, with check_private."""
    root = cache_root()
    path = Path(path)
    chain = [path, *path.parents]
    chain = chain[: chain.index(root) + 1] if root in chain else [path]
    for folder in reversed(chain):
        if folder == root:
            folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
        check_private(folder)
    return path


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Holds `<directory>/dali_build.lock` exclusively (an flock: released by the kernel if this process
    dies), waiting at most BUILD_LOCK_TIMEOUT_SECONDS for a live holder. The file records the holder's pid,
    for the messages only."""
    path = directory / "dali_build.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + BUILD_LOCK_TIMEOUT_SECONDS
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() > deadline:
                    raise BuildLockTimeout(
                        f"the build in {directory} has been held by process {holder} for over "
                        f"{BUILD_LOCK_TIMEOUT_SECONDS} s; stop it, or delete the folder") from None
                if not announced:
                    log.info("waiting for process %s, which builds %s", holder, directory)
                    announced = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _remove_torch_lock(directory: Path) -> None:
    # torch's FileBaton: created by a build, deleted when it ends, no owner recorded. Under our flock nobody
    # else builds here, so one that exists was left by a killed build and would block cpp_extension forever.
    lock = directory / "lock"
    if lock.exists():
        log.warning("removing %s, left by a killed build", lock)
        lock.unlink(missing_ok=True)


def compile_library(sources: Sequence[str], cflags: Sequence[str], ldflags: Sequence[str], *, name: str,
                    headers: Sequence[str] = (), stem: str = "cpu_ext") -> str:
    """Builds `sources` (if this exact build is not cached yet) and loads the library into the process;
    returns its path. Safe against other processes building the same folder at the same moment."""
    from torch.utils import cpp_extension

    directory = make_private_dirs(build_dir(sources, headers, cflags, ldflags, stem))
    with build_lock(directory):
        _remove_torch_lock(directory)
        library = directory / f"{name}.so"
        if library.exists():
            check_private(library)
        return cpp_extension.load(
            name=name,
            sources=list(sources),
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
