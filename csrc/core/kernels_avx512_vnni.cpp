// KernelTable::dot_rows_int4 and dot_rows_int8 with AVX-512 VNNI (vpdpbusd), for the AVX-512 table on CPUs that
// have it.
// Only called after cpu_has_avx512_vnni() said yes (kernels_avx512.cpp picks it).
//
// A 64-byte run of a row's codes holds 128 columns. Its low nibbles meet the activations' low bytes and its high
// nibbles their high bytes (Int8Activations' byte order) in one vpdpbusd each: codes 0..15 unsigned times int8
// activations, four adjacent products summed into each of 16 int32 lanes (exact: at most 8 * 15 * 127 per lane
// and run). Lane i covers code bytes 4i..4i+3, so a group of G columns (G / 2 code bytes) spans G / 8 lanes: the
// lanes are converted to fp32 and scaled per lane by their group's weight scale times activation scale, and
// the codes' +8 comes out per group through x.offset, as in the AVX2 kernel (maddubs + madd, 32
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

// R rows x N tokens. Scales are handled per block of 16 groups: one load of a row's 16 fp16 weight scales, times
// the token's 16 activation scales, serves every run of the block (4 runs at G = 32), and a run starting new
// groups permutes their products out to its lanes. Per row and run that leaves the unpacking (3 ops), 2 vpdpbusd,
// at most one permute, a convert and an fma, and no integer division: with the division and a scale load, convert
// and permute per row and run (the first version) the kernel ran at about the memory's rate even on weights in
// cache, so it read memory well below it.
template <int R, int N>
void int4_tile(const uint8_t* q, int64_t ldq, const F16* ws, int64_t lds, const Int8Activations& x, int64_t t0,
               float* out, int64_t ldo, int64_t orow) {
  const int64_t half_len = x.len / 2, group_bytes = x.group / 2, groups = x.len / x.group;
  // Lane i of a run holds code bytes 4i..4i+3: group (i / lanes_per_group) of the run's first group.
  const int lanes_per_group = group_bytes >= 64 ? 16 : static_cast<int>(group_bytes / 4);
  alignas(64) int32_t lane_group_index[16];
  for (int i = 0; i < 16; ++i) lane_group_index[i] = i / lanes_per_group;
  const __m512i lane_group = _mm512_load_si512(lane_group_index);
  const int groups_per_run = group_bytes >= 64 ? 1 : static_cast<int>(64 / group_bytes);
  const int64_t runs_per_group = group_bytes >= 64 ? group_bytes / 64 : 1;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t g_block = 0; g_block < groups; g_block += 16) {
    const int block_groups = static_cast<int>(groups - g_block < 16 ? groups - g_block : 16);
    const __mmask16 in_block = static_cast<__mmask16>((1u << block_groups) - 1u);
    __m512 scale[R][N];  // weight scale times activation scale, per group of the block
    for (int n = 0; n < N; ++n) {
      const __m512 sx = _mm512_maskz_loadu_ps(in_block, x.scale + (t0 + n) * groups + g_block);
      const __m512 offset = _mm512_maskz_loadu_ps(in_block, x.offset + (t0 + n) * groups + g_block);
      for (int r = 0; r < R; ++r) {
        const __m512 sw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in_block, ws + r * lds + g_block));
        scale[r][n] = _mm512_mul_ps(sw, sx);
        // The codes' +8 comes out here: only the sum of acc's lanes counts, so its 16 groups' terms can sit in
        // any lanes (one fnmadd per block instead of a second pass over the scales per row).
        acc[r][n] = _mm512_fnmadd_ps(sw, offset, acc[r][n]);
      }
    }
    // Runs of the block, without a division per run: each step of `gi` covers groups_per_run groups in
    // runs_per_group runs (one of the two is 1).
    for (int gi = 0; gi < block_groups; gi += groups_per_run) {
      const __m512i run_lanes = _mm512_add_epi32(lane_group, _mm512_set1_epi32(gi));
      __m512 lane_scale[R][N];
      for (int r = 0; r < R; ++r)
        for (int n = 0; n < N; ++n) lane_scale[r][n] = _mm512_permutexvar_ps(run_lanes, scale[r][n]);
      for (int64_t b = (g_block + gi) * group_bytes, b_end = b + runs_per_group * 64; b < b_end; b += 64) {
        __m512i xlow[N], xhigh[N];
        for (int n = 0; n < N; ++n) {
          const int8_t* xq = x.q + (t0 + n) * x.len + b;
          xlow[n] = _mm512_loadu_si512(xq);
          xhigh[n] = _mm512_loadu_si512(xq + half_len);
        }
        for (int r = 0; r < R; ++r) {
          const __m512i codes = _mm512_loadu_si512(q + r * ldq + b);
          const __m512i low = _mm512_and_si512(codes, nibble);
          const __m512i high = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
          for (int n = 0; n < N; ++n) {
            __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, xlow[n]);
            sums = _mm512_dpbusd_epi32(sums, high, xhigh[n]);
            acc[r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), lane_scale[r][n], acc[r][n]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) out[n * ldo + r * orow] = _mm512_reduce_add_ps(acc[r][n]);
}

// int4_tile for groups of 32 and one token (decode), R rows. A 64-byte run holds 4 groups (4 lanes each); the
// two vpdpbusd leave each lane within +-8 * 15 * 127 = 15240, so a block's 4 runs fold into one lane per group
// in 16-bit integers: packs + madd of runs 0 and 1, of runs 2 and 3 (pair sums within +-30480), then of the two
// (exact int32 group sums). One convert and one fma per row and block of 16 groups instead of one per run, and
// one permute of the block's scales (the packs leave group 4 * (j % 4) + j / 4 in lane j) instead of one per
// run: about 8 vector instructions per run become about 6.5.
template <int R>
void int4_tile_g32(const uint8_t* q, int64_t ldq, const F16* ws, int64_t lds, const Int8Activations& x, int64_t t0,
                   float* out, int64_t orow) {
  const int64_t half_len = x.len / 2, groups = x.len / 32;
  const __m512i nibble = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi16(1);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const int8_t* xq = x.q + t0 * x.len;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g_block = 0; g_block < groups; g_block += 16) {
    const int block_groups = static_cast<int>(groups - g_block < 16 ? groups - g_block : 16);
    const __mmask16 in_block = static_cast<__mmask16>((1u << block_groups) - 1u);
    const __m512 sx = _mm512_maskz_loadu_ps(in_block, x.scale + t0 * groups + g_block);
    const __m512 offset = _mm512_maskz_loadu_ps(in_block, x.offset + t0 * groups + g_block);
    __m512 lane_scale[R];
    for (int r = 0; r < R; ++r) {
      const __m512 sw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in_block, ws + r * lds + g_block));
      lane_scale[r] = _mm512_permutexvar_ps(order, _mm512_mul_ps(sw, sx));
      acc[r] = _mm512_fnmadd_ps(sw, offset, acc[r]);  // the codes' +8, as in int4_tile
    }
    const int runs = block_groups / 4;  // whole runs: x.len is a multiple of 128
    const int64_t b0 = g_block * 16;
    __m512i pair_sums[2][R];
    for (int p = 0; p < 2; ++p) {
      __m512i run_sums[2][R];
      for (int k = 0; k < 2; ++k) {
        const int run = 2 * p + k;
        if (run >= runs) {
          for (int r = 0; r < R; ++r) run_sums[k][r] = _mm512_setzero_si512();
          continue;
        }
        const int64_t b = b0 + 64 * run;
        const __m512i xlow = _mm512_loadu_si512(xq + b), xhigh = _mm512_loadu_si512(xq + half_len + b);
        for (int r = 0; r < R; ++r) {
          const __m512i codes = _mm512_loadu_si512(q + r * ldq + b);
          const __m512i low = _mm512_and_si512(codes, nibble);
          const __m512i high = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
          run_sums[k][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), low, xlow), high, xhigh);
        }
      }
      for (int r = 0; r < R; ++r) {
        pair_sums[p][r] = _mm512_madd_epi16(_mm512_packs_epi32(run_sums[0][r], run_sums[1][r]), ones);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512i group_sums = _mm512_madd_epi16(_mm512_packs_epi32(pair_sums[0][r], pair_sums[1][r]), ones);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(group_sums), lane_scale[r], acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * orow] = _mm512_reduce_add_ps(acc[r]);
}

