// The AVX-512 path (F, BW, VL, DQ), plus vdpbf16ps dot products where the CPU has AVX-512 BF16.
// Every function in the target regions may only run on such a CPU; runtime.cpp checks first.
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "dtypes.h"
#include "isa.h"
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics initialise their "undefined" operands from themselves, which
// -W(maybe-)uninitialized report at every inlined use; the pattern is intended.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

#define DALI_AVX512_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace dali_cpu {
namespace {

struct Avx512 {
  static constexpr int kLanes = 16;
  using vec = __m512;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec load(const BF16* p) {
    __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static vec load(const F16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static vec load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // As Avx2::load_i4, 16 packed bytes.
  static void load_i4(const uint8_t* p, vec& low, vec& high) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i eight = _mm512_set1_epi32(8);
    low = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)), eight));
    high = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), eight));
  }
  static vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static vec broadcast(const F16* p) { return _mm512_set1_ps(_cvtsh_ss(p->bits)); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  // As Avx2::exp (see there), with scalef for the 2^n.
  static vec exp(vec x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vec r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    vec p = _mm512_set1_ps(1.0f / 5040.0f);
    for (float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    return _mm512_scalef_ps(p, n);
  }
  static vec silu(vec g) {
    const vec one = _mm512_set1_ps(1.0f);
    const vec e = exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(g, _mm512_div_ps(one, _mm512_add_ps(one, e)));
  }
  static float hsum(vec a) { return _mm512_reduce_add_ps(a); }
  static void store(float* p, vec a) { _mm512_storeu_ps(p, a); }
  // to_bf16 per lane, as Avx2::store_bf16: the 16 bf16 values, narrowed by vpmovdw.
  static __m256i bf16_bits(vec a) {
    const __m512i u = _mm512_castps_si512(a);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  static void store_bf16(BF16* p, vec a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(a)); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};

#include "micro_kernels.h"

// R rows x N tokens with vdpbf16ps: 32 bf16 products per instruction, accumulated in fp32. Only
// for x that is exactly bf16 (the gathered hidden states), so rounding x to bf16 loses nothing.
template <int R, int N>
DALI_AVX512_BF16_TARGET void dot_tile_dpbf16(const BF16* w, int64_t ldw, int64_t len, const float* x, int64_t ldx,
                                             float* out, int64_t ldo, int64_t orow) {
  __m512 acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    __m512bh xv[N];
    for (int n = 0; n < N; ++n) {
      __m512 lo = _mm512_loadu_ps(x + n * ldx + j);
      __m512 hi = _mm512_loadu_ps(x + n * ldx + j + 16);
      xv[n] = _mm512_cvtne2ps_pbh(hi, lo);  // element order x[j], ..., x[j + 31]
    }
    for (int r = 0; r < R; ++r) {
      __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * ldw + j);
      for (int n = 0; n < N; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], wv, xv[n]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < N; ++n) {
      float s = _mm512_reduce_add_ps(acc[r][n]);
      for (int64_t k = j; k < len; ++k) s += to_float(w[r * ldw + k]) * x[n * ldx + k];
      out[n * ldo + r * orow] = s;
    }
  }
}

template <int R>
DALI_AVX512_BF16_TARGET void dot_tile_dpbf16_n(int n, const BF16* w, int64_t ldw, int64_t len, const float* x,
                                               int64_t ldx, float* out, int64_t ldo, int64_t orow) {
  switch (n) {
    case 1:
      dot_tile_dpbf16<R, 1>(w, ldw, len, x, ldx, out, ldo, orow);
      break;
    case 2:
      dot_tile_dpbf16<R, 2>(w, ldw, len, x, ldx, out, ldo, orow);
      break;
    case 3:
      dot_tile_dpbf16<R, 3>(w, ldw, len, x, ldx, out, ldo, orow);
      break;
    default:
      dot_tile_dpbf16<R, 4>(w, ldw, len, x, ldx, out, ldo, orow);
      break;
  }
}

