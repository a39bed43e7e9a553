"""Builds and loads the C++ CPU expert runtime (`csrc/`) on first use, into a persistent cache.

The sources ship inside the package (`dali_compile.csrc`) and are compiled with
`torch.utils.cpp_extension.load` against ATen headers only (no pybind11: about 12 s instead of a
minute). Loading registers the CPU kernels of the `dali::cpu_experts*`, `dali::cpu_linear` and
`dali::quantized_linear` ops (the schemas live in `dali_compile.ops.cpu_experts`, `.cpu_linear` and
`.quantized_linear`). Without a compiler, or if the build fails, `cpu_extension_available()` returns
False after one warning, and the ops run their PyTorch reference instead.

The build itself (`build_cache.compile_library`): a persistent per-user cache,
`$DALI_COMPILE_CACHE/<torch version>/cpu_ext-<key>` (default under `~/.cache/dali_compile`), keyed by a hash
of the sources, headers, flags, compiler and torch, checked to be private (else `UnsafeCacheError`, and the
ops fall back to the reference with a warning naming the folder) and built under an inter-process lock.
This module chooses what is built (SOURCES, EXTRA_CFLAGS, EXTRA_LDFLAGS; NO_OPENMP_CFLAGS in a
`cpu_ext_no_openmp-<key>` folder if the OpenMP build fails) and passes it on; see `build_cache` for the
cache's layout and safety rules.

Runtime controls (thread count, ISA path) are plain C functions of the same library, called
through ctypes, so they are not ops. The C functions catch C++ exceptions themselves and return an
error code (-99, with dali_cpu_last_error()), raised here as RuntimeError; bad values are ValueErrors.

    cpu_extension_available() -> bool     # builds/loads on the first call
    set_num_threads(n); get_num_threads() # the runtime's own pool, 1..MAX_THREADS; default: physical cores
    cpu_isa() -> "avx512" | "avx2" | "portable" | "reference" (no extension)
    set_isa("portable" | "avx2" | "avx512" | "auto")   # or env DALI_CPU_ISA before the first load
    set_dense_gemm_min_tokens(n)          # fp32 experts with >= n tokens use ATen's GEMM
    set_transposed_gemm_max_rows(n)       # ... as w . x^T plus a transposing copy up to n tokens
    set_linear_gemm_min_rows(n)           # dali::cpu_linear: ATen's fp32 GEMM from n rows on
    set_bf16_gemm_min_tokens(n); set_linear_bf16_gemm_min_rows(n)   # bf16 weights: ATen's bf16 GEMM as
                                          # stored from n tokens per expert / rows on (default: AMX-BF16 CPUs only)
    set_quantized_bf16_gemm_min_rows(n)   # int8 / int4 with bf16 activations: the bf16 GEMM on dequantized
                                          # blocks from n (int4: 2n) tokens per expert or rows on (AMX-BF16 only)
    has_amx_bf16()
    read_bandwidth_gbps(); read_tensors(*tensors); tensor_reader(*tensors)   # the physical limit, for benchmarks

Env: DALI_CPU_EXTENSION=0 disables the extension (reference only), DALI_CPU_THREADS sets the
initial thread count, DALI_CPU_ISA the initial ISA path, DALI_CPU_BF16_GEMM=0 turns the bf16 GEMM paths off (default
"auto": on with AMX-BF16 only).

Fork: a child forked after the runtime's threads started gets a fresh pool and job queue on first use
(csrc/core/runtime.h), and its synchronous calls run on that pool, since ATen's OpenMP team does not
survive a fork (torch's own parallel ops hang in such a child unless it calls torch.set_num_threads(1)).
"""

from __future__ import annotations

import ctypes
import importlib.resources
import logging
import operator
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from . import build_cache

log = logging.getLogger(__name__)

