#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dali_cpu {
namespace {

// A chunk's keys and values (128 positions of D = 128 in bf16: 32 KiB each) stay in L2 while the group's
// query rows make their passes over them; fewer positions a chunk would spend more on the merge.
constexpr int64_t kMinChunkPositions = 128;

// Chunks per (batch, key/value head): enough tasks for every thread twice over, none shorter than the minimum.
int64_t chunks_per_head(const DecodeAttention& a, int threads) {
  const int64_t heads = a.batch * a.kv_heads;
  const int64_t wanted = (2 * static_cast<int64_t>(threads) + heads - 1) / heads;
  const int64_t most = std::max<int64_t>(1, a.positions / kMinChunkPositions);
  return std::clamp<int64_t>(wanted, 1, most);
}

const char* position_ptr(const CachedHeads& c, int64_t b, int64_t g, int64_t s, int64_t element_bytes) {
  return static_cast<const char*>(c.data) + (b * c.batch_stride + g * c.head_stride + s * c.position_stride) *
                                                element_bytes;
}

const bool* mask_row(const PositionMask& m, int64_t b, int64_t l) {
  return m.data + b * m.batch_stride + l * m.row_stride;
}

// Whether any of the group's rows sees a position in [s0, s0 + len): a chunk nobody sees is never read.
bool chunk_seen(const PositionMask& m, int64_t b, int64_t rows, int64_t s0, int64_t len) {
  if (m.data == nullptr) return true;
  for (int64_t l = 0; l < rows; ++l) {
    const bool* row = mask_row(m, b, l);
    for (int64_t s = s0; s < s0 + len; ++s)
      if (row[s * m.position_stride]) return true;
  }
  return false;
}

}  // namespace

void run_decode_attention(const DecodeAttention& a, Parallel& pool, const KernelTable& kernels) {
  const int64_t group_rows = (a.q_heads / a.kv_heads) * a.q_rows;  // n: query rows sharing one k/v head
  const int64_t D = a.head_dim, chunks = chunks_per_head(a, pool.num_threads());
  const int64_t chunk = (a.positions + chunks - 1) / chunks;
  const int64_t tasks = a.batch * a.kv_heads * chunks;
  const int64_t bytes = dtype_size(a.dtype);
  // Per task: the unnormalised output [n, D] of its chunk, its rows' maxima and sums of exponentials.
  std::vector<float> partial_out(tasks * group_rows * D), partial_max(tasks * group_rows),
      partial_sum(tasks * group_rows);

  pool.parallel_for(tasks, [&](int64_t task) {
    const int64_t c = task % chunks, bg = task / chunks, b = bg / a.kv_heads, g = bg % a.kv_heads;
    const int64_t s0 = c * chunk, len = std::min(a.positions, s0 + chunk) - s0;
    float* out = partial_out.data() + task * group_rows * D;
    float* row_max = partial_max.data() + task * group_rows;
    float* row_sum = partial_sum.data() + task * group_rows;
    if (len <= 0 || !chunk_seen(a.mask, b, a.q_rows, s0, len)) {  // it weighs nothing in the merge
      std::fill(row_max, row_max + group_rows, -std::numeric_limits<float>::infinity());
      std::fill(row_sum, row_sum + group_rows, 0.0f);
      std::fill(out, out + group_rows * D, 0.0f);
      return;
    }
    thread_local std::vector<float> scores;
    scores.resize(group_rows * len);
    // The group's query rows are contiguous in q: heads g * Hq / Hk .. , each with its L rows.
    const float* q = a.q + (b * a.q_heads * a.q_rows + g * group_rows) * D;
    kernels.dot_rows(a.dtype, position_ptr(a.k, b, g, s0, bytes), a.k.position_stride, len, D, q, D, group_rows,
                     false, scores.data(), len);
    for (int64_t t = 0; t < group_rows; ++t) {
      float* row = scores.data() + t * len;
      const bool* seen = a.mask.data ? mask_row(a.mask, b, t % a.q_rows) + s0 * a.mask.position_stride : nullptr;
      if (seen) {
        for (int64_t s = 0; s < len; ++s)
          if (!seen[s * a.mask.position_stride]) row[s] = -std::numeric_limits<float>::infinity();
      }
      row_max[t] = *std::max_element(row, row + len);
      if (row_max[t] == -std::numeric_limits<float>::infinity()) {  // this row sees nothing of the chunk
        row_sum[t] = 0.0f;
        std::fill(row, row + len, 0.0f);
        continue;
      }
      row_sum[t] = kernels.exp_shifted(row, len, row_max[t]);
      if (seen) {  // exactly zero (the vector exp's clamp leaves 1e-38 for -inf), and out of the sum
        for (int64_t s = 0; s < len; ++s)
          if (!seen[s * a.mask.position_stride]) row_sum[t] -= row[s], row[s] = 0.0f;
      }
    }
    kernels.axpy_rows(a.dtype, position_ptr(a.v, b, g, s0, bytes), a.v.position_stride, len, D, scores.data(), len,
                      group_rows, out, D);
  });

  // Merge the chunks of each row: rescale each to the row's overall maximum.
  for (int64_t bg = 0; bg < a.batch * a.kv_heads; ++bg) {
    const int64_t b = bg / a.kv_heads, g = bg % a.kv_heads;
    for (int64_t t = 0; t < group_rows; ++t) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, partial_max[(bg * chunks + c) * group_rows + t]);
      float* dst = a.out + (b * a.q_heads * a.q_rows + g * group_rows + t) * D;
      std::fill(dst, dst + D, 0.0f);
      float total = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t at = (bg * chunks + c) * group_rows + t;
        if (partial_sum[at] == 0.0f) continue;
        const float w = std::exp(partial_max[at] - m);
        total += w * partial_sum[at];
        const float* src = partial_out.data() + at * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
      }
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;  // a row that sees nothing: zeros
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
    }
  }
}

}  // namespace dali_cpu
