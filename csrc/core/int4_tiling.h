// The row and token tiling shared by the int4 kernels (kernels_avx2.cpp, kernels_avx512_vnni.cpp): tiles of 4
// rows taken from the block's 4 quarters (4 sequential streams), then the remaining rows one by one, each tile
// over two tokens at a time (sharing each run of unpacked codes). Included inside each kernel's target region.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace dali_cpu {

// tile(rows_per_tile, tokens, codes, ldq, scales, lds, first_token, out, orow), rows_per_tile an
// std::integral_constant<int, 4 or 1>, tokens 1 or 2: the kernel's tile for those rows and tokens.
template <typename Tile>
inline void int4_row_tiles(const QuantizedRows& w, int64_t rows, int64_t first, int64_t n, float* out, int64_t ldo,
                           Tile&& tile) {
  const uint8_t* q = static_cast<const uint8_t*>(w.codes);
  const int64_t quarter = rows / 4;
  for (int64_t t = 0; t < n; t += 2) {
    const int tn = n - t < 2 ? 1 : 2;
    float* ot = out + t * ldo;
    for (int64_t r = 0; r < quarter; ++r) {
      tile(std::integral_constant<int, 4>(), tn, q + r * w.ld, quarter * w.ld, w.scales + r * w.lds, quarter * w.lds,
           first + t, ot + r, quarter);
    }
    for (int64_t r = 4 * quarter; r < rows; ++r) {
      tile(std::integral_constant<int, 1>(), tn, q + r * w.ld, w.ld, w.scales + r * w.lds, w.lds, first + t, ot + r,
           int64_t{1});
    }
  }
}

}  // namespace dali_cpu