LIBRARY_NAME = "dali_cpu_experts"
# Relative to the dali_compile.csrc package. Headers are tracked by ninja's dependency files.
SOURCES = (
    "core/isa.cpp",
    "core/kernels_portable.cpp",
    "core/kernels_avx2.cpp",
    "core/kernels_avx512.cpp",
    "core/kernels_avx512_vnni.cpp",
    "core/thread_pool.cpp",
    "core/job_queue.cpp",
    "core/experts.cpp",
    "core/linear.cpp",
    "core/attention.cpp",
    "core/quantized_linear.cpp",
    "core/int8_activations.cpp",
    "core/runtime.cpp",
    "core/planner.cpp",
    "core/prefetch.cpp",
    "binding/cpu_experts_ops.cpp",
    "binding/linear_ops.cpp",
    "binding/attention_ops.cpp",
    "binding/quantized_linear_ops.cpp",
    "binding/aten_parallel.cpp",
    "binding/resident_layers.cpp",
    "binding/fast_calls.cpp",
)
# No -march=native: the library must run on any x86-64 (ISA paths are picked at run time).
# -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled into our
# library; without the flag it runs serially. The libgomp it links against is the one torch already
# loaded (same soname), so ATen's kernels and ours share one OpenMP runtime and one thread team.
EXTRA_CFLAGS = ("-O3", "-DNDEBUG", "-fopenmp")
EXTRA_LDFLAGS = ("-fopenmp",)
# A compiler without OpenMP (clang without libomp, say) builds without it, into its own folder: the kernels
# are the same, but synchronous calls then run on the runtime's own pool (binding/aten_parallel.cpp).
NO_OPENMP_CFLAGS = ("-O3", "-DNDEBUG")
ISA_NAMES = ("portable", "avx2", "avx512")
# The pool's size limit, as kMaxThreads in csrc/core/runtime.h: catches a typo (10**9), not a policy.
MAX_THREADS = 1024
# C entry points return this when they caught a C++ exception (kCppException in csrc/core/runtime.h).
CPP_EXCEPTION = -99

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_fast_calls = None  # the library's CPython module (binding/fast_calls.cpp), where it was built with Python's headers
_library_path: str | None = None
_load_attempted = False
# Registry redirects active in any thread (see pause_resident_layers).
_redirects_active = 0
_redirect_lock = threading.Lock()


def source_paths() -> list[str]:
    root = importlib.resources.files("dali_compile.csrc")
    return [str(root.joinpath(*rel.split("/"))) for rel in SOURCES]


