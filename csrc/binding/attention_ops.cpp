// ATen binding of the decode attention kernel: dali::cpu_attention (schema in ops/cpu_attention.py).
//
// # B batch, Hq query heads, Hk key/value heads, L query rows, S cached positions, D head dim
//
// q [B, Hq, L, D], k and v [B, Hk, S, D] (any strides with a unit one within a row; a cache is read in
// place), one dtype among float32/bfloat16/float16; mask (optional) bool [B or 1, 1, L or 1, S], true where
// a row sees a position; out [B, Hq, L, D] contiguous in that dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "aten_dtypes.h"
#include "decode_output.h"
#include "../core/attention.h"
#include "../core/runtime.h"

namespace dali_cpu {
namespace {

constexpr const char* kOp = "dali::cpu_attention";

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, kOp, ": q, k and v must be 4-D [B, H, rows, D], got ",
                    q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  core_dtype(q.scalar_type(), kOp, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kOp,
                   ": q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), kOp,
                    ": q, k and v must be CPU tensors, got ", q.device(), ", ", k.device(), " and ", v.device());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), kOp, ": k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(3) == k.size(3), kOp, ": q ", q.sizes(),
                    " does not match the batch and head dim of k ", k.sizes());
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, kOp, ": ", q.size(1),
                    " query heads are not a multiple of ", k.size(1), " key/value heads");
  TORCH_CHECK_VALUE(k.size(2) > 0, kOp, ": no cached position (k and v have 0 rows)");
}

PositionMask position_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q, const at::Tensor& k) {
  if (!mask.has_value() || !mask->defined()) return PositionMask{nullptr, 0, 0, 0};
  const at::Tensor& m = *mask;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, kOp, ": mask must be bool (true: the position is seen), got ",
                   m.scalar_type());
  TORCH_CHECK_VALUE(m.device().is_cpu(), kOp, ": mask must be a CPU tensor, got ", m.device());
  TORCH_CHECK_VALUE(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == q.size(0)) && m.size(1) == 1 &&
                        (m.size(2) == 1 || m.size(2) == q.size(2)) && m.size(3) == k.size(2),
                    kOp, ": mask must be [B or 1, 1, L or 1, S] = [", q.size(0), ", 1, ", q.size(2), ", ", k.size(2),
                    "], got ", m.sizes());
  return PositionMask{m.data_ptr<bool>(), m.size(0) == 1 ? 0 : m.stride(0), m.size(2) == 1 ? 0 : m.stride(2),
                      m.stride(3)};
}

CachedHeads cached(const at::Tensor& t) {
  return CachedHeads{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

at::Tensor cpu_attention(const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in,
                         const std::optional<at::Tensor>& mask, double scale) {
  check_args(q, k_in, v_in);
  const PositionMask seen = position_mask(mask, q, k_in);
  // The kernel reads rows in place; a cache with a strided head dim (never seen in practice) is copied.
  const at::Tensor k = k_in.size(3) > 1 && k_in.stride(3) != 1 ? k_in.contiguous() : k_in;
  const at::Tensor v = v_in.size(3) > 1 && v_in.stride(3) != 1 ? v_in.contiguous() : v_in;
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, in q's dtype
  const int64_t count = q.numel();
  if (count == 0) return out;
  // fp32 q times the scale (what at::mul(q.float(), scale) gives), then the fp32 results, in the thread's scratch;
  // the results rounded into out once (decode_output.h).
  const KernelTable& kernels = active_kernels();
  const Fp32Scratch scratch(2 * count);
  float* q_scaled = scratch.data();
  float* results = q_scaled + count;
  const float factor = static_cast<float>(scale);
  const at::Tensor qr = q.size(3) > 1 && q.stride(3) != 1 ? q.contiguous() : q;
  const DType q_dtype = core_dtype(qr.scalar_type(), kOp, "q");
  const int64_t D = qr.size(3), element = qr.element_size();
  float* row = q_scaled;
  for (int64_t b = 0; b < qr.size(0); ++b) {
    for (int64_t h = 0; h < qr.size(1); ++h) {
      for (int64_t l = 0; l < qr.size(2); ++l, row += D) {
        const int64_t offset = b * qr.stride(0) + h * qr.stride(1) + l * qr.stride(2);
        kernels.convert(q_dtype, static_cast<const char*>(qr.data_ptr()) + offset * element, D, row);
        for (int64_t d = 0; d < D; ++d) row[d] *= factor;
      }
    }
  }
  DecodeAttention a{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3),
                    core_dtype(k.scalar_type(), kOp, "k"), q_scaled, cached(k), cached(v), seen, results};
  run_decode_attention(a, step_parallel(), kernels);
  store_rounded(results, count, out.data_ptr(), q.scalar_type(), kernels);
  return out;
}

}  // namespace
}  // namespace dali_cpu

TORCH_LIBRARY_IMPL(dali, CPU, m) { m.impl("cpu_attention", &dali_cpu::cpu_attention); }
