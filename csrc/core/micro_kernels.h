#pragma once

// Register-blocked micro-kernels, written once over a vector-traits type `V` and instantiated
// per ISA (portable, AVX2, AVX-512) in the kernels_*.cpp files.
//
// # n tokens, R rows and N tokens per register tile, U unrolled vectors, L lanes per vector
//
// Include this header only after `#pragma GCC target(...)` and from inside an anonymous
// namespace, so that every instantiation is compiled for that file's ISA and stays private to it
// (one ISA's code can never be merged into another's by the linker). It includes nothing itself:
// dtypes.h and the intrinsics must come first, before the target pragma.
//
// V provides: vec, kLanes, zero(), load(const float*|const BF16*|const F16*), broadcast(const float*),
// fma(a, b, c) = a * b + c, add(a, b), mul(a, b), hsum(vec), store(float*, vec), store_bf16(BF16*, vec) (rounded as
// to_bf16 rounds), prefetch(const void*)
// (into L2), silu(vec) = g * (1 / (1 + exp(-g))) per lane.

// R rows x N tokens of `out = x . w^T`, each dot product over the contiguous `len`. The R rows are
// `ldw` elements apart and their outputs `orow` apart (see dot_rows_impl for why they interleave).
template <class V, int R, int N, int U, class W>
inline void dot_tile(const W* w, int64_t ldw, int64_t len, const float* x, int64_t ldx, float* out, int64_t ldo,
                     int64_t orow) {
  constexpr int L = V::kLanes;
  typename V::vec acc[U][R][N];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < N; ++n) acc[u][r][n] = V::zero();
  int64_t j = 0;
  for (; j + U * L <= len; j += U * L) {
    for (int u = 0; u < U; ++u) {
      typename V::vec xv[N];
      for (int n = 0; n < N; ++n) xv[n] = V::load(x + n * ldx + j + u * L);
      for (int r = 0; r < R; ++r) {
        typename V::vec wv = V::load(w + r * ldw + j + u * L);
        for (int n = 0; n < N; ++n) acc[u][r][n] = V::fma(wv, xv[n], acc[u][r][n]);
      }
    }
  }
  for (; j + L <= len; j += L) {
    for (int r = 0; r < R; ++r) {
      typename V::vec wv = V::load(w + r * ldw + j);
      for (int n = 0; n < N; ++n) acc[0][r][n] = V::fma(wv, V::load(x + n * ldx + j), acc[0][r][n]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < N; ++n) {
      typename V::vec total = acc[0][r][n];
      for (int u = 1; u < U; ++u) total = V::add(total, acc[u][r][n]);
      float s = V::hsum(total);
      for (int64_t k = j; k < len; ++k) s += to_float(w[r * ldw + k]) * x[n * ldx + k];
      out[n * ldo + r * orow] = s;
    }
  }
}

// Enough independent accumulators to hide FMA latency without running out of registers.
template <class V, int R, class W>
inline void dot_tile_n(int n, const W* w, int64_t ldw, int64_t len, const float* x, int64_t ldx, float* out,
                       int64_t ldo, int64_t orow) {
  switch (n) {
    case 1:
      dot_tile<V, R, 1, (R <= 4 ? 2 : 1)>(w, ldw, len, x, ldx, out, ldo, orow);
      break;
    case 2:
      dot_tile<V, R, 2, (R <= 2 ? 2 : 1)>(w, ldw, len, x, ldx, out, ldo, orow);
      break;
    default:
      dot_tile<V, R, 3, 1>(w, ldw, len, x, ldx, out, ldo, orow);
      break;
  }
}

template <class V, class W>
void dot_rows_impl(const W* w, int64_t ldw, int64_t rows, int64_t len, const float* x, int64_t ldx, int64_t n,
                   float* out, int64_t ldo) {
  // The 4 rows of a tile come from the 4 quarters of the block (rows r, r + q, r + 2q, r + 3q), so the
  // tile reads 4 long sequential streams, each walking its quarter row after row. Four adjacent rows
  // would be 4 short streams when rows are short (I = 768 to 2048 elements): measured 11 -> 21 GB/s
  // at I = 768 to 1024 on 2 threads, and never slower on long rows.
  const int64_t q = rows / 4;
  for (int64_t t = 0; t < n; t += 3) {  // three tokens share each loaded weight vector
    const int tn = static_cast<int>(n - t < 3 ? n - t : 3);
    const float* xt = x + t * ldx;
    float* ot = out + t * ldo;
    for (int64_t r = 0; r < q; ++r) dot_tile_n<V, 4>(tn, w + r * ldw, q * ldw, len, xt, ldx, ot + r, ldo, q);
    const int64_t r = 4 * q;
    switch (rows - r) {
      case 3:
        dot_tile_n<V, 3>(tn, w + r * ldw, ldw, len, xt, ldx, ot + r, ldo, 1);
        break;
      case 2:
        dot_tile_n<V, 2>(tn, w + r * ldw, ldw, len, xt, ldx, ot + r, ldo, 1);
        break;
      case 1:
        dot_tile_n<V, 1>(tn, w + r * ldw, ldw, len, xt, ldx, ot + r, ldo, 1);
        break;
      default:
        break;
    }
  }
}

