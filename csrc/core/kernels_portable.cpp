// The portable path: plain C++ over 8-float "vectors" that the compiler maps onto whatever SIMD the
// baseline target has (SSE2 on x86-64, NEON on aarch64). Also the reference the other paths must match.
#include <cmath>
#include <cstdint>

#include "dtypes.h"
#include "kernels.h"

namespace dali_cpu {
namespace {

struct Portable {
  static constexpr int kLanes = 8;
  struct vec {
    float v[kLanes];
  };
  static vec zero() {
    vec r;
    for (int l = 0; l < kLanes; ++l) r.v[l] = 0.0f;
    return r;
  }
  template <class W>
  static vec load(const W* p) {
    vec r;
    for (int l = 0; l < kLanes; ++l) r.v[l] = to_float(p[l]);
    return r;
  }
  static vec load_i8(const int8_t* p) {
    vec r;
    for (int l = 0; l < kLanes; ++l) r.v[l] = static_cast<float>(p[l]);
    return r;
  }
  static void load_i4(const uint8_t* p, vec& low, vec& high) {
    for (int l = 0; l < kLanes; ++l) {
      low.v[l] = static_cast<float>((p[l] & 0x0F) - 8);
      high.v[l] = static_cast<float>((p[l] >> 4) - 8);
    }
  }
  static vec broadcast(const float* p) {
    vec r;
    for (int l = 0; l < kLanes; ++l) r.v[l] = *p;
    return r;
  }
  static vec broadcast(const F16* p) {
    const float f = to_float(*p);
    return broadcast(&f);
  }
  static vec fma(vec a, vec b, vec c) {
    for (int l = 0; l < kLanes; ++l) c.v[l] += a.v[l] * b.v[l];
    return c;
  }
  static vec add(vec a, vec b) {
    for (int l = 0; l < kLanes; ++l) a.v[l] += b.v[l];
    return a;
  }
  static vec mul(vec a, vec b) {
    for (int l = 0; l < kLanes; ++l) a.v[l] *= b.v[l];
    return a;
  }
  static vec exp(vec x) {
    for (int l = 0; l < kLanes; ++l) x.v[l] = std::exp(x.v[l]);
    return x;
  }
  static vec silu(vec g) {
    for (int l = 0; l < kLanes; ++l) g.v[l] = g.v[l] * (1.0f / (1.0f + std::exp(-g.v[l])));
    return g;
  }
  static float hsum(vec a) {
    return ((a.v[0] + a.v[4]) + (a.v[1] + a.v[5])) + ((a.v[2] + a.v[6]) + (a.v[3] + a.v[7]));
  }
  static void store(float* p, vec a) {
    for (int l = 0; l < kLanes; ++l) p[l] = a.v[l];
  }
  static void store_bf16(BF16* p, vec a) {
    for (int l = 0; l < kLanes; ++l) p[l] = to_bf16(a.v[l]);
  }
  static void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }
};

#include "micro_kernels.h"

void portable_dot_rows(DType wtype, const void* w, int64_t ldw, int64_t rows, int64_t len, const float* x,
                       int64_t ldx, int64_t n, bool /*x_exact_bf16*/, float* out, int64_t ldo) {
  dot_rows_generic<Portable>(wtype, w, ldw, rows, len, x, ldx, n, out, ldo);
}

}  // namespace

const KernelTable& portable_kernels() {
  static const KernelTable table{Isa::kPortable,
                                 portable_dot_rows,
                                 axpy_rows_generic<Portable>,
                                 convert_generic<Portable>,
                                 silu_mul_generic<Portable>,
                                 exp_shifted_generic<Portable>,
                                 dot_rows_quantized_generic<Portable>,
                                 dequantize_rows_generic<Portable, float>,
                                 dot_rows_int4_scalar,
                                 round_to_int8,
                                 round_to_bf16_generic<Portable>,
                                 dequantize_rows_generic<Portable, BF16>};
  return table;
}

}  // namespace dali_cpu
