#include "runtime.h"

#include "stream_blocks.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace dali_cpu {

namespace {

const KernelTable* table_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return avx512_kernels();
    case Isa::kAvx2:
      return avx2_kernels();
    default:
      return &portable_kernels();
  }
}

std::atomic<const KernelTable*>& active_table() {
  static std::atomic<const KernelTable*> table{table_for(best_isa())};
  return table;
}

// fp32 experts with this many tokens use ATen's GEMM. Measured on the 2-core AVX2 development machine
// (benchmarks/bench_cpu_experts.py): the streaming kernels win up to 64 tokens per expert everywhere
// and up to 256 for Mixtral's large experts; MKL wins at 256 for the smaller experts when the machine
// is idle (under load its OpenMP threads collapse, ours do not). Set with set_dense_gemm_min_tokens.
constexpr int64_t kDefaultDenseGemmMinTokens = 256;
std::atomic<int64_t> g_dense_gemm_min_tokens{kDefaultDenseGemmMinTokens};

// Dense GEMMs with at most this many rows (tokens) are run as c^T = w . x^T plus one transposing
// copy (see aten_gemm in the binding). MKL on the development machine (Zen 3, AVX2, 2 cores), the
// copy included: +3 to +14% GFLOP/s at 256 rows for the four benchmark models' up and down
// projections, about even at 512, -7 to -11% at 1024.
constexpr int64_t kDefaultTransposedGemmMaxRows = 512;
std::atomic<int64_t> g_transposed_gemm_max_rows{kDefaultTransposedGemmMaxRows};

// dali::cpu_linear: rows from which ATen's fp32 GEMM is used instead of the streaming kernel. Measured
// on the 2-core AVX2 machine (benchmarks/bench_cpu_linear.py, 2048x2048 and 2048x4096): the streaming
// kernel wins or ties up to 512 rows in bf16 (37 vs 47 ms at 512: the GEMM path also widens the
// weight) and fp32 (within 2-5% of MKL at 256-512); at 1024 the two are within +-10% either way.
// Set with set_linear_gemm_min_rows.
constexpr int64_t kDefaultLinearGemmMinRows = 1024;
std::atomic<int64_t> g_linear_gemm_min_rows{kDefaultLinearGemmMinRows};

// bf16 weights multiplied by ATen's bf16 GEMM as stored (no widening), on CPUs with AMX-BF16 only: there
// oneDNN's bf16 GEMM runs 3-4x faster than its fp32 GEMM (2-core Sapphire Rapids-class Xeon, torch.mm at
// 2048^3: 825 against 230 GFLOP/s); elsewhere it is slower than widening. Crossovers measured on that
// machine, GEMM ms / streaming ms:
//   experts (bench_cpu_experts.py --crossover --dtypes bf16): at 4 tokens per expert 1.2-1.7, at 8 0.49
//     (Mixtral) to 1.45 (Qwen3-30B-A3B), at 16 0.43-0.70;
//   dense linears (bench_cpu_linear.py --dtypes bf16, 2048-4096 features): at 4 rows 1.07-1.84, at 8 0.66-0.95.
// Set with set_bf16_gemm_min_tokens and set_linear_bf16_gemm_min_rows; <= 0 disables the path.
constexpr int64_t kAmxBf16GemmMinTokens = 16;
constexpr int64_t kAmxLinearBf16GemmMinRows = 8;
std::atomic<int64_t> g_bf16_gemm_min_tokens{cpu_has_amx_bf16() ? kAmxBf16GemmMinTokens : 0};
std::atomic<int64_t> g_linear_bf16_gemm_min_rows{cpu_has_amx_bf16() ? kAmxLinearBf16GemmMinRows : 0};
// Quantized weights with bf16 activations take the same bf16 GEMM on blocks of dequantized rows (chunked_gemm.h)
// later: their streaming kernels read 2x (int8) or 4x (int4) fewer bytes, and the dequantizing and rounding cost
// about as much as the GEMM. Measured on the same machine, GEMM ms / streaming ms:
//   experts (bench_cpu_experts.py --crossover --dtypes int8 int4, OLMoE and Qwen3-30B-A3B shapes): int8 at 16
//     tokens per expert 1.63-1.72, at 32 0.91-1.12, at 48 0.84-0.86; int4 at 32 1.20-1.46, at 64 1.01-1.05;
//   dense linears (2048 x 2048): int8 at 16 rows 1.35, at 32 1.01, at 64 0.77; int4 at 32 1.19, at 64 0.97.
// One setting for both: int8 from n tokens or rows on, int4 from 2n (set_quantized_bf16_gemm_min_rows).
constexpr int64_t kAmxQuantizedBf16GemmMinRows = 32;
std::atomic<int64_t> g_quantized_bf16_gemm_min_rows{cpu_has_amx_bf16() ? kAmxQuantizedBf16GemmMinRows : 0};