template <int R>
void int4_tile_n(int n, const uint8_t* q, int64_t ldq, const F16* ws, int64_t lds, const Int8Activations& x,
                 int64_t t0, float* out, int64_t ldo, int64_t orow) {
  if (n == 1 && x.group == 32) {
    int4_tile_g32<R>(q, ldq, ws, lds, x, t0, out, orow);
  } else if (n == 1) {
    int4_tile<R, 1>(q, ldq, ws, lds, x, t0, out, ldo, orow);
  } else {
    int4_tile<R, 2>(q, ldq, ws, lds, x, t0, out, ldo, orow);
  }
}

// Widths in whole 64-byte runs of codes (int4_tiling.h's tiles); others go to `g_fallback` (the AVX2 kernel).
DotRowsByInt8 g_fallback = nullptr;

void avx512_vnni_dot_rows_int4(const QuantizedRows& w, int64_t rows, const Int8Activations& x, int64_t first,
                               int64_t n, float* out, int64_t ldo) {
  // A run of codes must hold whole groups (G = 32, 64, 128) or lie within one (G a multiple of 128): with G = 96
  // a group would end inside a run's lane range that maps lanes to groups by i / lanes_per_group.
  if ((128 % x.group != 0 && x.group % 128 != 0) || x.group % 32 != 0 || x.len % 128 != 0) {
    g_fallback(w, rows, x, first, n, out, ldo);
    return;
  }
  int4_row_tiles(w, rows, first, n, out, ldo, [&](auto tile_rows, int tn, const uint8_t* q, int64_t ldq, const F16* ws,
                                                  int64_t lds, int64_t t0, float* o, int64_t orow) {
    int4_tile_n<decltype(tile_rows)::value>(tn, q, ldq, ws, lds, x, t0, o, ldo, orow);
  });
}

