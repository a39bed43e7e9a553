// How much of a weight matrix one task of a decode-size kernel streams (linear.cpp, experts.cpp).
//
// A task reads its block of weight rows from memory as a few sequential streams (the tile's quarters). Each new
// block starts cold: the hardware prefetchers ramp up again and the thread's first loads wait on memory. Blocks
// are therefore sized in bytes, not rows: 64 rows were 256 KiB of a 2048-wide bf16 matrix but only 64 KiB of
// the same matrix in int4 (and 32 KiB of an int4 expert's down projection), and such blocks read about 25%
// slower (a 16384 x 2048 int4 matrix read cold: 23.8 GB/s in 64 KiB blocks, 31.0 in 256 KiB ones; the same
// machine's stream rate 35.9). Balance still comes from the kernels' tasks per thread.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dali_cpu {

constexpr int64_t kStreamBlockBytes = 256 * 1024;

// The most units (rows, or an expert's gate and up rows) of `unit_bytes` each that one task streams: about
// kStreamBlockBytes of weights, at least `min_units`, a multiple of `align`.
inline int64_t stream_block_units(int64_t unit_bytes, int64_t align, int64_t min_units) {
  const int64_t units = kStreamBlockBytes / std::max<int64_t>(1, unit_bytes) / align * align;
  return std::max(min_units, units);
}

}  // namespace dali_cpu