// The read side of the bandwidth probe sums 64-bit words the way the kernels read weights: a task's block of
// kStreamBlockBytes (stream_blocks.h) as four interleaved streams over its quarters, a cache line of each in
// turn. Fewer or shorter streams read measurably slower when the data is cold (the earlier four streams over
// consecutive 8 KiB segments: a 2 MiB tensor at 11.6 GB/s where dali::cpu_linear read the same bytes at 16.3),
// which would understate the limit.
constexpr int64_t kProbeTaskWords = kStreamBlockBytes / 8;
constexpr int64_t kLineWords = 8;

uint64_t sum_words_portable(const uint64_t* p, int64_t count) {
  const int64_t quarter = count / 4 / kLineWords * kLineWords;
  uint64_t a = 0, b = 0, c = 0, d = 0;
  for (int64_t i = 0; i < quarter; ++i) {
    a += p[i];
    b += p[quarter + i];
    c += p[2 * quarter + i];
    d += p[3 * quarter + i];
  }
  for (int64_t i = 4 * quarter; i < count; ++i) a += p[i];
  return a + b + c + d;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) uint64_t sum_words_avx2(const uint64_t* p, int64_t count) {
  const int64_t quarter = count / 4 / kLineWords * kLineWords;
  __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int64_t k = 0; k < quarter; k += kLineWords) {  // one cache line of each quarter
    for (int s = 0; s < 4; ++s) {
      const uint64_t* q = p + s * quarter + k;
      acc[s] = _mm256_add_epi64(acc[s], _mm256_add_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)),
                                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 4))));
    }
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3])));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + sum_words_portable(p + 4 * quarter, count - 4 * quarter);
}
#endif

uint64_t sum_words(const uint64_t* p, int64_t count) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = isa_supported(Isa::kAvx2);
  if (avx2) return sum_words_avx2(p, count);
#endif
  return sum_words_portable(p, count);
}

}  // namespace