// One pass of R weight rows over the whole column range for N tokens: out[t, c] += sum_r x[t, r] * w[r, c].
// The R rows stream contiguously (long runs the hardware prefetchers follow, unlike a narrow column
// strip that jumps a row stride every few cache lines), while the N output rows stay in L1.
template <class V, int R, int N, class W>
inline void axpy_pass(const W* w, int64_t ldw, int64_t cols, const float* x, int64_t ldx, float* out, int64_t ldo) {
  constexpr int L = V::kLanes;
  typename V::vec xb[N][R];
  for (int n = 0; n < N; ++n)
    for (int r = 0; r < R; ++r) xb[n][r] = V::broadcast(x + n * ldx + r);
  int64_t c = 0;
  for (; c + L <= cols; c += L) {
    // Prefetch the same columns of the next pass's rows into L2, one hint per cache line: each row
    // segment is a short run at a large stride, too short for the hardware prefetchers to ramp up.
    if (((c * static_cast<int64_t>(sizeof(W))) & 63) == 0) {
      for (int r = 0; r < R; ++r) V::prefetch(w + (R + r) * ldw + c);
    }
    typename V::vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = V::load(w + r * ldw + c);
    for (int n = 0; n < N; ++n) {
      typename V::vec acc = V::load(out + n * ldo + c);
      for (int r = 0; r < R; ++r) acc = V::fma(xb[n][r], wv[r], acc);
      V::store(out + n * ldo + c, acc);
    }
  }
  for (; c < cols; ++c) {
    for (int n = 0; n < N; ++n) {
      float s = out[n * ldo + c];
      for (int r = 0; r < R; ++r) s += x[n * ldx + r] * to_float(w[r * ldw + c]);
      out[n * ldo + c] = s;
    }
  }
}

template <class V, int N, class W>
inline void axpy_tokens(const W* w, int64_t ldw, int64_t rows, int64_t cols, const float* x, int64_t ldx, float* out,
                        int64_t ldo) {
  for (int n = 0; n < N; ++n)
    for (int64_t c = 0; c < cols; ++c) out[n * ldo + c] = 0.0f;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) axpy_pass<V, 4, N>(w + r * ldw, ldw, cols, x + r, ldx, out, ldo);
  switch (rows - r) {
    case 3:
      axpy_pass<V, 3, N>(w + r * ldw, ldw, cols, x + r, ldx, out, ldo);
      break;
    case 2:
      axpy_pass<V, 2, N>(w + r * ldw, ldw, cols, x + r, ldx, out, ldo);
      break;
    case 1:
      axpy_pass<V, 1, N>(w + r * ldw, ldw, cols, x + r, ldx, out, ldo);
      break;
    default:
      break;
  }
}

template <class V, class W>
void axpy_rows_impl(const W* w, int64_t ldw, int64_t rows, int64_t cols, const float* x, int64_t ldx, int64_t n,
                    float* out, int64_t ldo) {
  // Three tokens share each converted weight vector.
  for (int64_t t = 0; t < n; t += 3) {
    const float* xt = x + t * ldx;
    float* ot = out + t * ldo;
    switch (n - t < 3 ? n - t : 3) {
      case 1:
        axpy_tokens<V, 1>(w, ldw, rows, cols, xt, ldx, ot, ldo);
        break;
      case 2:
        axpy_tokens<V, 2>(w, ldw, rows, cols, xt, ldx, ot, ldo);
        break;
      default:
        axpy_tokens<V, 3>(w, ldw, rows, cols, xt, ldx, ot, ldo);
        break;
    }
  }
}

template <class V, class W>
void convert_impl(const W* src, int64_t count, float* dst) {
  constexpr int L = V::kLanes;
  int64_t i = 0;
  for (; i + L <= count; i += L) V::store(dst + i, V::load(src + i));
  for (; i < count; ++i) dst[i] = to_float(src[i]);
}