// int8 codes times int8 activations (KernelTable::dot_rows_int8), R rows x N tokens. A 64-byte run of a row's codes
// is 64 columns, two activation groups of 32. vpdpbusd wants one unsigned operand: the codes flipped by 0x80 are
// code + 128 (1..255), so each lane sums four (code + 128) * xq, exact in int32; the +128 comes out once per token
// (16 * x.offset summed over the row: x.offset is 8 * s * sum(xq) per group). The activations' bytes are in int4
// order (a group's first 16 columns among the lows, its last 16 among the highs): a run's lows and highs are each
// 32 bytes in a row, interleaved back into column order by one 128-bit lane shuffle per token and run. Lanes 0..7
// of a run are its first group, 8..15 its second: converted and scaled per lane by their group's activation scale;
// the row's one weight scale multiplies the total.
template <int R, int N>
void int8_tile(const uint8_t* q, int64_t ldq, const F16* ws, int64_t lds, const Int8Activations& x, int64_t t0,
               float* out, int64_t ldo, int64_t orow) {
  const int64_t half_len = x.len / 2, groups = x.len / kInt8ActivationGroup;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  float code_offset[N];  // 128 * sum_g s * sum(xq): what the flip adds to the token's total
  for (int n = 0; n < N; ++n) {
    const float* offset = x.offset + (t0 + n) * groups;
    float total = 0.0f;
    for (int64_t g = 0; g < groups; ++g) total += offset[g];
    code_offset[n] = 16.0f * total;
  }
  __m512 acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t b = 0; b < x.len; b += 64) {
    const int64_t g = b / kInt8ActivationGroup;
    __m512i xv[N];
    __m512 lane_scale[N];
    for (int n = 0; n < N; ++n) {
      const int8_t* xq = x.q + (t0 + n) * x.len + g * (kInt8ActivationGroup / 2);
      const __m512i halves = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + half_len)), 1);  // low g, low g+1, high g, high g+1
      xv[n] = _mm512_shuffle_i64x2(halves, halves, _MM_SHUFFLE(3, 1, 2, 0));
      const float* s = x.scale + (t0 + n) * groups + g;
      lane_scale[n] = _mm512_insertf32x8(_mm512_set1_ps(s[0]), _mm256_set1_ps(s[1]), 1);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i codes = _mm512_xor_si512(_mm512_loadu_si512(q + r * ldq + b), flip);
      for (int n = 0; n < N; ++n) {
        const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xv[n]);
        acc[r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), lane_scale[n], acc[r][n]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float weight_scale = _cvtsh_ss(ws[r * lds].bits);
    for (int n = 0; n < N; ++n) {
      out[n * ldo + r * orow] = weight_scale * (_mm512_reduce_add_ps(acc[r][n]) - code_offset[n]);
    }
  }
}

void avx512_vnni_dot_rows_int8(const QuantizedRows& w, int64_t rows, const Int8Activations& x, int64_t first,
                               int64_t n, float* out, int64_t ldo) {
  int4_row_tiles(w, rows, first, n, out, ldo, [&](auto tile_rows, int tn, const uint8_t* q, int64_t ldq, const F16* ws,
                                                  int64_t lds, int64_t t0, float* o, int64_t orow) {
    constexpr int R = decltype(tile_rows)::value;
    if (tn == 1) {
      int8_tile<R, 1>(q, ldq, ws, lds, x, t0, o, ldo, orow);
    } else {
      int8_tile<R, 2>(q, ldq, ws, lds, x, t0, o, ldo, orow);
    }
  });
}

}  // namespace

DotRowsByInt8 dot_rows_int4_avx512_vnni(DotRowsByInt8 fallback) {
  g_fallback = fallback;
  return avx512_vnni_dot_rows_int4;
}

DotRowsByInt8 dot_rows_int8_avx512_vnni() { return avx512_vnni_dot_rows_int8; }

}  // namespace dali_cpu

#pragma GCC pop_options

#else  // not x86-64

namespace dali_cpu {
DotRowsByInt8 dot_rows_int4_avx512_vnni(DotRowsByInt8 fallback) { return fallback; }
DotRowsByInt8 dot_rows_int8_avx512_vnni() { return nullptr; }
}  // namespace dali_cpu

#endif