def header_paths() -> list[str]:
    """Every header of `csrc/` (part of the build key: ninja tracks them, the folder name must too)."""
    root = Path(str(importlib.resources.files("dali_compile.csrc")))
    return sorted(str(path) for path in root.rglob("*.h"))


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings share load/store bandwidth, not worth a thread)."""
    try:
        cores = set()
        for cpu in os.sched_getaffinity(0):
            topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        return max(1, len(cores))
    except (OSError, AttributeError):
        return os.cpu_count() or 1


def _build_and_load() -> ctypes.CDLL:
    start = time.perf_counter()
    sources, headers = source_paths(), header_paths()
    try:
        path = build_cache.compile_library(sources, EXTRA_CFLAGS, EXTRA_LDFLAGS, name=LIBRARY_NAME, headers=headers)
    except (build_cache.UnsafeCacheError, build_cache.BuildLockTimeout):
        raise  # not the compiler's fault: a build without OpenMP would meet the same
    except Exception as error:  # noqa: BLE001  (whatever failed, the build without OpenMP may not)
        warnings.warn(
            f"dali_compile: building the C++ CPU runtime with OpenMP failed ({type(error).__name__}); building it "
            f"without: synchronous calls then run on the runtime's own threads beside ATen's",
            RuntimeWarning,
            stacklevel=4,
        )
        path = build_cache.compile_library(sources, NO_OPENMP_CFLAGS, (), name=LIBRARY_NAME, headers=headers,
                                           stem="cpu_ext_no_openmp")
    log.info("loaded %s in %.1f s", path, time.perf_counter() - start)
    global _library_path
    _library_path = path
    # The library is already loaded (registering the kernels); this only looks up its C functions.
    lib = ctypes.CDLL(path)
    lib.dali_cpu_last_error.restype = ctypes.c_char_p
    lib.dali_cpu_get_num_threads.restype = ctypes.c_int
    lib.dali_cpu_set_num_threads.argtypes = [ctypes.c_int]
    lib.dali_cpu_set_num_threads.restype = ctypes.c_int
    lib.dali_cpu_isa.restype = ctypes.c_char_p
    lib.dali_cpu_best_isa.restype = ctypes.c_char_p
    lib.dali_cpu_set_isa.argtypes = [ctypes.c_char_p]
    lib.dali_cpu_set_isa.restype = ctypes.c_int
    lib.dali_cpu_outstanding_jobs.restype = ctypes.c_int64
    lib.dali_cpu_last_region_threads.restype = ctypes.c_int
    lib.dali_cpu_last_region_width.restype = ctypes.c_int
    lib.dali_cpu_get_dense_gemm_min_tokens.restype = ctypes.c_int64
    lib.dali_cpu_set_dense_gemm_min_tokens.argtypes = [ctypes.c_int64]
    lib.dali_cpu_get_transposed_gemm_max_rows.restype = ctypes.c_int64
    lib.dali_cpu_set_transposed_gemm_max_rows.argtypes = [ctypes.c_int64]
    lib.dali_cpu_set_step_on_host_threads.argtypes = [ctypes.c_int]
    lib.dali_cpu_set_step_on_host_threads.restype = ctypes.c_int
    lib.dali_cpu_get_step_on_host_threads.restype = ctypes.c_int
    lib.dali_cpu_get_linear_gemm_min_rows.restype = ctypes.c_int64
    lib.dali_cpu_set_linear_gemm_min_rows.argtypes = [ctypes.c_int64]
    lib.dali_cpu_get_bf16_gemm_min_tokens.restype = ctypes.c_int64
    lib.dali_cpu_set_bf16_gemm_min_tokens.argtypes = [ctypes.c_int64]
    lib.dali_cpu_get_linear_bf16_gemm_min_rows.restype = ctypes.c_int64
    lib.dali_cpu_set_linear_bf16_gemm_min_rows.argtypes = [ctypes.c_int64]
    lib.dali_cpu_get_quantized_bf16_gemm_min_rows.restype = ctypes.c_int64
    lib.dali_cpu_set_quantized_bf16_gemm_min_rows.argtypes = [ctypes.c_int64]
    lib.dali_cpu_has_amx_bf16.restype = ctypes.c_int
    lib.dali_cpu_read_bandwidth_gbps.argtypes = [ctypes.c_int64, ctypes.c_int]
    lib.dali_cpu_read_bandwidth_gbps.restype = ctypes.c_double
    lib.dali_cpu_read_buffers.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                          ctypes.POINTER(ctypes.c_uint64)]
    lib.dali_cpu_read_buffers.restype = ctypes.c_int
    lib.dali_greedy_plan.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.dali_greedy_plan.restype = ctypes.c_int
    lib.dali_prefetch_choice.argtypes = ([ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
                                         + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3)
    lib.dali_prefetch_choice.restype = ctypes.c_int
    lib.dali_predict_prefetch.argtypes = (
        [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
         ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 4
        + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 5)
    lib.dali_predict_prefetch.restype = ctypes.c_int
    lib.dali_step_routing.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3
    lib.dali_step_routing.restype = ctypes.c_int64
    lib.dali_workload_update.argtypes = ([ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
                                         + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p])
    lib.dali_workload_update.restype = ctypes.c_int64
    lib.dali_decide_workload.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] + [
        ctypes.c_int64] * 2
    lib.dali_decide_workload.restype = ctypes.c_int64
    lib.dali_cpu_resident_publish.argtypes = [ctypes.c_int64] + [ctypes.c_ssize_t] * 6 + [ctypes.c_char_p] + [
        ctypes.c_int] * 3 + [ctypes.c_char_p, ctypes.c_double, ctypes.c_double]
    lib.dali_cpu_resident_publish.restype = ctypes.c_int
    lib.dali_cpu_resident_forget.restype = None
    lib.dali_cpu_resident_pause.argtypes = [ctypes.c_int]
    lib.dali_cpu_resident_pause.restype = None
    lib.dali_cpu_resident_count.restype = ctypes.c_int
    return lib


def _checked(lib: ctypes.CDLL, result: int, what: str) -> int:
    """`result` of a C call, or a RuntimeError with the C++ exception it caught."""
    if result == CPP_EXCEPTION:
        raise RuntimeError(f"{what}: {lib.dali_cpu_last_error().decode(errors='replace')}")
    return result


def _set_num_threads(lib: ctypes.CDLL, n) -> None:
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"set_num_threads: need an integer thread count, got {n!r}") from None
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"set_num_threads: need 1 <= n <= {MAX_THREADS} (MAX_THREADS), got {n}")
    if _checked(lib, lib.dali_cpu_set_num_threads(n), f"set_num_threads({n}): could not start the threads") != 0:
        raise ValueError(f"set_num_threads: the library rejected {n}")


def _configure(lib: ctypes.CDLL) -> None:
    threads = os.environ.get("DALI_CPU_THREADS")
    try:
        _set_num_threads(lib, int(threads) if threads else min(physical_cores(), MAX_THREADS))
    except (ValueError, RuntimeError) as error:
        warnings.warn(f"DALI_CPU_THREADS={threads!r} cannot be used ({error}); the pool keeps "
                      f"{lib.dali_cpu_get_num_threads()} threads", RuntimeWarning, stacklevel=3)
    isa = os.environ.get("DALI_CPU_ISA")
    if isa and lib.dali_cpu_set_isa(isa.encode()) != 0:
        warnings.warn(
            f"DALI_CPU_ISA={isa!r} cannot run here (choose from {', '.join(ISA_NAMES)}, or 'auto'; this CPU's best is "
            f"{lib.dali_cpu_best_isa().decode()}); using the best path",
            RuntimeWarning,
            stacklevel=3,
        )
    bf16_gemm = os.environ.get("DALI_CPU_BF16_GEMM")
    if bf16_gemm == "0":
        lib.dali_cpu_set_bf16_gemm_min_tokens(0)
        lib.dali_cpu_set_linear_bf16_gemm_min_rows(0)
        lib.dali_cpu_set_quantized_bf16_gemm_min_rows(0)
    elif bf16_gemm not in (None, "", "auto"):
        warnings.warn(f"DALI_CPU_BF16_GEMM={bf16_gemm!r} is not understood (0 turns the bf16 GEMM paths off, auto "
                      "keeps the default: on with AMX-BF16 only); keeping the default", RuntimeWarning, stacklevel=3)


def _loaded() -> ctypes.CDLL | None:
    global _library, _load_attempted, _fast_calls
    if _load_attempted:
        return _library
    with _lock:
        if _load_attempted:
            return _library
        if os.environ.get("DALI_CPU_EXTENSION", "1") == "0":
            log.info("DALI_CPU_EXTENSION=0: CPU experts run the PyTorch reference")
        else:
            try:
                lib = _build_and_load()
                _configure(lib)
                _fast_calls = _load_fast_calls(_library_path)
                _library = lib
            except Exception as error:  # noqa: BLE001  (any build or load failure means: fall back)
                warnings.warn(
                    f"dali_compile: the C++ CPU expert runtime could not be built or loaded ({type(error).__name__}: "
                    f"{error}); CPU experts fall back to the much slower PyTorch reference. A C++17 compiler and "
                    f"ninja are needed; the build cache is {build_cache.cache_dir()}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        # Under the redirect lock: a redirect entered before this point is counted in the library, one entered
        # after it sees the library (pause_resident_layers).
        with _redirect_lock:
            if _library is not None:
                _library.dali_cpu_resident_pause(_redirects_active)
            _load_attempted = True
        return _library


def cpu_extension_available() -> bool:
    """Whether the C++ CPU kernels are registered; builds and loads them on the first call."""
    return _loaded() is not None


def library_path() -> str | None:
    """The loaded shared library (None without the extension)."""
    return _library_path if _loaded() is not None else None


def _require() -> ctypes.CDLL:
    lib = _loaded()
    if lib is None:
        raise RuntimeError("the C++ CPU expert runtime is not available (see the earlier warning)")
    return lib


def get_num_threads() -> int:
    """Threads of the runtime's pool (including the calling thread)."""
    lib = _require()
    return _checked(lib, lib.dali_cpu_get_num_threads(), "get_num_threads")