// The three entry points of a KernelTable, dispatching on the weight type.
template <class V>
void dot_rows_generic(DType wtype, const void* w, int64_t ldw, int64_t rows, int64_t len, const float* x,
                      int64_t ldx, int64_t n, float* out, int64_t ldo) {
  switch (wtype) {
    case DType::kBF16:
      dot_rows_impl<V>(static_cast<const BF16*>(w), ldw, rows, len, x, ldx, n, out, ldo);
      break;
    case DType::kF16:
      dot_rows_impl<V>(static_cast<const F16*>(w), ldw, rows, len, x, ldx, n, out, ldo);
      break;
    default:
      dot_rows_impl<V>(static_cast<const float*>(w), ldw, rows, len, x, ldx, n, out, ldo);
      break;
  }
}

template <class V>
void axpy_rows_generic(DType wtype, const void* w, int64_t ldw, int64_t rows, int64_t cols, const float* x,
                       int64_t ldx, int64_t n, float* out, int64_t ldo) {
  switch (wtype) {
    case DType::kBF16:
      axpy_rows_impl<V>(static_cast<const BF16*>(w), ldw, rows, cols, x, ldx, n, out, ldo);
      break;
    case DType::kF16:
      axpy_rows_impl<V>(static_cast<const F16*>(w), ldw, rows, cols, x, ldx, n, out, ldo);
      break;
    default:
      axpy_rows_impl<V>(static_cast<const float*>(w), ldw, rows, cols, x, ldx, n, out, ldo);
      break;
  }
}

template <class V>
void convert_generic(DType stype, const void* src, int64_t count, float* dst) {
  switch (stype) {
    case DType::kBF16:
      convert_impl<V>(static_cast<const BF16*>(src), count, dst);
      break;
    case DType::kF16:
      convert_impl<V>(static_cast<const F16*>(src), count, dst);
      break;
    default:
      convert_impl<V>(static_cast<const float*>(src), count, dst);
      break;
  }
}

// out[i] = silu(gate[i]) * up[i]. The tail goes through the same vector code (padded), so an
// element's value never depends on where a block boundary fell: splitting experts or rows
// differently (another placement, thread count) gives bit-identical results.
template <class V>
void silu_mul_generic(const float* gate, const float* up, int64_t n, float* out) {
  constexpr int L = V::kLanes;
  int64_t i = 0;
  for (; i + L <= n; i += L) V::store(out + i, V::mul(V::silu(V::load(gate + i)), V::load(up + i)));
  if (i == n) return;
  float g[L] = {}, u[L] = {}, o[L];
  for (int64_t j = i; j < n; ++j) g[j - i] = gate[j], u[j - i] = up[j];
  V::store(o, V::mul(V::silu(V::load(g)), V::load(u)));
  for (int64_t j = i; j < n; ++j) out[j] = o[j - i];
}

// x[i] = exp(x[i] - shift) for i < n; returns their sum (a softmax's numerators and denominator). The tail
// goes through the same vector code, padded, like silu_mul's.
template <class V>
float exp_shifted_generic(float* x, int64_t n, float shift) {
  constexpr int L = V::kLanes;
  const float minus_shift = -shift;
  const typename V::vec offset = V::broadcast(&minus_shift);
  typename V::vec sum = V::zero();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const typename V::vec e = V::exp(V::add(V::load(x + i), offset));
    V::store(x + i, e);
    sum = V::add(sum, e);
  }
  float total = V::hsum(sum);
  if (i == n) return total;
  float t[L] = {};
  for (int64_t j = i; j < n; ++j) t[j - i] = x[j];
  V::store(t, V::exp(V::add(V::load(t), offset)));
  for (int64_t j = i; j < n; ++j) total += x[j] = t[j - i];
  return total;
}

// ---- Quantized weights (KernelTable::dot_rows_quantized / dequantize_rows) ----
//
// V also provides broadcast(const F16*) (a scale in every lane, converted by the hardware where it
// can: the software conversion costs more than a small group's dot), load_i8(const int8_t*) -> vec
// (kLanes codes as fp32) and
// load_i4(const uint8_t*, vec& low, vec& high): kLanes packed bytes, their low nibbles minus 8 into
// `low` and their high nibbles minus 8 into `high`. Thanks to the format's layout (a group's first
// half in the low nibbles, its second half in the high ones) both come out as runs of consecutive
// columns, so no lane shuffling is needed.

