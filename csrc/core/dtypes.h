// Element types of the CPU expert runtime and their scalar conversions to fp32.
// Torch-free: the binding layer maps at::ScalarType onto DType.
#pragma once

#include <cstdint>
#include <cstring>

namespace dali_cpu {

enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Distinct 16-bit storage types, so kernels can be templated on the element type.
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }

inline float to_float(BF16 v) {
  // bf16 is the top half of an fp32: widening is exact.
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float to_float(F16 v) {
  // IEEE half -> single, including subnormals, infinities and NaN (no F16C needed).
  uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu;
  uint32_t mant = v.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {
    // Subnormal half: normalise the mantissa.
    exp = 113u;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// fp32 -> bf16 rounded to nearest even, every NaN to the quiet NaN 0x7FC0: c10::BFloat16's rounding, bit for bit.
inline BF16 to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t nearest_even = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return BF16{static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : nearest_even)};
}

inline int64_t dtype_size(DType d) { return d == DType::kF32 ? 4 : 2; }

// Element i of an array of `dtype` (bias vectors, activations), widened to fp32: for scalar loops only.
inline float element(DType dtype, const void* base, int64_t i) {
  switch (dtype) {
    case DType::kBF16:
      return to_float(static_cast<const BF16*>(base)[i]);
    case DType::kF16:
      return to_float(static_cast<const F16*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

}  // namespace dali_cpu