def set_num_threads(n: int) -> None:
    """Resize the runtime's pool to n threads, 1 <= n <= MAX_THREADS (else ValueError); waits for the running
    parallel region, queued jobs continue with n threads. If the system cannot start them (a thread or memory
    limit), RuntimeError, and the pool keeps its previous size."""
    _set_num_threads(_require(), n)


def cpu_isa() -> str:
    """The kernel path that runs: 'avx512', 'avx2', 'portable', or 'reference' without the extension."""
    lib = _loaded()
    return "reference" if lib is None else lib.dali_cpu_isa().decode()


def best_isa() -> str:
    """The fastest path this CPU supports ('reference' without the extension)."""
    lib = _loaded()
    return "reference" if lib is None else lib.dali_cpu_best_isa().decode()


def supported_isas() -> tuple[str, ...]:
    """The paths this CPU can run, slowest first (empty without the extension)."""
    best = best_isa()
    return () if best == "reference" else ISA_NAMES[: ISA_NAMES.index(best) + 1]


def set_isa(name: str) -> None:
    """Force a kernel path ('portable', 'avx2', 'avx512') or go back to the best one ('auto')."""
    status = _require().dali_cpu_set_isa(name.encode())
    if status == -1:
        raise ValueError(f"unknown ISA path {name!r}; choose from {', '.join(ISA_NAMES)} or 'auto'")
    if status == -2:
        raise RuntimeError(f"this CPU cannot run the {name} path; it supports {', '.join(supported_isas())}")


