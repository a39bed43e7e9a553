// KernelTable::dot_rows_int4 with AVX-512 VNNI (vpdpbusd), for the AVX-512 table on CPUs that have it.
// Only called after cpu_has_avx512_vnni() said yes (kernels_avx512.cpp picks it).
//
// A 64-byte run of a row's codes holds 128 columns. Its low nibbles meet the activations' low bytes and its high
// nibbles their high bytes (Int8Activations' byte order) in one vpdpbusd each: codes 0..15 unsigned times int8
// activations, four adjacent products summed into each of 16 int32 lanes (exact: at most 8 * 15 * 127 per lane
// and run). Lane i covers code bytes 4i..4i+3, so a group of G columns (G / 2 code bytes) spans G / 8 lanes: the
// lanes are converted to fp32 and scaled per lane by their group's weight scale times activation scale, and
// the codes' +8 comes out per group at the end through x.offset, as in the AVX2 kernel (maddubs + madd, 32
// columns per instruction pair against 64 here).
#include <cstdint>

#include "dtypes.h"
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // as kernels_avx512.cpp: GCC 12's "undefined" operands
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")

#include "int4_tiling.h"

namespace dali_cpu {
namespace {

// sum_g weight_scale[g] * offset[g]: what the +8 of the codes added to a row's dot with one token.
float offset_dot(const F16* scales, const float* offset, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16) {
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g)));
    acc = _mm512_fmadd_ps(ws, _mm512_loadu_ps(offset + g), acc);
  }
  float total = _mm512_reduce_add_ps(acc);
  for (; g < groups; ++g) total += to_float(scales[g]) * offset[g];
  return total;
}

// R rows x N tokens. `lane_group` maps each int32 lane of a run to its group among the run's first `run_groups`
// (G >= 128: one group covers the whole run).
template <int R, int N>
void int4_tile(const uint8_t* q, int64_t ldq, const F16* ws, int64_t lds, const Int8Activations& x, int64_t t0,
               float* out, int64_t ldo, int64_t orow) {
  const int64_t half_len = x.len / 2, group_bytes = x.group / 2, groups = x.len / x.group;
  const int lanes_per_group = group_bytes >= 64 ? 16 : static_cast<int>(group_bytes / 4);
  const __mmask8 run_groups = static_cast<__mmask8>((1u << (16 / lanes_per_group)) - 1u);
  alignas(64) int32_t lane_group_index[16];
  for (int i = 0; i < 16; ++i) lane_group_index[i] = i / lanes_per_group;
  const __m512i lane_group = _mm512_load_si512(lane_group_index);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t b = 0; b < half_len; b += 64) {
    const int64_t g = b / group_bytes;
    __m512 sx[N];
    for (int n = 0; n < N; ++n) {
      const __m128 s = _mm_maskz_loadu_ps(run_groups, x.scale + (t0 + n) * groups + g);
      sx[n] = _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(s));
    }
    for (int r = 0; r < R; ++r) {
      const __m512i codes = _mm512_loadu_si512(q + r * ldq + b);
      const __m512i low = _mm512_and_si512(codes, nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
      const __m128i halves = _mm_maskz_loadu_epi16(run_groups, ws + r * lds + g);
      const __m512 sw = _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(_mm_cvtph_ps(halves)));
      for (int n = 0; n < N; ++n) {
        const int8_t* xq = x.q + (t0 + n) * x.len + b;
        __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(xq));
        sums = _mm512_dpbusd_epi32(sums, high, _mm512_loadu_si512(xq + half_len));
        acc[r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(sw, sx[n]), acc[r][n]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < N; ++n) {
      const float correction = offset_dot(ws + r * lds, x.offset + (t0 + n) * groups, groups);
      out[n * ldo + r * orow] = _mm512_reduce_add_ps(acc[r][n]) - correction;
    }
  }
}

template <int R>
void int4_tile_n(int n, const uint8_t* q, int64_t ldq, const F16* ws, int64_t lds, const Int8Activations& x,
                 int64_t t0, float* out, int64_t ldo, int64_t orow) {
  if (n == 1) {
    int4_tile<R, 1>(q, ldq, ws, lds, x, t0, out, ldo, orow);
  } else {
    int4_tile<R, 2>(q, ldq, ws, lds, x, t0, out, ldo, orow);
  }
}

// Widths in whole 64-byte runs of codes (int4_tiling.h's tiles); others go to `g_fallback` (the AVX2 kernel).
DotRowsInt4 g_fallback = nullptr;

void avx512_vnni_dot_rows_int4(const QuantizedRows& w, int64_t rows, const Int8Activations& x, int64_t first,
                               int64_t n, float* out, int64_t ldo) {
  if (x.group % 32 != 0 || x.len % 128 != 0) {
    g_fallback(w, rows, x, first, n, out, ldo);
    return;
  }
  int4_row_tiles(w, rows, first, n, out, ldo, [&](auto tile_rows, int tn, const uint8_t* q, int64_t ldq, const F16* ws,
                                                  int64_t lds, int64_t t0, float* o, int64_t orow) {
    int4_tile_n<decltype(tile_rows)::value>(tn, q, ldq, ws, lds, x, t0, o, ldo, orow);
  });
}

}  // namespace

DotRowsInt4 dot_rows_int4_avx512_vnni(DotRowsInt4 fallback) {
  g_fallback = fallback;
  return avx512_vnni_dot_rows_int4;
}

}  // namespace dali_cpu

#pragma GCC pop_options

#else  // not x86-64

namespace dali_cpu {
DotRowsInt4 dot_rows_int4_avx512_vnni(DotRowsInt4 fallback) { return fallback; }
}  // namespace dali_cpu

#endif
