// The AVX2 + FMA + F16C path. Every function below the target pragma may only run on a CPU with
// those extensions; runtime.cpp hands this table out only after checking that.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "dtypes.h"
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "int4_tiling.h"  // its template runs inside this target

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
  // to_bf16 per lane: the rounding in integers, NaN lanes to 0x7FC0, the 16-bit halves packed (packus keeps
  // them: at most 0xFFFF) and their two 64-bit halves brought together.
  static void store_bf16(BF16* p, vec a) {
    const __m256i u = _mm256_castps_si256(a);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
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
float avx2_exp_shifted(float* x, int64_t n, float shift) { return exp_shifted_generic<Avx2>(x, n, shift); }

void avx2_dot_rows_quantized(int bits, const QuantizedRows& w, int64_t rows, int64_t len, const float* x,
                             int64_t ldx, int64_t n, float* out, int64_t ldo) {
  dot_rows_quantized_generic<Avx2>(bits, w, rows, len, x, ldx, n, out, ldo);
}

void avx2_dequantize_rows(int bits, const QuantizedRows& w, int64_t rows, int64_t len, float* dst, int64_t ldd) {
  dequantize_rows_generic<Avx2>(bits, w, rows, len, dst, ldd);
}

void avx2_dequantize_rows_bf16(int bits, const QuantizedRows& w, int64_t rows, int64_t len, BF16* dst, int64_t ldd) {
  dequantize_rows_generic<Avx2>(bits, w, rows, len, dst, ldd);
}

void avx2_round_to_bf16(const float* src, int64_t n, BF16* dst) { round_to_bf16_generic<Avx2>(src, n, dst); }

// ---- int4 codes times int8 activations (KernelTable::dot_rows_int4): group sizes and rows that are multiples of
// 32 and 64 columns ----
//
// A 32-byte run of a row's codes holds 64 columns: for G = 32 two whole groups, otherwise part of one. Its low
// nibbles meet the activations' low bytes and its high nibbles their high bytes in one maddubs each (codes 0..15
// unsigned times int8 activations, adjacent pairs summed in 16 bits: at most 2 * 15 * 127, twice that after
// adding the two, far from saturating), then madd with ones sums quads into 8 32-bit lanes: lanes 0-3 cover
// bytes 0-15 (one group), lanes 4-7 bytes 16-31. Those are converted to fp32 and scaled per lane by the weight
// scale times the activation scale; the codes' +8 comes out per group at the end through x.offset.

// sum_g weight_scale[g] * offset[g]: what the +8 of the codes added to a row's dot with one token.
float offset_dot(const F16* scales, const float* offset, int64_t groups) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g)));
    acc = _mm256_fmadd_ps(ws, _mm256_loadu_ps(offset + g), acc);
  }
  float total = Avx2::hsum(acc);
  for (; g < groups; ++g) total += to_float(scales[g]) * offset[g];
  return total;
}

// The scales of a 32-byte run of codes starting in group g, one per 128-bit half of the lanes: for G = 32 the
// run's two groups (adjacent values, converted and spread together), else its one group everywhere.
template <bool kTwoGroups>
inline __m256 weight_lane_scales(const F16* s, int64_t g) {
  if constexpr (kTwoGroups) {
    int32_t pair;
    std::memcpy(&pair, s + g, sizeof(pair));
    const __m128 both = _mm_cvtph_ps(_mm_cvtsi32_si128(pair));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(both), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  } else {
    return _mm256_set1_ps(_cvtsh_ss(s[g].bits));
  }
}

template <bool kTwoGroups>
inline __m256 activation_lane_scales(const float* s, int64_t g) {
  if constexpr (kTwoGroups) {
    const __m128 both = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + g)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(both), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  } else {
    return _mm256_broadcast_ss(s + g);
  }
}