// The pool and the queue are never destroyed: their threads must not be joined from static
// destructors at interpreter exit (they may be parked in a region), and the OS reclaims them. They
// are created on first use, and again in a forked child (see forget_threads_after_fork).
namespace {
std::atomic<ThreadPool*> g_pool{nullptr};
std::atomic<int> g_pool_threads{0};  // the size a (re)created pool gets; 0: hardware concurrency
std::atomic<JobQueue*> g_jobs{nullptr};
std::atomic<int64_t> g_first_handle{1};  // handles below this were issued before a fork

// Creates the object on first use; a thread that loses the race deletes its own.
template <class T, class Make>
T& lazily(std::atomic<T*>& slot, Make make) {
  T* current = slot.load(std::memory_order_acquire);
  if (current != nullptr) return *current;
  T* fresh = make();
  if (slot.compare_exchange_strong(current, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;
  return *current;
}
}  // namespace

ThreadPool& global_pool() {
  return lazily(g_pool, [] {
    const int size = g_pool_threads.load();
    return new ThreadPool(size > 0 ? size : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  });
}

namespace {
std::atomic<Parallel*>& step_parallel_slot() {
  static std::atomic<Parallel*> slot{nullptr};
  return slot;
}
}  // namespace

Parallel& step_parallel() {
  Parallel* parallel = step_parallel_slot().load(std::memory_order_acquire);
  return parallel != nullptr ? *parallel : global_pool();
}

void set_step_parallel(Parallel* parallel) { step_parallel_slot().store(parallel, std::memory_order_release); }

namespace {
std::atomic<Parallel*> g_host_parallel{nullptr};
}  // namespace

void register_host_parallel(Parallel* parallel) {
  g_host_parallel.store(parallel);
  set_step_parallel(parallel);
}

JobQueue& global_jobs() {
  return lazily(g_jobs, [] { return new JobQueue(g_first_handle.load()); });
}

namespace {

// pthread_atfork child handler: runs in the child, which has only the forking thread. Only atomic
// stores here (no allocation, no locks): the old pool and queue are leaked, since joining their
// threads or taking their mutexes would wait forever.
void forget_threads_after_fork() {
  g_pool.store(nullptr);
  JobQueue* jobs = g_jobs.exchange(nullptr);
  if (jobs != nullptr) g_first_handle.store(jobs->next_handle_in_fork_child());
  // ATen's OpenMP team did not come along either: synchronous calls run on the (fresh) pool.
  set_step_parallel(nullptr);
}

// Registered when the library is loaded (a static initializer), before any thread of ours exists.
const int g_fork_handler_registered = pthread_atfork(nullptr, nullptr, &forget_threads_after_fork);

thread_local char g_last_error[512] = "";

}  // namespace

void set_last_error(const char* message) noexcept {
  std::strncpy(g_last_error, message, sizeof(g_last_error) - 1);
  g_last_error[sizeof(g_last_error) - 1] = '\0';
}

namespace {

uint64_t read_buffers(const void* const* buffers, const int64_t* bytes, int count) {
  constexpr int64_t kChunk = kProbeTaskWords;
  struct Piece {
    const uint64_t* words;
    int64_t count;
  };
  std::vector<Piece> pieces;
  for (int b = 0; b < count; ++b) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(buffers[b]);
    const uintptr_t first = (begin + 7) / 8 * 8;
    const int64_t words = std::max<int64_t>(0, (bytes[b] - static_cast<int64_t>(first - begin)) / 8);
    for (int64_t w = 0; w < words; w += kChunk) {
      pieces.push_back({reinterpret_cast<const uint64_t*>(first) + w, std::min(kChunk, words - w)});
    }
  }
  std::vector<uint64_t> sums(pieces.size());
  // On the threads the synchronous kernels run on (ATen's by default): a limit read on the runtime's own pool
  // paid for waking its sleeping workers, about 0.4 ms a call on this VM, and understated the limit for the few
  // MB one quantized layer reads.
  step_parallel().parallel_for(static_cast<int64_t>(pieces.size()),
                             [&](int64_t t) { sums[t] = sum_words(pieces[t].words, pieces[t].count); });
  uint64_t total = 0;
  for (uint64_t s : sums) total += s;
  return total;
}

}  // namespace

const KernelTable& active_kernels() { return *active_table().load(std::memory_order_acquire); }

int64_t dense_gemm_min_tokens() { return g_dense_gemm_min_tokens.load(std::memory_order_relaxed); }

int64_t transposed_gemm_max_rows() { return g_transposed_gemm_max_rows.load(std::memory_order_relaxed); }

int64_t linear_gemm_min_rows() { return g_linear_gemm_min_rows.load(std::memory_order_relaxed); }

int64_t bf16_gemm_min_tokens() { return g_bf16_gemm_min_tokens.load(std::memory_order_relaxed); }

int64_t linear_bf16_gemm_min_rows() { return g_linear_bf16_gemm_min_rows.load(std::memory_order_relaxed); }

int64_t quantized_bf16_gemm_min_rows(int bits) {
  const int64_t n = g_quantized_bf16_gemm_min_rows.load(std::memory_order_relaxed);
  return n > 0 && bits == 4 ? 2 * n : n;
}

}  // namespace dali_cpu

extern "C" {

const char* dali_cpu_last_error() { return dali_cpu::g_last_error; }

int dali_cpu_get_num_threads() {
  return dali_cpu::call_guarded(dali_cpu::kCppException, [] { return dali_cpu::global_pool().num_threads(); });
}

int dali_cpu_set_num_threads(int n) {
  if (n < 1 || n > dali_cpu::kMaxThreads) return -1;
  return dali_cpu::call_guarded(dali_cpu::kCppException, [n] {
    dali_cpu::g_pool_threads.store(n);  // a pool created by the line below starts at this size
    dali_cpu::ThreadPool& pool = dali_cpu::global_pool();
    try {
      if (pool.num_threads() != n) pool.resize(n);
    } catch (...) {
      dali_cpu::g_pool_threads.store(pool.num_threads());  // what the failed resize left
      throw;
    }
    return 0;
  });
}

const char* dali_cpu_isa() { return dali_cpu::isa_name(dali_cpu::active_kernels().isa); }

const char* dali_cpu_best_isa() { return dali_cpu::isa_name(dali_cpu::best_isa()); }

int dali_cpu_set_isa(const char* name) {
  if (name == nullptr) return -1;
  dali_cpu::Isa isa;
  if (std::strcmp(name, "auto") == 0) {
    isa = dali_cpu::best_isa();
  } else if (!dali_cpu::parse_isa(name, &isa)) {
    return -1;
  }
  const dali_cpu::KernelTable* table = dali_cpu::table_for(isa);
  if (!dali_cpu::isa_supported(isa) || table == nullptr) return -2;
  dali_cpu::active_table().store(table, std::memory_order_release);
  return 0;
}

int dali_cpu_set_step_on_host_threads(int on_host) {
  dali_cpu::Parallel* host = dali_cpu::g_host_parallel.load();
  if (host == nullptr) return -1;
  dali_cpu::set_step_parallel(on_host ? host : nullptr);
  return 0;
}

int dali_cpu_get_step_on_host_threads() {
  dali_cpu::Parallel* host = dali_cpu::g_host_parallel.load();
  return host != nullptr && &dali_cpu::step_parallel() == host ? 1 : 0;
}

int64_t dali_cpu_outstanding_jobs() {
  return dali_cpu::call_guarded<int64_t>(dali_cpu::kCppException, [] { return dali_cpu::global_jobs().outstanding(); });
}

int dali_cpu_last_region_threads() {
  return dali_cpu::call_guarded(dali_cpu::kCppException,
                                [] { return dali_cpu::step_parallel().last_region_threads(); });
}

int dali_cpu_last_region_width() {
  return dali_cpu::call_guarded(dali_cpu::kCppException, [] { return dali_cpu::step_parallel().last_region_width(); });
}

int64_t dali_cpu_get_dense_gemm_min_tokens() { return dali_cpu::dense_gemm_min_tokens(); }

void dali_cpu_set_dense_gemm_min_tokens(int64_t n) { dali_cpu::g_dense_gemm_min_tokens.store(n); }

int64_t dali_cpu_get_transposed_gemm_max_rows() { return dali_cpu::transposed_gemm_max_rows(); }

void dali_cpu_set_transposed_gemm_max_rows(int64_t n) { dali_cpu::g_transposed_gemm_max_rows.store(n); }

int64_t dali_cpu_get_linear_gemm_min_rows() { return dali_cpu::linear_gemm_min_rows(); }

void dali_cpu_set_linear_gemm_min_rows(int64_t n) { dali_cpu::g_linear_gemm_min_rows.store(n); }

int64_t dali_cpu_get_bf16_gemm_min_tokens() { return dali_cpu::bf16_gemm_min_tokens(); }

void dali_cpu_set_bf16_gemm_min_tokens(int64_t n) { dali_cpu::g_bf16_gemm_min_tokens.store(n); }

int64_t dali_cpu_get_linear_bf16_gemm_min_rows() { return dali_cpu::linear_bf16_gemm_min_rows(); }

void dali_cpu_set_linear_bf16_gemm_min_rows(int64_t n) { dali_cpu::g_linear_bf16_gemm_min_rows.store(n); }

int64_t dali_cpu_get_quantized_bf16_gemm_min_rows() { return dali_cpu::g_quantized_bf16_gemm_min_rows.load(); }

void dali_cpu_set_quantized_bf16_gemm_min_rows(int64_t n) { dali_cpu::g_quantized_bf16_gemm_min_rows.store(n); }

int dali_cpu_has_amx_bf16() { return dali_cpu::cpu_has_amx_bf16() ? 1 : 0; }

double dali_cpu_read_bandwidth_gbps(int64_t bytes, int repeats) {
  if (bytes < 8 || repeats < 1) {
    dali_cpu::set_last_error("read_bandwidth_gbps: needs bytes >= 8 and repeats >= 1");
    return -1.0;
  }
  return dali_cpu::call_guarded(-1.0, [bytes, repeats] {
    using Clock = std::chrono::steady_clock;
    const int64_t words = bytes / 8;
    std::unique_ptr<uint64_t[]> buffer(new uint64_t[words]);
    // Touch every page first (on the read's threads, in its tasks): page faults are not bandwidth.
    const int64_t tasks = (words + dali_cpu::kProbeTaskWords - 1) / dali_cpu::kProbeTaskWords;
    dali_cpu::step_parallel().parallel_for(tasks, [&](int64_t t) {
      uint64_t* p = buffer.get() + t * dali_cpu::kProbeTaskWords;
      const int64_t n = std::min(dali_cpu::kProbeTaskWords, words - t * dali_cpu::kProbeTaskWords);
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<uint64_t>(i);
    });
    const void* buffers[] = {buffer.get()};
    const int64_t sizes[] = {words * 8};
    double best = 0.0;
    volatile uint64_t sink = 0;  // keeps the sums (and so the reads) alive
    for (int r = 0; r < repeats; ++r) {
      const auto start = Clock::now();
      sink = sink + dali_cpu::read_buffers(buffers, sizes, 1);
      const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
      best = std::max(best, static_cast<double>(words * 8) / seconds / 1e9);
    }
    return best;
  });
}

int dali_cpu_read_buffers(const void* const* buffers, const int64_t* bytes, int count, uint64_t* checksum) {
  return dali_cpu::call_guarded(dali_cpu::kCppException, [=] {
    *checksum = dali_cpu::read_buffers(buffers, bytes, count);
    return 0;
  });
}

}  // extern "C"
