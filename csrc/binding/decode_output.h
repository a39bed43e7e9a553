// Decode-size results written in the caller's dtype by the bindings themselves.
//
// The kernels accumulate in fp32. Returning their fp32 tensor and converting it with ATen (`out.to(dtype)`)
// costs an allocation and a conversion's dispatch, a few microseconds per call, and a bf16 decode step makes a
// few dozen such calls per layer pair (projections, attention, the experts' sum over k). Instead the fp32
// results go to a per-thread scratch and are rounded straight into the output tensor, with the rounding ATen
// uses: bf16 to nearest even (KernelTable::round_to_bf16), fp16 as c10::Half converts.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "../core/dtypes.h"
#include "../core/kernels.h"

namespace dali_cpu {

// fp32 scratch for one call's results. Up to kRetained floats it is the calling thread's own buffer, kept for
// every later call on that thread (decode sizes: rows times the widest layer, e.g. an lm_head's vocabulary); a
// larger request (prefill sizes) gets a buffer of its own, freed with the object. One at a time per thread.
class Fp32Scratch {
 public:
  static constexpr int64_t kRetained = int64_t{1} << 20;  // 4 MiB

  explicit Fp32Scratch(int64_t count) {
    if (count > kRetained) {
      owned_.reset(new float[static_cast<size_t>(count)]);
      data_ = owned_.get();
      return;
    }
    thread_local std::vector<float> retained;
    if (static_cast<int64_t>(retained.size()) < count) retained.resize(static_cast<size_t>(count));
    data_ = retained.data();
  }
  float* data() const { return data_; }

 private:
  std::unique_ptr<float[]> owned_;
  float* data_ = nullptr;
};

// dst[i] = src[i] for i < count, in dst's dtype (float32, bfloat16 or float16).
inline void store_rounded(const float* src, int64_t count, void* dst, at::ScalarType dtype,
                          const KernelTable& kernels) {
  switch (dtype) {
    case at::kBFloat16:
      kernels.round_to_bf16(src, count, static_cast<BF16*>(dst));
      break;
    case at::kHalf: {
      auto* out = static_cast<c10::Half*>(dst);
      for (int64_t i = 0; i < count; ++i) out[i] = c10::Half(src[i]);
      break;
    }
    default:
      std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
      break;
  }
}

}  // namespace dali_cpu
