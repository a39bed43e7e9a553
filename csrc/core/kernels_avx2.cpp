// The AVX2 + FMA + F16C path. Every function below the target pragma may only run on a CPU with
// those extensions; runtime.cpp hands this table out only after checking that.
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "dtypes.h"
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace dali_cpu {
namespace {

struct Avx2 {
  static constexpr int kLanes = 8;
  using vec = __m256;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec load(const BF16* p) {
    // bf16 -> fp32 is a 16-bit left shift of the zero-extended bits.
    __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  static vec load(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static vec load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // 8 packed bytes, each widened to a 32-bit lane by the load itself: the low nibble is a mask away,
  // the high one a shift (nothing above it), so 16 codes cost 7 integer and conversion operations.
  static void load_i4(const uint8_t* p, vec& low, vec& high) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i eight = _mm256_set1_epi32(8);
    low = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(bytes, _mm256_set1_epi32(0x0F)), eight));
    high = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bytes, 4), eight));
  }
  static vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static vec broadcast(const F16* p) { return _mm256_set1_ps(_cvtsh_ss(p->bits)); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  // exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by its Taylor series to r^7
  // (truncation below 1e-8 relative: within an ulp of std::exp). x is clamped to [-87, 88] so 2^n
  // stays a normal float; silu's value at the clamp is already 0 or g to fp32 precision.
  static vec exp(vec x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const vec n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // ln 2 in two parts (the first exact in few bits), so n * ln2_hi is exact and r keeps its precision.
    vec r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    vec p = _mm256_set1_ps(1.0f / 5040.0f);
    for (float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }
  static vec silu(vec g) {
    const vec one = _mm256_set1_ps(1.0f);
    const vec e = exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(g, _mm256_div_ps(one, _mm256_add_ps(one, e)));
  }
  static float hsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static void store(float* p, vec a) { _mm256_storeu_ps(p, a); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};

#include "micro_kernels.h"

void avx2_dot_rows(DType wtype, const void* w, int64_t ldw, int64_t rows, int64_t len, const float* x, int64_t ldx,
                   int64_t n, bool /*x_exact_bf16*/, float* out, int64_t ldo) {
  dot_rows_generic<Avx2>(wtype, w, ldw, rows, len, x, ldx, n, out, ldo);
}

void avx2_axpy_rows(DType wtype, const void* w, int64_t ldw, int64_t rows, int64_t cols, const float* x,
                    int64_t ldx, int64_t n, float* out, int64_t ldo) {
  axpy_rows_generic<Avx2>(wtype, w, ldw, rows, cols, x, ldx, n, out, ldo);
}

void avx2_convert(DType stype, const void* src, int64_t count, float* dst) { convert_generic<Avx2>(stype, src, count, dst); }

void avx2_silu_mul(const float* gate, const float* up, int64_t n, float* out) { silu_mul_generic<Avx2>(gate, up, n, out); }

void avx2_dot_rows_quantized(int bits, const QuantizedRows& w, int64_t rows, int64_t len, const float* x,
                             int64_t ldx, int64_t n, float* out, int64_t ldo) {
  dot_rows_quantized_generic<Avx2>(bits, w, rows, len, x, ldx, n, out, ldo);
}

void avx2_dequantize_rows(int bits, const QuantizedRows& w, int64_t rows, int64_t len, float* dst, int64_t ldd) {
  dequantize_rows_generic<Avx2>(bits, w, rows, len, dst, ldd);
}

}  // namespace
}  // namespace dali_cpu

#pragma GCC pop_options

namespace dali_cpu {

// Compiled for the baseline target: callers may ask for the table before checking the CPU.
const KernelTable* avx2_kernels() {
  static const KernelTable table{Isa::kAvx2,         avx2_dot_rows,      avx2_axpy_rows,      avx2_convert,
                                 avx2_silu_mul,      avx2_dot_rows_quantized, avx2_dequantize_rows};
  return &table;
}

}  // namespace dali_cpu

#else  // not x86-64: no AVX2 path in this build

namespace dali_cpu {
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace dali_cpu

#endif