template <int R, int N, bool kTwoGroups>
void int4_tile(const uint8_t* q, int64_t ldq, const F16* ws, int64_t lds, const Int8Activations& x, int64_t t0,
               float* out, int64_t ldo, int64_t orow) {
  const int64_t half_len = x.len / 2, group_bytes = x.group / 2, groups = x.len / x.group;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm256_setzero_ps();
  for (int64_t b = 0; b < half_len; b += 32) {
    const int64_t g = b / group_bytes;
    __m256 sx[N];
    for (int n = 0; n < N; ++n) sx[n] = activation_lane_scales<kTwoGroups>(x.scale + (t0 + n) * groups, g);
    for (int r = 0; r < R; ++r) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * ldq + b));
      const __m256i low = _mm256_and_si256(codes, nibble);
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(codes, 4), nibble);
      const __m256 sw = weight_lane_scales<kTwoGroups>(ws + r * lds, g);
      for (int n = 0; n < N; ++n) {
        const int8_t* xq = x.q + (t0 + n) * x.len + b;
        const __m256i pairs = _mm256_add_epi16(
            _mm256_maddubs_epi16(low, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
            _mm256_maddubs_epi16(high, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + half_len))));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc[r][n] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sw, sx[n]), acc[r][n]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < N; ++n) {
      const float correction = offset_dot(ws + r * lds, x.offset + (t0 + n) * groups, groups);
      out[n * ldo + r * orow] = Avx2::hsum(acc[r][n]) - correction;
    }
  }
}

template <int R>
void int4_tile_n(int n, const uint8_t* q, int64_t ldq, const F16* ws, int64_t lds, const Int8Activations& x,
                 int64_t t0, float* out, int64_t ldo, int64_t orow) {
  const bool two_groups = x.group == 32;
  if (n == 1) {
    two_groups ? int4_tile<R, 1, true>(q, ldq, ws, lds, x, t0, out, ldo, orow)
               : int4_tile<R, 1, false>(q, ldq, ws, lds, x, t0, out, ldo, orow);
  } else {
    two_groups ? int4_tile<R, 2, true>(q, ldq, ws, lds, x, t0, out, ldo, orow)
               : int4_tile<R, 2, false>(q, ldq, ws, lds, x, t0, out, ldo, orow);
  }
}

// Widths in whole 32-byte runs of codes (int4_tiling.h's tiles); others go to the scalar kernel.
void avx2_dot_rows_int4(const QuantizedRows& w, int64_t rows, const Int8Activations& x, int64_t first, int64_t n,
                        float* out, int64_t ldo) {
  // Whole 32-byte runs of codes only (real models' widths), each within one group or holding two whole ones: a
  // group of 96 columns (48 bytes) would end inside a run, whose lanes all take one group's scale.
  if ((x.group != 32 && x.group % 64 != 0) || x.len % 64 != 0) {
    dot_rows_int4_scalar(w, rows, x, first, n, out, ldo);
    return;
  }
  int4_row_tiles(w, rows, first, n, out, ldo, [&](auto tile_rows, int tn, const uint8_t* q, int64_t ldq, const F16* ws,
                                                  int64_t lds, int64_t t0, float* o, int64_t orow) {
    int4_tile_n<decltype(tile_rows)::value>(tn, q, ldq, ws, lds, x, t0, o, ldo, orow);
  });
}

}  // namespace

DotRowsByInt8 dot_rows_int4_avx2() { return avx2_dot_rows_int4; }

}  // namespace dali_cpu

#pragma GCC pop_options

namespace dali_cpu {

// Compiled for the baseline target: callers may ask for the table before checking the CPU.
const KernelTable* avx2_kernels() {
  static const KernelTable table{Isa::kAvx2,          avx2_dot_rows,        avx2_axpy_rows,
                                 avx2_convert,        avx2_silu_mul,        avx2_exp_shifted,
                                 avx2_dot_rows_quantized,
                                 avx2_dequantize_rows, dot_rows_int4_avx2(),
                                 round_to_int8,       avx2_round_to_bf16,
                                 avx2_dequantize_rows_bf16};
  return &table;
}

}  // namespace dali_cpu

#else  // not x86-64: no AVX2 path in this build

namespace dali_cpu {
const KernelTable* avx2_kernels() { return nullptr; }
DotRowsByInt8 dot_rows_int4_avx2() { return nullptr; }
}  // namespace dali_cpu

#endif