def get_dense_gemm_min_tokens() -> int:
    """fp32 experts with at least this many tokens run as two ATen GEMMs instead of the streaming kernels."""
    return int(_require().dali_cpu_get_dense_gemm_min_tokens())


def set_dense_gemm_min_tokens(n: int) -> None:
    """Set the crossover to ATen's GEMM for fp32 experts; n <= 0 never uses it."""
    _require().dali_cpu_set_dense_gemm_min_tokens(int(n))


def get_transposed_gemm_max_rows() -> int:
    """Dense GEMMs with at most this many token rows run as weights . x^T plus a transposing copy."""
    return int(_require().dali_cpu_get_transposed_gemm_max_rows())


def set_transposed_gemm_max_rows(n: int) -> None:
    """Set the largest token count for the transposed dense GEMM form; n <= 0 never uses it."""
    _require().dali_cpu_set_transposed_gemm_max_rows(int(n))


def set_step_threads(kind: str) -> None:
    """Which threads run the synchronous ops (a compiled step's experts and linears): "aten" (default:
    ATen's OpenMP threads, shared with the rest of the step) or "pool" (the runtime's own pool)."""
    if kind not in ("aten", "pool"):
        raise ValueError(f"set_step_threads: choose 'aten' or 'pool', got {kind!r}")
    if _require().dali_cpu_set_step_on_host_threads(1 if kind == "aten" else 0) != 0:
        raise RuntimeError("set_step_threads: the library registered no ATen executor")


def get_step_threads() -> str:
    """'aten' or 'pool': see set_step_threads."""
    return "aten" if _require().dali_cpu_get_step_on_host_threads() else "pool"


def get_linear_gemm_min_rows() -> int:
    """`dali::cpu_linear` calls with at least this many rows run ATen's fp32 GEMM instead of the streaming kernel."""
    return int(_require().dali_cpu_get_linear_gemm_min_rows())


def set_linear_gemm_min_rows(n: int) -> None:
    """Set the row count from which `dali::cpu_linear` uses ATen's fp32 GEMM; n <= 0 never uses it."""
    _require().dali_cpu_set_linear_gemm_min_rows(int(n))


def has_amx_bf16() -> bool:
    """Whether this CPU has AMX-BF16 enabled by the OS: the bf16 GEMM paths below are on by default only there."""
    return bool(_require().dali_cpu_has_amx_bf16())


def get_bf16_gemm_min_tokens() -> int:
    """bf16 experts with at least this many tokens run ATen's bf16 GEMM on their stored weights; <= 0: never."""
    return int(_require().dali_cpu_get_bf16_gemm_min_tokens())


def set_bf16_gemm_min_tokens(n: int) -> None:
    """Set the tokens per bf16 expert from which ATen's bf16 GEMM is used; n <= 0 never uses it."""
    _require().dali_cpu_set_bf16_gemm_min_tokens(int(n))


