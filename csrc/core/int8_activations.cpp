// int4 weights times int8 activations, the ISA-independent part: rounding the activations (once per call,
// by whoever owns them) and the scalar dot, which the portable table uses and the vector ones fall back to.
//
// # n tokens, len columns, G group size, rows output rows
//
// Why integers: an int4 code costs several instructions to widen to fp32 (mask, shift, convert, subtract),
// more than the multiply itself, so an fp32 int4 kernel is compute-bound at a quarter of bf16's bytes. With
// int8 activations a vector multiply-add of bytes (AVX2 maddubs) takes 32 codes at once. The rounding is the
// activations' own quantization, documented as part of the format (ops/quantized_linear.py).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace dali_cpu {

void round_to_int8(const float* x, int64_t ldx, int64_t n, int64_t len, int64_t group, int8_t* q, float* scale,
                   float* offset, float* rounded) {
  const int64_t half = group / 2;
  round_groups_to_int8(x, ldx, n, len, group, q, scale, offset, rounded,
                       [&](const float* xg, float* rg, int8_t* low, int8_t* high) {
    float amax = 0.0f;
    for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(xg[i]));
    const float s = amax / 127.0f;
    const float divisor = s > 0.0f ? s : 1.0f;
    int32_t sum = 0;
    for (int64_t i = 0; i < group; ++i) {
      // nearbyint rounds half to even (the default rounding mode), as torch.round does
      const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(xg[i] / divisor)));
      const int8_t code = static_cast<int8_t>(v);
      sum += code;
      rg[i] = v * s;
      (i < half ? low[i] : high[i - half]) = code;
    }
    return RoundedGroup{s, sum};
  });
}

void dot_rows_int4_scalar(const QuantizedRows& w, int64_t rows, const Int8Activations& x, int64_t first, int64_t n,
                          float* out, int64_t ldo) {
  const int64_t half = x.group / 2, groups = x.len / x.group;
  for (int64_t t = 0; t < n; ++t) {
    const int8_t* low = x.q + (first + t) * x.len;
    const int8_t* high = low + x.len / 2;
    const float* s = x.scale + (first + t) * groups;
    const float* offset = x.offset + (first + t) * groups;
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* codes = static_cast<const uint8_t*>(w.codes) + r * w.ld;
      const F16* ws = w.scales + r * w.lds;
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;  // codes as stored (q + 8): the +8 is taken out with the group's offset
        for (int64_t j = g * half; j < (g + 1) * half; ++j) {
          dot += (codes[j] & 0x0F) * low[j] + (codes[j] >> 4) * high[j];
        }
        const float weight_scale = to_float(ws[g]);
        total += weight_scale * (s[g] * static_cast<float>(dot) - offset[g]);
      }
      out[t * ldo + r] = total;
    }
  }
}

}  // namespace dali_cpu
