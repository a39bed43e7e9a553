// Process-wide state of the CPU expert runtime: the thread pool, the async job queue and the
// selected ISA path, plus a C interface (threads, ISA) that Python reaches through ctypes, so no
// control function needs to be an op in the dali namespace.
//
// Every C entry point catches C++ exceptions itself: one unwinding into ctypes' C frames aborts the
// process. It returns an error value instead (kCppException for int results) and keeps the message
// for dali_cpu_last_error().
//
// Fork: a child forked after the pool's workers or the job runner started has none of those threads,
// and their mutexes may be held by threads that no longer exist. A pthread_atfork child handler
// drops the pool and the queue (leaked, never joined); the next use in the child builds fresh ones
// of the same size. The child's synchronous calls also move to the pool: ATen's OpenMP team does
// not survive a fork either (its next parallel region hangs).
#pragma once

#include <cstdint>
#include <exception>

#include "job_queue.h"
#include "kernels.h"
#include "thread_pool.h"

namespace dali_cpu {

// The runtime's own pool: async jobs (and the bandwidth probes) run here, beside the caller's thread.
ThreadPool& global_pool();
// Where calls made on the step's own thread (the synchronous ops) run their regions: the host
// framework's threads once the binding has registered them (ATen's, see binding/aten_parallel.cpp),
// else the pool. One set of threads then serves the whole step.
Parallel& step_parallel();
void set_step_parallel(Parallel* parallel);
// Registered by the binding: ATen's threads as an executor.
void register_host_parallel(Parallel* parallel);
JobQueue& global_jobs();
// The kernel table of the active ISA path (see dali_cpu_set_isa).
const KernelTable& active_kernels();
// fp32 experts with at least this many tokens go to the dense GEMM (see DenseGemm); <= 0: never.
int64_t dense_gemm_min_tokens();
// Dense GEMMs with at most this many rows compute the transposed product (see aten_gemm); <= 0: never.
int64_t transposed_gemm_max_rows();
// dali::cpu_linear calls with at least this many rows go to ATen's fp32 GEMM; <= 0: never.
int64_t linear_gemm_min_rows();
// bf16 experts with at least this many tokens, and dali::cpu_linear calls on bf16 weights with at least
// this many rows, go to ATen's bf16 GEMM on the weights as stored; <= 0: never (the default without AMX-BF16).
int64_t bf16_gemm_min_tokens();
int64_t linear_bf16_gemm_min_rows();
// int8 (bits 8) or int4 (bits 4) weights with bf16 activations: experts with at least this many tokens and
// dali::quantized_linear calls with at least this many rows go to ATen's bf16 GEMM on blocks of dequantized
// rows; <= 0: never (the default without AMX-BF16).
int64_t quantized_bf16_gemm_min_rows(int bits);

// The most threads the pool may have: a guard against a typo (10**9), far above any real machine's need.
constexpr int kMaxThreads = 1024;
// Returned by C entry points with an int result when they caught a C++ exception.
constexpr int kCppException = -99;

// Keeps `message` (truncated) as this thread's dali_cpu_last_error().
void set_last_error(const char* message) noexcept;

// Runs the body of a C entry point: an exception becomes `error_value` plus dali_cpu_last_error().
template <class R, class Body>
R call_guarded(R error_value, Body&& body) noexcept {
  try {
    return body();
  } catch (const std::exception& error) {
    set_last_error(error.what());
  } catch (...) {
    set_last_error("unknown C++ exception");
  }
  return error_value;
}

}  // namespace dali_cpu

extern "C" {
// The message of the latest exception a C entry point caught on this thread ("" if none).
const char* dali_cpu_last_error();
// -99 (kCppException) if the pool could not be created.
int dali_cpu_get_num_threads();
// 0 on success, -1 if n is outside [1, kMaxThreads], -99 if the threads could not be started (the
// pool then keeps its previous size, or at worst the caller's thread alone).
int dali_cpu_set_num_threads(int n);
// "portable", "avx2" or "avx512".
const char* dali_cpu_isa();
const char* dali_cpu_best_isa();
// 0 on success, -1 for an unknown name, -2 if this CPU cannot run it. "auto" selects the best.
int dali_cpu_set_isa(const char* name);
// Submitted jobs not yet waited on; -99 on error.
int64_t dali_cpu_outstanding_jobs();
// Which threads run the synchronous ops: 1 = the host framework's (ATen's; the default once
// registered), 0 = the runtime's own pool. Returns -1 if no host executor is registered.
int dali_cpu_set_step_on_host_threads(int on_host);
int dali_cpu_get_step_on_host_threads();
// Threads that ran tasks in the latest region of step_parallel() (diagnostic for tests); -99 on error.
int dali_cpu_last_region_threads();
// Threads the latest region of step_parallel() was split across (deterministic, for tests); -99 on error.
int dali_cpu_last_region_width();
int64_t dali_cpu_get_dense_gemm_min_tokens();
void dali_cpu_set_dense_gemm_min_tokens(int64_t n);
int64_t dali_cpu_get_transposed_gemm_max_rows();
void dali_cpu_set_transposed_gemm_max_rows(int64_t n);
int64_t dali_cpu_get_linear_gemm_min_rows();
void dali_cpu_set_linear_gemm_min_rows(int64_t n);
int64_t dali_cpu_get_bf16_gemm_min_tokens();
void dali_cpu_set_bf16_gemm_min_tokens(int64_t n);
int64_t dali_cpu_get_linear_bf16_gemm_min_rows();
void dali_cpu_set_linear_bf16_gemm_min_rows(int64_t n);
int64_t dali_cpu_get_quantized_bf16_gemm_min_rows();
void dali_cpu_set_quantized_bf16_gemm_min_rows(int64_t n);
// 1 if this CPU has AMX-BF16 enabled by the OS (see cpu_has_amx_bf16), else 0.
int dali_cpu_has_amx_bf16();
// Streaming read bandwidth of this machine in GB/s: every pool thread sums its share of a fresh
// buffer of `bytes` (choose it much larger than the last-level cache); best of `repeats`. -1 on error
// (bytes < 8, repeats < 1, or the buffer could not be allocated).
double dali_cpu_read_bandwidth_gbps(int64_t bytes, int repeats);
// Reads buffers[0..count) (bytes[i] each) once on the pool threads, in the 1 MiB tasks of the probe
// above, and returns a checksum: the physical limit for reading exactly those bytes (say, one
// decode step's expert weights), to time beside the kernels that read them. Whole 8-byte words
// only (a buffer's unaligned head and ragged tail are skipped). The checksum goes to *checksum;
// returns 0, or -99 on error.
int dali_cpu_read_buffers(const void* const* buffers, const int64_t* bytes, int count, uint64_t* checksum);
}