// The scalar code of column k of a group: used for the columns past a group's last full vector.
inline float int8_code(const uint8_t* codes, int64_t k) { return static_cast<float>(static_cast<int8_t>(codes[k])); }
inline float low_nibble(uint8_t byte) { return static_cast<float>((byte & 0x0F) - 8); }
inline float high_nibble(uint8_t byte) { return static_cast<float>((byte >> 4) - 8); }

// R rows x N tokens of the quantized dot. Rows are `ldq` bytes (codes) and `lds` scales apart, outputs
// `orow` apart (the quarter streams of dot_rows_impl). A group's partial dots stay in vectors and are
// scaled once at the group's end: one FMA per group instead of a multiply per weight.
template <class V, int Bits, int R, int N>
inline void dot_tile_quantized(const uint8_t* q, int64_t ldq, const F16* s, int64_t lds, int64_t len, int64_t group,
                               const float* x, int64_t ldx, float* out, int64_t ldo, int64_t orow) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  const int64_t group_bytes = Bits == 8 ? group : group / 2;
  vec total[R][N];
  float tail[R][N];  // scaled dots of the columns past each group's last full vector
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) total[r][n] = V::zero(), tail[r][n] = 0.0f;
  for (int64_t g = 0, c0 = 0; c0 < len; ++g, c0 += group) {
    const uint8_t* qg = q + (Bits == 8 ? c0 : c0 / 2);
    const float* xg = x + c0;
    vec acc[R][N];
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < N; ++n) acc[r][n] = V::zero();
    int64_t b = 0;
    for (; b + L <= group_bytes; b += L) {
      if constexpr (Bits == 8) {
        vec xv[N];
        for (int n = 0; n < N; ++n) xv[n] = V::load(xg + n * ldx + b);
        for (int r = 0; r < R; ++r) {
          const vec wv = V::load_i8(reinterpret_cast<const int8_t*>(qg + r * ldq + b));
          for (int n = 0; n < N; ++n) acc[r][n] = V::fma(wv, xv[n], acc[r][n]);
        }
      } else {
        vec xl[N], xh[N];
        for (int n = 0; n < N; ++n) xl[n] = V::load(xg + n * ldx + b), xh[n] = V::load(xg + n * ldx + group_bytes + b);
        for (int r = 0; r < R; ++r) {
          vec low, high;
          V::load_i4(qg + r * ldq + b, low, high);
          for (int n = 0; n < N; ++n) acc[r][n] = V::fma(high, xh[n], V::fma(low, xl[n], acc[r][n]));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const vec sv = V::broadcast(s + r * lds + g);
      for (int n = 0; n < N; ++n) {
        total[r][n] = V::fma(acc[r][n], sv, total[r][n]);
        if (b == group_bytes) continue;
        const float scale = to_float(s[r * lds + g]);
        float dot = 0.0f;
        for (int64_t k = b; k < group_bytes; ++k) {
          const uint8_t* row = qg + r * ldq;
          const float* xn = xg + n * ldx;
          dot += Bits == 8 ? int8_code(row, k) * xn[k]
                           : low_nibble(row[k]) * xn[k] + high_nibble(row[k]) * xn[group_bytes + k];
        }
        tail[r][n] += scale * dot;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) out[n * ldo + r * orow] = V::hsum(total[r][n]) + tail[r][n];
}

template <class V, int Bits, int R>
inline void dot_tile_quantized_n(int n, const uint8_t* q, int64_t ldq, const F16* s, int64_t lds, int64_t len,
                                 int64_t group, const float* x, int64_t ldx, float* out, int64_t ldo, int64_t orow) {
  switch (n) {
    case 1:
      dot_tile_quantized<V, Bits, R, 1>(q, ldq, s, lds, len, group, x, ldx, out, ldo, orow);
      break;
    case 2:
      dot_tile_quantized<V, Bits, R, 2>(q, ldq, s, lds, len, group, x, ldx, out, ldo, orow);
      break;
    default:
      dot_tile_quantized<V, Bits, R, 3>(q, ldq, s, lds, len, group, x, ldx, out, ldo, orow);
      break;
  }
}

// As dot_rows_impl: tiles of 4 rows from the block's 4 quarters (4 long sequential streams), three
// tokens sharing each converted weight vector.
template <class V, int Bits>
void dot_rows_quantized(const QuantizedRows& w, int64_t rows, int64_t len, const float* x, int64_t ldx, int64_t n,
                        float* out, int64_t ldo) {
  const uint8_t* q = static_cast<const uint8_t*>(w.codes);
  const int64_t quarter = rows / 4;
  for (int64_t t = 0; t < n; t += 3) {
    const int tn = static_cast<int>(n - t < 3 ? n - t : 3);
    const float* xt = x + t * ldx;
    float* ot = out + t * ldo;
    for (int64_t r = 0; r < quarter; ++r) {
      dot_tile_quantized_n<V, Bits, 4>(tn, q + r * w.ld, quarter * w.ld, w.scales + r * w.lds, quarter * w.lds, len,
                                       w.group, xt, ldx, ot + r, ldo, quarter);
    }
    const int64_t r = 4 * quarter;
    const uint8_t* qr = q + r * w.ld;
    const F16* sr = w.scales + r * w.lds;
    switch (rows - r) {
      case 3:
        dot_tile_quantized_n<V, Bits, 3>(tn, qr, w.ld, sr, w.lds, len, w.group, xt, ldx, ot + r, ldo, 1);
        break;
      case 2:
        dot_tile_quantized_n<V, Bits, 2>(tn, qr, w.ld, sr, w.lds, len, w.group, xt, ldx, ot + r, ldo, 1);
        break;
      case 1:
        dot_tile_quantized_n<V, Bits, 1>(tn, qr, w.ld, sr, w.lds, len, w.group, xt, ldx, ot + r, ldo, 1);
        break;
      default:
        break;
    }
  }
}

template <class V>
void dot_rows_quantized_generic(int bits, const QuantizedRows& w, int64_t rows, int64_t len, const float* x,
                                int64_t ldx, int64_t n, float* out, int64_t ldo) {
  if (bits == 8) {
    dot_rows_quantized<V, 8>(w, rows, len, x, ldx, n, out, ldo);
  } else {
    dot_rows_quantized<V, 4>(w, rows, len, x, ldx, n, out, ldo);
  }
}

// A weight written out: fp32 as it is, or rounded to bf16 as round_to_bf16 rounds (V::store_bf16 per vector).
template <class V>
inline void put(float* p, typename V::vec v) {
  V::store(p, v);
}
template <class V>
inline void put(BF16* p, typename V::vec v) {
  V::store_bf16(p, v);
}
inline void put_scalar(float* p, float v) { *p = v; }
inline void put_scalar(BF16* p, float v) { *p = to_bf16(v); }

// One row of weights in fp32 (exact: a code times its fp16 scale fits an fp32), group by group, written as `Out`:
// fp32, or bf16 rounded in registers (dequantize_rows_bf16: no fp32 row between the two steps).
template <class V, int Bits, class Out>
void dequantize_row(const uint8_t* q, const F16* s, int64_t len, int64_t group, Out* dst) {
  constexpr int L = V::kLanes;
  const int64_t group_bytes = Bits == 8 ? group : group / 2;
  for (int64_t g = 0, c0 = 0; c0 < len; ++g, c0 += group) {
    const uint8_t* qg = q + (Bits == 8 ? c0 : c0 / 2);
    Out* dg = dst + c0;
    const typename V::vec sv = V::broadcast(s + g);
    int64_t b = 0;
    for (; b + L <= group_bytes; b += L) {
      if constexpr (Bits == 8) {
        put<V>(dg + b, V::mul(V::load_i8(reinterpret_cast<const int8_t*>(qg + b)), sv));
      } else {
        typename V::vec low, high;
        V::load_i4(qg + b, low, high);
        put<V>(dg + b, V::mul(low, sv));
        put<V>(dg + group_bytes + b, V::mul(high, sv));
      }
    }
    const float scale = to_float(s[g]);
    for (; b < group_bytes; ++b) {
      if constexpr (Bits == 8) {
        put_scalar(dg + b, int8_code(qg, b) * scale);
      } else {
        put_scalar(dg + b, low_nibble(qg[b]) * scale);
        put_scalar(dg + group_bytes + b, high_nibble(qg[b]) * scale);
      }
    }
  }
}

template <class V, class Out>
void dequantize_rows_generic(int bits, const QuantizedRows& w, int64_t rows, int64_t len, Out* dst, int64_t ldd) {
  const uint8_t* q = static_cast<const uint8_t*>(w.codes);
  for (int64_t r = 0; r < rows; ++r) {
    if (bits == 8) {
      dequantize_row<V, 8>(q + r * w.ld, w.scales + r * w.lds, len, w.group, dst + r * ldd);
    } else {
      dequantize_row<V, 4>(q + r * w.ld, w.scales + r * w.lds, len, w.group, dst + r * ldd);
    }
  }
}

// ---- Rounding to bf16 (KernelTable::round_to_bf16) ----

// A plain loop that -O3 vectorises for each file's target.
template <class V>
void round_to_bf16_generic(const float* src, int64_t n, BF16* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
}