DALI_AVX512_BF16_TARGET void dot_rows_dpbf16(const BF16* w, int64_t ldw, int64_t rows, int64_t len, const float* x,
                                             int64_t ldx, int64_t n, float* out, int64_t ldo) {
  // Up to 4 tokens per pass over the weights (16 accumulators + 4 x vectors + 1 weight vector of the 32 zmm
  // registers): a batch-4 decode step reads each weight once, where the generic tiles' 3 read it twice.
  constexpr int64_t kTokens = 4;
  const int64_t q = rows / 4;  // four streams over the block's quarters, as dot_rows_impl
  for (int64_t t = 0; t < n; t += kTokens) {
    const int tn = static_cast<int>(n - t < kTokens ? n - t : kTokens);
    const float* xt = x + t * ldx;
    float* ot = out + t * ldo;
    for (int64_t r = 0; r < q; ++r) dot_tile_dpbf16_n<4>(tn, w + r * ldw, q * ldw, len, xt, ldx, ot + r, ldo, q);
    const int64_t r = 4 * q;
    switch (rows - r) {
      case 3:
        dot_tile_dpbf16_n<3>(tn, w + r * ldw, ldw, len, xt, ldx, ot + r, ldo, 1);
        break;
      case 2:
        dot_tile_dpbf16_n<2>(tn, w + r * ldw, ldw, len, xt, ldx, ot + r, ldo, 1);
        break;
      case 1:
        dot_tile_dpbf16_n<1>(tn, w + r * ldw, ldw, len, xt, ldx, ot + r, ldo, 1);
        break;
      default:
        break;
    }
  }
}

// Set once by avx512_kernels(), which runs before any kernel of this table can be called.
bool g_use_dpbf16 = false;

void avx512_dot_rows(DType wtype, const void* w, int64_t ldw, int64_t rows, int64_t len, const float* x,
                     int64_t ldx, int64_t n, bool x_exact_bf16, float* out, int64_t ldo) {
  if (wtype == DType::kBF16 && x_exact_bf16 && g_use_dpbf16) {
    dot_rows_dpbf16(static_cast<const BF16*>(w), ldw, rows, len, x, ldx, n, out, ldo);
    return;
  }
  dot_rows_generic<Avx512>(wtype, w, ldw, rows, len, x, ldx, n, out, ldo);
}

void avx512_axpy_rows(DType wtype, const void* w, int64_t ldw, int64_t rows, int64_t cols, const float* x,
                      int64_t ldx, int64_t n, float* out, int64_t ldo) {
  axpy_rows_generic<Avx512>(wtype, w, ldw, rows, cols, x, ldx, n, out, ldo);
}

void avx512_convert(DType stype, const void* src, int64_t count, float* dst) {
  convert_generic<Avx512>(stype, src, count, dst);
}

void avx512_silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  silu_mul_generic<Avx512>(gate, up, n, out);
}
float avx512_exp_shifted(float* x, int64_t n, float shift) { return exp_shifted_generic<Avx512>(x, n, shift); }

void avx512_dot_rows_quantized(int bits, const QuantizedRows& w, int64_t rows, int64_t len, const float* x,
                               int64_t ldx, int64_t n, float* out, int64_t ldo) {
  dot_rows_quantized_generic<Avx512>(bits, w, rows, len, x, ldx, n, out, ldo);
}

void avx512_dequantize_rows(int bits, const QuantizedRows& w, int64_t rows, int64_t len, float* dst, int64_t ldd) {
  dequantize_rows_generic<Avx512>(bits, w, rows, len, dst, ldd);
}

// int8 on CPUs with AVX512_BF16: each code times its scale rounded by vcvtneps2bf16 (round to nearest even, as
// to_bf16; its NaN lanes are set to 0x7FC0 after it; it treats denormals as zero, and a code times an fp16 scale
// is never an fp32 denormal): three instructions where to_bf16's integer rounding takes nine.
DALI_AVX512_BF16_TARGET void dequantize_int8_rows_bf16(const QuantizedRows& w, int64_t rows, int64_t len, BF16* dst,
                                                       int64_t ldd) {
  const __m256i quiet_nan = _mm256_set1_epi16(0x7FC0);
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* q = static_cast<const int8_t*>(w.codes) + r * w.ld;
    const F16* scales = w.scales + r * w.lds;
    BF16* out = dst + r * ldd;
    for (int64_t g = 0, c0 = 0; c0 < len; ++g, c0 += w.group) {
      const __m512 scale = Avx512::broadcast(scales + g);
      int64_t c = c0;
      for (; c + 16 <= c0 + w.group; c += 16) {
        const __m512 v = _mm512_mul_ps(Avx512::load_i8(q + c), scale);
        const __m256i bits = _mm256_mask_mov_epi16((__m256i)_mm512_cvtneps_pbh(v),
                                                   _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet_nan);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), bits);
      }
      const float s = to_float(scales[g]);
      for (; c < c0 + w.group; ++c) out[c] = to_bf16(static_cast<float>(q[c]) * s);
    }
  }
}

