// Orchestration of run_experts: group slots by expert, then three parallel phases on the pool.
//
// # T tokens, K top-k, E experts, H hidden, I intermediate, S selected slots, n slots of one expert
//
//   0. gather: xs[S, H] = fp32(hidden[token of slot]) grouped by expert; zero unselected slots
//   1. up + activation: act[S, I] = act(x . up_e^T + b)      tasks = (expert, block of I)
//   2. down + weighted write: out[slot] = w * (act . down_e^T + b)   tasks = (expert, block of H)
//   3. fp32 and quantized experts with many tokens: the same math as two dense GEMMs (DenseGemm), one expert at
//      a time, a quantized expert's weights dequantized to fp32 first (exact: a code times an fp16 scale);
//      bf16 experts with many tokens on CPUs with a fast bf16 GEMM (AMX): two bf16 GEMMs on the stored weights,
//      and quantized ones with bf16 hidden states there: two bf16 GEMMs on blocks of dequantized rows
//
// Quantized experts take their activations rounded to int8 (kernels.h, activation_group, Int8Activations): xs after
// the gather and act after the activation are rounded in place (x' = xq * s, what the GEMM path and the fp32 int8
// kernel multiply) and their int8 codes kept beside them for the integer kernels (int4; int8 on AVX-512 VNNI).
//
// Splitting every phase over experts *and* output rows keeps all threads busy when a decode step
// has only a few active experts with one token each.
#include "experts.h"

#include "stream_blocks.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dali_cpu {