def get_linear_bf16_gemm_min_rows() -> int:
    """`dali::cpu_linear` calls on bf16 weights with at least this many rows run ATen's bf16 GEMM; <= 0: never."""
    return int(_require().dali_cpu_get_linear_bf16_gemm_min_rows())


def set_linear_bf16_gemm_min_rows(n: int) -> None:
    """Set the rows from which `dali::cpu_linear` on bf16 weights uses ATen's bf16 GEMM; n <= 0 never uses it."""
    _require().dali_cpu_set_linear_bf16_gemm_min_rows(int(n))


def get_quantized_bf16_gemm_min_rows() -> int:
    """int8 weights with bf16 activations (experts with at least this many tokens, `dali::quantized_linear` calls
    with at least this many rows) run ATen's bf16 GEMM on blocks of dequantized rows; int4 from twice as many;
    <= 0: never."""
    return int(_require().dali_cpu_get_quantized_bf16_gemm_min_rows())


def set_quantized_bf16_gemm_min_rows(n: int) -> None:
    """Set the tokens per expert / rows from which int8 weights (int4: twice as many) with bf16 activations use
    ATen's bf16 GEMM on dequantized blocks; n <= 0 never uses it."""
    _require().dali_cpu_set_quantized_bf16_gemm_min_rows(int(n))