// int4 in groups of a multiple of 32: a group's 16 possible weights, (k - 8) * scale for k = 0..15, are rounded
// to bf16 once (the same fp32 products, the same rounding: the same bits as the generic path) and each nibble
// looks its weight up (vpermw), 16 columns per instruction: about half the generic path's work per weight, which
// widens, multiplies and rounds every one. Other formats: the generic path.
void avx512_dequantize_rows_bf16(int bits, const QuantizedRows& w, int64_t rows, int64_t len, BF16* dst,
                                 int64_t ldd) {
  if (bits == 8 && g_use_dpbf16) {
    dequantize_int8_rows_bf16(w, rows, len, dst, ldd);
    return;
  }
  if (bits != 4 || w.group % 32 != 0) {
    dequantize_rows_generic<Avx512>(bits, w, rows, len, dst, ldd);
    return;
  }
  const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i nibble = _mm256_set1_epi16(0x0F);
  const int64_t half = w.group / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* q = static_cast<const uint8_t*>(w.codes) + r * w.ld;
    const F16* scales = w.scales + r * w.lds;
    BF16* out = dst + r * ldd;
    for (int64_t g = 0, c0 = 0; c0 < len; ++g, c0 += w.group) {
      const __m256i table = Avx512::bf16_bits(_mm512_mul_ps(levels, Avx512::broadcast(scales + g)));
      for (int64_t b = 0; b < half; b += 16) {
        const __m256i codes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c0 / 2 + b)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c0 + b),
                            _mm256_permutexvar_epi16(_mm256_and_si256(codes, nibble), table));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c0 + half + b),
                            _mm256_permutexvar_epi16(_mm256_srli_epi16(codes, 4), table));
      }
    }
  }
}

void avx512_round_to_bf16(const float* src, int64_t n, BF16* dst) { round_to_bf16_generic<Avx512>(src, n, dst); }

// round_to_int8 16 columns at a time, for groups of a multiple of 32 (16-column blocks within each half; others:
// the scalar one). The same operations as the scalar version per element (IEEE division, round half to even, the
// clamp's and the maximum's NaN cases, which take std::max's operand), and integer sums: the same bits.
void avx512_round_to_int8(const float* x, int64_t ldx, int64_t n, int64_t len, int64_t group, int8_t* q,
                          float* scale, float* offset, float* rounded) {
  if (group % 32 != 0) {
    round_to_int8(x, ldx, n, len, group, q, scale, offset, rounded);
    return;
  }
  const int64_t half = group / 2;
  const __m512 limit = _mm512_set1_ps(127.0f), minus_limit = _mm512_set1_ps(-127.0f);
  round_groups_to_int8(x, ldx, n, len, group, q, scale, offset, rounded,
                       [&](const float* xg, float* rg, int8_t* low, int8_t* high) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < group; i += 16) amax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xg + i)), amax);
    const float s = _mm512_reduce_max_ps(amax) / 127.0f;
    const __m512 divisor = _mm512_set1_ps(s > 0.0f ? s : 1.0f), vs = _mm512_set1_ps(s);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < group; i += 16) {
      __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xg + i), divisor),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_min_ps(_mm512_max_ps(v, minus_limit), limit);
      const __m512i codes = _mm512_cvtps_epi32(v);
      sum = _mm512_add_epi32(sum, codes);
      _mm512_storeu_ps(rg + i, _mm512_mul_ps(v, vs));
      int8_t* dst = i < half ? low + i : high + i - half;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(codes));
    }
    return RoundedGroup{s, _mm512_reduce_add_epi32(sum)};
  });
}

}  // namespace
}  // namespace dali_cpu

#undef DALI_AVX512_BF16_TARGET
#pragma GCC pop_options

namespace dali_cpu {

// Compiled for the baseline target: callers may ask for the table before checking the CPU.
const KernelTable* avx512_kernels() {
  static const KernelTable table = [] {
    g_use_dpbf16 = cpu_has_avx512_bf16();
    const bool vnni = cpu_has_avx512_vnni();
    return KernelTable{Isa::kAvx512,        avx512_dot_rows,        avx512_axpy_rows,      avx512_convert,
                       avx512_silu_mul,     avx512_exp_shifted,     avx512_dot_rows_quantized,
                       avx512_dequantize_rows,
                       // AVX-512 CPUs have AVX2: its int4 kernel where there is no VNNI, and for odd widths
                       vnni ? dot_rows_int4_avx512_vnni(dot_rows_int4_avx2()) : dot_rows_int4_avx2(),
                       avx512_round_to_int8,        avx512_round_to_bf16,  avx512_dequantize_rows_bf16,
                       vnni ? dot_rows_int8_avx512_vnni() : nullptr};
  }();
  return &table;
}

}  // namespace dali_cpu

#else  // not x86-64: no AVX-512 path in this build

namespace dali_cpu {
const KernelTable* avx512_kernels() { return nullptr; }
}  // namespace dali_cpu

#endif