namespace {

// Tokens of one expert processed together inside a task: bounds the per-thread scratch while
// letting each weight block be reused from cache by up to this many tokens.
constexpr int64_t kTokenChunk = 32;
// Tasks per thread and phase: enough to balance experts of different sizes.
constexpr int64_t kTasksPerThread = 4;

struct ExpertGroup {
  int64_t expert;
  int64_t first;  // into the grouped slot list
  int64_t count;
};

struct SlotPlan {
  std::vector<int64_t> slots;  // selected slots (t * K + k), grouped by expert
  std::vector<ExpertGroup> groups;  // active experts, largest first
  std::vector<int64_t> unselected;
};

bool selected(const Routing& routing, int64_t expert) {
  return routing.expert_mask == nullptr || routing.expert_mask[expert];
}

SlotPlan plan_slots(const ExpertWeights& layer, const Routing& routing) {
  const int64_t E = layer.num_experts, TK = routing.tokens * routing.top_k;
  std::vector<int64_t> counts(E, 0);
  SlotPlan plan;
  for (int64_t s = 0; s < TK; ++s) {
    const int64_t e = routing.ids[s];
    if (selected(routing, e)) {
      ++counts[e];
    } else {
      plan.unselected.push_back(s);
    }
  }
  std::vector<int64_t> offsets(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    offsets[e + 1] = offsets[e] + counts[e];
    if (counts[e] > 0) plan.groups.push_back({e, offsets[e], counts[e]});
  }
  plan.slots.resize(offsets[E]);
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (int64_t s = 0; s < TK; ++s) {
    const int64_t e = routing.ids[s];
    if (selected(routing, e)) plan.slots[fill[e]++] = s;
  }
  std::stable_sort(plan.groups.begin(), plan.groups.end(),
                   [](const ExpertGroup& a, const ExpertGroup& b) { return a.count > b.count; });
  return plan;
}

// Output units (rows or columns) per task: a multiple of `align`, at most `max_block`, small enough
// that the phase has about kTasksPerThread tasks per thread.
int64_t choose_block(int64_t units, int64_t num_groups, int num_threads, int64_t align, int64_t max_block) {
  const int64_t target_tasks = std::max<int64_t>(1, kTasksPerThread * num_threads);
  int64_t block = (units * num_groups + target_tasks - 1) / target_tasks;
  block = (block + align - 1) / align * align;
  block = std::max(align, std::min(block, max_block));
  return std::min(block, std::max<int64_t>(1, units));
}

// The largest block (a multiple of align, at most max_block) whose weights fit kReusedBlockBytes.
constexpr int64_t kReusedBlockBytes = 256 * 1024;  // half of a small L2, leaving room for x and outputs
int64_t cache_block(int64_t unit_bytes, int64_t align, int64_t max_block) {
  const int64_t units = kReusedBlockBytes / std::max<int64_t>(1, unit_bytes);
  return std::max(align, std::min(max_block, units / align * align));
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

inline float activate(Activation act, float x) {
  switch (act) {
    case Activation::kSilu:
      return x * sigmoid(x);
    case Activation::kGelu:
      return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * x * (1.0f + std::tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case Activation::kRelu:
      return x > 0.0f ? x : 0.0f;
    case Activation::kRelu2: {
      const float r = x > 0.0f ? x : 0.0f;
      return r * r;
    }
    case Activation::kQuickGelu:
      return x * sigmoid(1.702f * x);
    default:
      return x;  // the clamped activations are gated-only, handled in gate_activate
  }
}

inline float gate_activate(const ExpertWeights& layer, float gate, float up) {
  if (layer.activation == Activation::kClampedSwiglu || layer.activation == Activation::kClampedSilu) {
    // gate clamped above, up clamped to [-limit, limit]; then
    // GPT-OSS (clamped_swiglu): (up + 1) * gate * sigmoid(alpha * gate); DeepSeek-V4 (clamped_silu): silu(gate) * up.
    gate = std::min(gate, layer.limit);
    up = std::max(std::min(up, layer.limit), -layer.limit);
    if (layer.activation == Activation::kClampedSilu) return gate * sigmoid(gate) * up;
    return (up + 1.0f) * (gate * sigmoid(gate * layer.alpha));
  }
  return activate(layer.activation, gate) * up;
}

inline const char* offset(const void* base, DType dtype, int64_t elements) {
  return static_cast<const char*>(base) + elements * dtype_size(dtype);
}

// fp32 buffers on cache-line boundaries: the vector loads never split a line, and ATen's GEMM
// (DenseGemm) takes its fast path on 64-byte aligned operands.
class AlignedFloats {
 public:
  void resize(int64_t count) {
    if (count <= capacity_) return;
    data_.reset(static_cast<float*>(::operator new(sizeof(float) * count, std::align_val_t{64})));
    capacity_ = count;
    advise_huge_pages(data_.get(), sizeof(float) * count);
  }
  float* data() { return data_.get(); }
  void release_above(int64_t count) {
    if (capacity_ > count) {
      data_.reset();
      capacity_ = 0;
    }
  }

 private:
  struct Free {
    void operator()(float* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<float, Free> data_;
  int64_t capacity_ = 0;
};

// The call's working buffers, kept by the calling thread between calls: a fresh multi-MiB buffer
// page-faults once per 4 KiB on first touch, measured at ~5% of a 256-token fp32 call. Buffers
// above kRetainedFloats are freed when the call ends, so a long prefill does not pin its memory.
struct CallScratch {
  AlignedFloats xs, act, dense_h, dense_y, dense_up, dense_down;
  Int8Rows xs_int8, act_int8;
};
constexpr int64_t kRetainedFloats = int64_t{8} << 20;  // 32 MiB per buffer

CallScratch& call_scratch() {
  thread_local CallScratch buffers;
  return buffers;
}

std::vector<float>& scratch() {
  thread_local std::vector<float> buffer;
  return buffer;
}

class ExpertRun {
 public:
  ExpertRun(const ExpertWeights& layer, const Routing& routing, float* out, Parallel& pool,
            const KernelTable& kernels, const DenseGemm& gemm)
      : L_(layer), R_(routing), out_(out), pool_(pool), k_(kernels), gemm_(gemm), plan_(plan_slots(layer, routing)),
        up_x_group_(layer.bits == 0 ? 0 : activation_group(layer.bits, layer.hidden, layer.up_group)),
        down_x_group_(layer.bits == 0 ? 0 : activation_group(layer.bits, layer.intermediate, layer.down_group)) {}

  ~ExpertRun() {
    for (AlignedFloats* buffer : {&xs_, &act_, &dense_h_, &dense_y_, &dense_up_, &dense_down_}) {
      buffer->release_above(kRetainedFloats);
    }
  }

  void run() {
    const int64_t S = static_cast<int64_t>(plan_.slots.size());
    xs_.resize(S * L_.hidden);
    act_.resize(S * L_.intermediate);
    gather();
    if (S == 0) return;
    if (up_x_group_ > 0) {
      xs_int8_.resize(S, L_.hidden, up_x_group_);
      round_slots(xs_int8_, xs_.data(), 0, S, L_.hidden, up_x_group_);
    }
    if (down_x_group_ > 0) act_int8_.resize(S, L_.intermediate, down_x_group_);
    std::vector<ExpertGroup> dense;
    std::vector<ExpertGroup> streamed;
    for (const ExpertGroup& g : plan_.groups) {
      (uses_gemm(g.count) ? dense : streamed).push_back(g);
    }
    run_streamed(streamed);
    if (dense.empty()) return;
    // One pair of GEMM outputs for every dense expert of the call (the largest first).
    const int64_t n_max = dense.front().count;
    dense_h_.resize(n_max * (L_.gated ? 2 * L_.intermediate : L_.intermediate));
    dense_y_.resize(n_max * L_.hidden);
    if (L_.bits != 0 && !uses_gemm16(dense.back().count)) {  // some expert dequantized whole (the fewest tokens)
      dense_up_.resize((L_.gated ? 2 : 1) * L_.intermediate * L_.hidden);
      dense_down_.resize(L_.hidden * L_.intermediate);
    }
    for (const ExpertGroup& g : dense) run_dense(g);
  }

 private:
  bool uses_gemm(int64_t tokens) const {
    if (uses_gemm16(tokens)) return true;
    if (L_.bits == 0 && L_.dtype == DType::kBF16) return false;
    return gemm_.fn != nullptr && gemm_.min_tokens > 0 && (L_.dtype == DType::kF32 || L_.bits != 0) &&
           tokens >= gemm_.min_tokens;
  }

  // The 16-bit GEMM: bf16 experts as stored (fn16), quantized experts with bf16 hidden states dequantized
  // block by block (fn16_filled).
  bool uses_gemm16(int64_t tokens) const {
    if (L_.dtype != DType::kBF16) return false;
    if (L_.bits == 0) return gemm_.fn16 != nullptr && gemm_.min_tokens16 > 0 && tokens >= gemm_.min_tokens16;
    return gemm_.fn16_filled != nullptr && gemm_.min_tokens16_quantized > 0 && tokens >= gemm_.min_tokens16_quantized;
  }

  // c [m, n] = a [m, k] . w^T (w [n, k], or [k, n] when transposed) of one expert's stored weights: w is
  // fp32 (dequantized or stored) for gemm_.fn, bf16 as stored for gemm_.fn16.
  void expert_gemm(const float* a, const void* w, int64_t ldw, float* c, int64_t m, int64_t n, int64_t k) const {
    if (L_.bits == 0 && L_.dtype != DType::kF32) {
      gemm_.fn16(a, k, L_.dtype, w, ldw, L_.transposed, c, n, m, n, k);
    } else {
      gemm_.fn(a, k, static_cast<const float*>(w), ldw, L_.transposed, c, n, m, n, k);
    }
  }

  void run_streamed(const std::vector<ExpertGroup>& groups_list) {
    if (groups_list.empty()) return;
    const int threads = pool_.num_threads();
    const int64_t groups = static_cast<int64_t>(groups_list.size());
    // Row blocks (dot form) are multiples of the 4-row tile, of at least 64 units and about kStreamBlockBytes
    // of weights (stream_blocks.h); column blocks (axpy form) are wide, so each weight row is read in runs of up
    // to 1 KiB (bf16). With more than one token group, a
    // task's weight block is read again for every group of 3 tokens: keep it within L2 then.
    const int64_t align = L_.transposed ? 16 : 4;
    const int64_t max_block = L_.transposed ? 512 : 64;
    const bool reused = groups_list.front().count > 3;  // largest expert first
    const int64_t up_unit_bytes = (L_.gated ? 2 : 1) * row_bytes(L_.hidden);  // one i: its gate and up rows
    const int64_t down_unit_bytes = row_bytes(L_.intermediate);               // one h: a row of down
    const auto streamed = [&](int64_t unit_bytes) {
      return L_.transposed ? max_block : stream_block_units(unit_bytes, align, max_block);
    };
    up_block_ = choose_block(L_.intermediate, groups, threads, align,
                             reused ? cache_block(up_unit_bytes, align, max_block) : streamed(up_unit_bytes));
    down_block_ = choose_block(L_.hidden, groups, threads, align,
                               reused ? cache_block(down_unit_bytes, align, max_block) : streamed(down_unit_bytes));
    const int64_t up_blocks = (L_.intermediate + up_block_ - 1) / up_block_;
    const int64_t down_blocks = (L_.hidden + down_block_ - 1) / down_block_;
    pool_.parallel_for(groups * up_blocks, [&](int64_t task) {
      up_task(groups_list[task / up_blocks], (task % up_blocks) * up_block_);
    });
    if (down_x_group_ > 0) {
      for (const ExpertGroup& g : groups_list) {
        round_slots(act_int8_, act_.data(), g.first, g.count, L_.intermediate, down_x_group_);
      }
    }
    pool_.parallel_for(groups * down_blocks, [&](int64_t task) {
      down_task(groups_list[task / down_blocks], (task % down_blocks) * down_block_);
    });
  }

  // Bytes of one weight row of `len` columns: codes and scales when quantized.
  int64_t row_bytes(int64_t len) const {
    if (L_.bits == 0) return len * dtype_size(L_.dtype);
    return len * L_.bits / 8 + 2 * len / std::max<int64_t>(1, std::min(L_.up_group, L_.down_group));
  }

  // Rows [first_row, first_row + rows) of one expert's up (up_side) or down weights, as QuantizedRows.
  QuantizedRows quantized_rows(bool up_side, int64_t expert, int64_t first_row) const {
    const int64_t expert_stride = up_side ? L_.up_expert_stride : L_.down_expert_stride;
    const int64_t row_stride = up_side ? L_.up_row_stride : L_.down_row_stride;
    QuantizedRows q;
    q.codes = static_cast<const uint8_t*>(up_side ? L_.up : L_.down) + expert * expert_stride + first_row * row_stride;
    q.ld = row_stride;
    q.lds = up_side ? L_.up_scales_row_stride : L_.down_scales_row_stride;
    q.scales = (up_side ? L_.up_scales : L_.down_scales) +
               expert * (up_side ? L_.up_scales_expert_stride : L_.down_scales_expert_stride) + first_row * q.lds;
    q.group = up_side ? L_.up_group : L_.down_group;
    return q;
  }

  // Rounds slots [first, first + n) of x [S, len] to int8 in place (quantized experts), split over the pool when
  // large.
  void round_slots(Int8Rows& codes, float* x, int64_t first, int64_t n, int64_t len, int64_t group) {
    constexpr int64_t kRowsPerTask = 16;
    const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
    auto task = [&](int64_t i) {
      const int64_t r0 = i * kRowsPerTask;
      codes.round_rows(k_, x, first + r0, std::min(kRowsPerTask, n - r0), len, group);
    };
    if (n * len <= (int64_t{1} << 16)) {
      for (int64_t i = 0; i < tasks; ++i) task(i);
    } else {
      pool_.parallel_for(tasks, task);
    }
  }

  // Row form: out[t * ldo + r] = x[slot + t] . w[first_row + r] for r < rows, t < nt, over `len` columns, where
  // w is one expert's up (up_side) or down weights, plain or quantized, read in place, and x the slots' inputs of
  // that projection (xs or act).
  void dot_expert_rows(bool up_side, int64_t expert, int64_t first_row, int64_t rows, int64_t len, int64_t slot,
                       int64_t nt, bool x_exact_bf16, float* out, int64_t ldo) {
    const float* x = (up_side ? xs_.data() : act_.data()) + slot * len;
    if (L_.bits != 0) {
      const int64_t x_group = up_side ? up_x_group_ : down_x_group_;
      const Int8Activations xq = (up_side ? xs_int8_ : act_int8_).view(len, x_group);
      dot_rows_quantized_weights(k_, L_.bits, quantized_rows(up_side, expert, first_row), rows, len,
                                 x_group > 0 ? &xq : nullptr, slot, x, len, nt, out, ldo);
      return;
    }
    const int64_t expert_stride = up_side ? L_.up_expert_stride : L_.down_expert_stride;
    const int64_t ld = up_side ? L_.up_row_stride : L_.down_row_stride;
    const void* w = offset(up_side ? L_.up : L_.down, L_.dtype, expert * expert_stride + first_row * ld);
    k_.dot_rows(L_.dtype, w, ld, rows, len, x, len, nt, x_exact_bf16, out, ldo);
  }

  // Runs task(0) .. task(num_tasks - 1) on the GEMM's threads (or here, without them).
  void on_gemm_threads(int64_t num_tasks, const std::function<void(int64_t)>& task) const {
    if (gemm_.parallel != nullptr) {
      gemm_.parallel(num_tasks, task);
    } else {
      for (int64_t i = 0; i < num_tasks; ++i) task(i);
    }
  }

  // Rows [first, first + rows) of one expert's quantized weights (rows of `len` columns) in fp32 or rounded to
  // bf16 (Out), dst [rows, len].
  template <class Out>
  void dequantize_expert(bool up_side, int64_t expert, int64_t first, int64_t rows, int64_t len, Out* dst) const {
    constexpr int64_t kRowsPerTask = 16;
    on_gemm_threads((rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
      const int64_t r0 = task * kRowsPerTask;
      dequantize_rows_into(k_, L_.bits, quantized_rows(up_side, expert, first + r0), std::min(kRowsPerTask, rows - r0),
                           len, dst + r0 * len, len);
    });
  }

  // c [m, n] = a [m, k] . w^T of one quantized expert's up (w [n = X, k = H]) or down (w [n = H, k = I]) rows,
  // on the 16-bit GEMM, the rows dequantized block by block where it multiplies them.
  void quantized_gemm16(bool up_side, int64_t expert, const float* a, float* c, int64_t m, int64_t n,
                        int64_t k) const {
    gemm_.fn16_filled(a, k, [&](int64_t first, int64_t rows, BF16* dst) {
      dequantize_expert(up_side, expert, first, rows, k, dst);
    }, c, n, m, n, k);
  }

  // One expert with many tokens (fp32, quantized or, with gemm_.fn16, bf16): two dense GEMMs, the activation
  // and the write in between.
  // The element-wise steps run in token chunks on the GEMM's own threads (gemm_.parallel): our
  // pool's workers would contend with them for the cores.
  void run_dense(const ExpertGroup& g) {
    const int64_t H = L_.hidden, I = L_.intermediate, X = L_.gated ? 2 * I : I, n = g.count;
    float* h = dense_h_.data();
    float* y = dense_y_.data();
    const void* up;
    const void* down;
    int64_t up_ld, down_ld;
    const bool blocks16 = L_.bits != 0 && uses_gemm16(n);  // quantized rows dequantized where they are multiplied
    if (blocks16) {
      up = down = nullptr;
      up_ld = down_ld = 0;
    } else if (L_.bits != 0) {
      dequantize_expert(true, g.expert, 0, X, H, dense_up_.data());
      dequantize_expert(false, g.expert, 0, H, I, dense_down_.data());
      up = dense_up_.data();
      down = dense_down_.data();
      up_ld = H;
      down_ld = I;
    } else {
      up = offset(L_.up, L_.dtype, g.expert * L_.up_expert_stride);
      down = offset(L_.down, L_.dtype, g.expert * L_.down_expert_stride);
      up_ld = L_.up_row_stride;
      down_ld = L_.down_row_stride;
    }
    const int64_t chunks = (n + kTokenChunk - 1) / kTokenChunk;
    auto in_chunks = [&](auto&& body) {
      on_gemm_threads(chunks, [&](int64_t c) {
        const int64_t t0 = c * kTokenChunk;
        body(t0, std::min(kTokenChunk, n - t0));
      });
    };
    if (blocks16) {
      quantized_gemm16(true, g.expert, xs_.data() + g.first * H, h, n, X, H);
    } else {
      expert_gemm(xs_.data() + g.first * H, up, up_ld, h, n, X, H);
    }
    in_chunks([&](int64_t t0, int64_t nt) {
      activate_block(g, 0, I, t0, nt, h + t0 * X, X);
      if (down_x_group_ > 0) act_int8_.round_rows(k_, act_.data(), g.first + t0, nt, I, down_x_group_);
    });
    if (blocks16) {
      quantized_gemm16(false, g.expert, act_.data() + g.first * I, y, n, H, I);
    } else {
      expert_gemm(act_.data() + g.first * I, down, down_ld, y, n, H, I);
    }
    in_chunks([&](int64_t t0, int64_t nt) { write_slots(g, 0, H, t0, nt, y + t0 * H, H); });
  }

  void gather() {
    const int64_t H = L_.hidden, K = R_.top_k;
    const int64_t S = static_cast<int64_t>(plan_.slots.size());
    const int64_t U = static_cast<int64_t>(plan_.unselected.size());
    constexpr int64_t kRowsPerTask = 64;
    const int64_t gather_tasks = (S + kRowsPerTask - 1) / kRowsPerTask;
    const int64_t zero_tasks = (U + kRowsPerTask - 1) / kRowsPerTask;
    auto body = [&](int64_t task) {
      if (task < gather_tasks) {
        const int64_t end = std::min(S, (task + 1) * kRowsPerTask);
        for (int64_t i = task * kRowsPerTask; i < end; ++i) {
          const int64_t token = plan_.slots[i] / K;
          k_.convert(R_.hidden_dtype, offset(R_.hidden, R_.hidden_dtype, token * R_.hidden_stride), H,
                     xs_.data() + i * H);
        }
      } else {
        task -= gather_tasks;
        const int64_t end = std::min(U, (task + 1) * kRowsPerTask);
        for (int64_t i = task * kRowsPerTask; i < end; ++i) {
          std::memset(out_ + plan_.unselected[i] * H, 0, sizeof(float) * H);
        }
      }
    };
    // Decode gathers a handful of rows: not worth waking the workers.
    if ((S + U) * H <= (int64_t{1} << 16)) {
      for (int64_t task = 0; task < gather_tasks + zero_tasks; ++task) body(task);
    } else {
      pool_.parallel_for(gather_tasks + zero_tasks, body);
    }
  }

  // act[:, i0:i0+bi] of one expert.
  void up_task(const ExpertGroup& g, int64_t i0) {
    const int64_t H = L_.hidden, I = L_.intermediate;
    const int64_t bi = std::min(up_block_, I - i0);
    const int64_t width = L_.gated ? 2 * bi : bi;
    const int64_t e = g.expert;
    const bool exact = R_.hidden_dtype == DType::kBF16;
    std::vector<float>& h = scratch();
    h.resize(kTokenChunk * width);
    for (int64_t t0 = 0; t0 < g.count; t0 += kTokenChunk) {
      const int64_t nt = std::min(kTokenChunk, g.count - t0);
      const int64_t slot = g.first + t0;
      const float* x = xs_.data() + slot * H;
      // h[t, c]: columns [gate block | up block], or the interleaved pairs, or the plain block.
      if (!L_.transposed) {
        if (L_.gated && !L_.interleaved) {
          dot_expert_rows(true, e, i0, bi, H, slot, nt, exact, h.data(), width);
          dot_expert_rows(true, e, I + i0, bi, H, slot, nt, exact, h.data() + bi, width);
        } else {
          dot_expert_rows(true, e, L_.gated ? 2 * i0 : i0, width, H, slot, nt, exact, h.data(), width);
        }
      } else {
        const void* up = offset(L_.up, L_.dtype, e * L_.up_expert_stride);
        const int64_t ld = L_.up_row_stride;
        if (L_.gated && !L_.interleaved) {
          k_.axpy_rows(L_.dtype, offset(up, L_.dtype, i0), ld, H, bi, x, H, nt, h.data(), width);
          k_.axpy_rows(L_.dtype, offset(up, L_.dtype, I + i0), ld, H, bi, x, H, nt, h.data() + bi, width);
        } else {
          const int64_t first_col = L_.gated ? 2 * i0 : i0;
          k_.axpy_rows(L_.dtype, offset(up, L_.dtype, first_col), ld, H, width, x, H, nt, h.data(), width);
        }
      }
      activate_block(g, i0, bi, t0, nt, h.data(), width);
    }
  }

  void activate_block(const ExpertGroup& g, int64_t i0, int64_t bi, int64_t t0, int64_t nt, float* h,
                      int64_t width) {
    const int64_t I = L_.intermediate;
    const void* bias = L_.up_bias ? offset(L_.up_bias, L_.bias_dtype, g.expert * L_.up_bias_stride) : nullptr;
    // Column c of h holds up-projection output x_index(c).
    auto x_index = [&](int64_t c) {
      if (!L_.gated) return i0 + c;
      if (L_.interleaved) return 2 * i0 + c;
      return c < bi ? i0 + c : I + i0 + (c - bi);
    };
    for (int64_t t = 0; t < nt; ++t) {
      float* row = h + t * width;
      if (bias) {
        for (int64_t c = 0; c < width; ++c) row[c] += element(L_.bias_dtype, bias, x_index(c));
      }
      float* a = act_.data() + (g.first + t0 + t) * I + i0;
      if (!L_.gated) {
        for (int64_t i = 0; i < bi; ++i) a[i] = activate(L_.activation, row[i]);
      } else if (L_.interleaved) {
        for (int64_t i = 0; i < bi; ++i) a[i] = gate_activate(L_, row[2 * i], row[2 * i + 1]);
      } else if (L_.activation == Activation::kSilu) {
        k_.silu_mul(row, row + bi, bi, a);
      } else {
        for (int64_t i = 0; i < bi; ++i) a[i] = gate_activate(L_, row[i], row[bi + i]);
      }
    }
  }

  // out[slot, h0:h0+bh] for every slot of one expert.
  void down_task(const ExpertGroup& g, int64_t h0) {
    const int64_t H = L_.hidden, I = L_.intermediate;
    const int64_t bh = std::min(down_block_, H - h0);
    std::vector<float>& y = scratch();
    y.resize(kTokenChunk * bh);
    for (int64_t t0 = 0; t0 < g.count; t0 += kTokenChunk) {
      const int64_t nt = std::min(kTokenChunk, g.count - t0);
      const float* a = act_.data() + (g.first + t0) * I;
      if (!L_.transposed) {
        dot_expert_rows(false, g.expert, h0, bh, I, g.first + t0, nt, false, y.data(), bh);
      } else {
        const void* down = offset(L_.down, L_.dtype, g.expert * L_.down_expert_stride);
        k_.axpy_rows(L_.dtype, offset(down, L_.dtype, h0), L_.down_row_stride, I, bh, a, I, nt, y.data(), bh);
      }
      write_slots(g, h0, bh, t0, nt, y.data(), bh);
    }
  }

  // out[slot, h0:h0+bh] = weight * (y + down_bias) for tokens t0..t0+nt of the expert.
  void write_slots(const ExpertGroup& g, int64_t h0, int64_t bh, int64_t t0, int64_t nt, const float* y,
                   int64_t ldy) {
    const int64_t H = L_.hidden;
    const void* bias =
        L_.down_bias ? offset(L_.down_bias, L_.bias_dtype, g.expert * L_.down_bias_stride) : nullptr;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t slot = plan_.slots[g.first + t0 + t];
      const float w = R_.weights[slot];
      const float* src = y + t * ldy;
      float* dst = out_ + slot * H + h0;
      if (bias) {
        for (int64_t j = 0; j < bh; ++j) dst[j] = w * (src[j] + element(L_.bias_dtype, bias, h0 + j));
      } else {
        for (int64_t j = 0; j < bh; ++j) dst[j] = w * src[j];
      }
    }
  }

  const ExpertWeights& L_;
  const Routing& R_;
  float* out_;
  Parallel& pool_;
  const KernelTable& k_;
  const DenseGemm& gemm_;
  SlotPlan plan_;
  const int64_t up_x_group_;    // activation_group of the up projection's input xs (0: not rounded)
  const int64_t down_x_group_;  // ... of the down projection's input act
  CallScratch& buffers_ = call_scratch();
  AlignedFloats& xs_ = buffers_.xs;     // [S, H]
  AlignedFloats& act_ = buffers_.act;   // [S, I]
  AlignedFloats& dense_h_ = buffers_.dense_h;  // [n, X] of the dense expert being run
  AlignedFloats& dense_y_ = buffers_.dense_y;  // [n, H]
  AlignedFloats& dense_up_ = buffers_.dense_up;      // [X, H] of a quantized dense expert, dequantized
  AlignedFloats& dense_down_ = buffers_.dense_down;  // [H, I]
  Int8Rows& xs_int8_ = buffers_.xs_int8;    // quantized experts: xs [S, H] in int8
  Int8Rows& act_int8_ = buffers_.act_int8;  // act [S, I]
  int64_t up_block_ = 0;
  int64_t down_block_ = 0;
};

}  // namespace

void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < static_cast<int64_t>(2 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)data;
  (void)bytes;
#endif
}

bool parse_activation(const char* name, Activation* out) {
  static const struct {
    const char* name;
    Activation value;
  } kNames[] = {{"silu", Activation::kSilu},           {"gelu", Activation::kGelu},
                {"gelu_tanh", Activation::kGeluTanh},  {"relu", Activation::kRelu},
                {"relu2", Activation::kRelu2},         {"quick_gelu", Activation::kQuickGelu},
                {"clamped_swiglu", Activation::kClampedSwiglu}, {"clamped_silu", Activation::kClampedSilu}};
  for (const auto& entry : kNames) {
    if (std::strcmp(name, entry.name) == 0) {
      *out = entry.value;
      return true;
    }
  }
  return false;
}

bool any_selected(const Routing& routing) {
  const int64_t TK = routing.tokens * routing.top_k;
  for (int64_t s = 0; s < TK; ++s) {
    if (selected(routing, routing.ids[s])) return true;
  }
  return false;
}

void run_experts(const ExpertWeights& layer, const Routing& routing, float* out, Parallel& pool,
                 const KernelTable& kernels, const DenseGemm& gemm) {
  ExpertRun(layer, routing, out, pool, kernels, gemm).run();
}

}  // namespace dali_cpu