def read_bandwidth_gbps(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Streaming read bandwidth (GB/s) on the threads the synchronous kernels run on (`set_step_threads`): the
    physical limit of a decode step."""
    lib = _require()
    gbps = float(lib.dali_cpu_read_bandwidth_gbps(int(num_bytes), int(repeats)))
    if gbps < 0:
        raise RuntimeError(f"read_bandwidth_gbps({num_bytes}, {repeats}): {lib.dali_cpu_last_error().decode()}")
    return gbps


def read_tensors(*tensors) -> int:
    """Reads every byte of the given CPU tensors once on the kernels' threads (`set_step_threads`; as the bandwidth
    probe does) and returns a checksum of their 8-byte words: the physical limit for reading exactly
    those bytes, to time beside a kernel that reads them. To time it, prepare the call with tensor_reader."""
    return tensor_reader(*tensors)()


def tensor_reader(*tensors) -> Callable[[], int]:
    """read_tensors(*tensors) prepared: the tensors checked and their addresses packed once, so a timed call is the
    C call alone. Checking and packing in Python cost about 50 us a call when the caches are cold, as they are after
    the weights a benchmark reads (a 1 KiB read took 84 us against 35 us for a 64-weight dali::cpu_linear),
    which understated the limit of a few-MB call. The reader holds the tensors."""
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"read_tensors: needs contiguous CPU tensors, got {t.device} {tuple(t.stride())}")
    pointers = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_int64 * len(tensors))(*[t.numel() * t.element_size() for t in tensors])
    lib, checksum, count = _require(), ctypes.c_uint64(0), len(tensors)
    read, checksum_ref = lib.dali_cpu_read_buffers, ctypes.byref(checksum)

    def reader(held=tensors) -> int:
        result = read(pointers, sizes, count, checksum_ref)
        if result != 0:
            _checked(lib, result, "read_tensors")
        return checksum.value

    return reader


def fast_function(name: str):
    """The offload step's C entry point `name` (`dali_step_routing`, ...) as the library's CPython module has it
    (binding/fast_calls.cpp: the same arguments, without ctypes' per-argument conversions), else through ctypes;
    None without the extension. Both take the same ints (addresses as ints, None for a null pointer)."""
    lib = _loaded()
    if lib is None:
        return None
    return getattr(_fast_calls, name, None) or getattr(lib, name)


def python_only_function(name: str):
    """A call of the library's CPython module that has no ctypes twin (it reads Python objects: numpy arrays
    through the buffer protocol), or None where the module is absent."""
    _loaded()
    return getattr(_fast_calls, name, None)


def _load_fast_calls(path: str):
    """The library as a CPython module (it defines PyInit_<LIBRARY_NAME> where Python's headers were found), or
    None: then every call goes through ctypes."""
    import importlib.machinery
    import importlib.util

    try:
        loader = importlib.machinery.ExtensionFileLoader(LIBRARY_NAME, path)
        spec = importlib.util.spec_from_file_location(LIBRARY_NAME, path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except ImportError:  # built without Python's headers: no PyInit
        return None


def greedy_plan_function():
    """The C greedy planner (`csrc/core/planner.cpp`), or None without the extension."""
    return fast_function("dali_greedy_plan")


def prefetch_choice_function():
    """The C prefetch choice (`csrc/core/planner.cpp`), or None without the extension."""
    return fast_function("dali_prefetch_choice")


def predict_prefetch_function():
    """The C routing and prefetch choice (`csrc/core/prefetch.cpp`), or None without the extension."""
    return fast_function("dali_predict_prefetch")


def workload_window_functions():
    """The C workload-aware window update and the C greedy-plus-window decision (`csrc/core/planner.cpp`), or
    (None, None) without the extension."""
    return fast_function("dali_workload_update"), fast_function("dali_decide_workload")


def step_routing_function():
    """The C counting of a layer step's active experts (`csrc/core/planner.cpp`), or None without the extension."""
    return fast_function("dali_step_routing")


def last_region_threads() -> int:
    """Threads that ran tasks in the latest parallel region of the step's executor (a diagnostic that depends
    on the OS scheduler: on a busy host one thread may claim every task first; 0 without the extension)."""
    lib = _loaded()
    return 0 if lib is None else _checked(lib, lib.dali_cpu_last_region_threads(), "last_region_threads")


def last_region_width() -> int:
    """Threads the latest parallel region was split across: the pool's size or, on ATen's threads, the OpenMP
    team that joined it, capped by the region's task count (deterministic; 0 without the extension)."""
    lib = _loaded()
    return 0 if lib is None else _checked(lib, lib.dali_cpu_last_region_width(), "last_region_width")


def outstanding_jobs() -> int:
    """Async jobs submitted and not yet waited on (0 without the extension)."""
    lib = _loaded()
    return 0 if lib is None else _checked(lib, lib.dali_cpu_outstanding_jobs(), "outstanding_jobs")


# ---------------------------------------------------------------------------------------------------
# Resident layers: dali::moe_hybrid served in C++ (csrc/binding/resident_layers.cpp). None of these
# loads the library: before it is loaded, nothing was published and there is nothing to forget.


def _if_loaded() -> ctypes.CDLL | None:
    return _library if _load_attempted else None


def publish_resident_layer(handle: int, spec) -> None:
    """Let the C++ kernel serve `dali::moe_hybrid(..., layer=handle)` from `spec`'s tensors (held weakly) until
    `forget_resident_layers`. The caller (the op's Python kernel, under the registry's lock) has checked that
    the layer is resident: registered, no runtime attached, no redirect on this thread."""
    lib = _if_loaded()
    if lib is None:
        return
    layout, act = spec.layout, spec.layout.activation

    def impl(t) -> int:
        return 0 if t is None else t._cdata  # the TensorImpl; C++ keeps a weak reference to it

    status = lib.dali_cpu_resident_publish(
        handle, *(impl(t) for t in spec.tensors()), str(spec.dtype).removeprefix("torch.").encode(),
        int(layout.gated), int(layout.interleaved), int(layout.transposed), act.name.encode(),
        float(act.alpha or 0.0), float(act.limit or 0.0))
    _checked(lib, status, "publish_resident_layer")


def forget_resident_layers() -> None:
    """Every later call goes through the layer registry again (until the Python kernel publishes anew)."""
    lib = _if_loaded()
    if lib is not None:
        lib.dali_cpu_resident_forget()


def pause_resident_layers(delta: int) -> None:
    """+1 when a thread enters a registry redirect, -1 when it leaves: while any thread is inside one, no thread
    uses published layers (a redirect is per thread, the C++ switch is per process: redirects are rare, so
    the rest only waits for the Python kernel meanwhile). Kept here too, so a library loaded during a redirect
    starts paused."""
    global _redirects_active
    with _redirect_lock:
        _redirects_active += delta
        lib = _if_loaded()
        if lib is not None:
            lib.dali_cpu_resident_pause(_redirects_active)


def resident_layer_count() -> int:
    """Layers the C++ kernel serves now (0 without the library)."""
    lib = _if_loaded()
    return 0 if lib is None else int(lib.dali_cpu_resident_count())
