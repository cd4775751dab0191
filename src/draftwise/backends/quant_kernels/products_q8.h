// 8-bit-activation products on the GGUF layout (Q4_0, Q4_1, Q8_0): activations rounded per
// 32-value block, exact integer block dot products, llama.cpp's computation.
#pragma once

// ---- 8-bit activations (llama.cpp's way) for the 32-weight block types ----------------------
//
// Each activation row is rounded per 32-value block to int8 with one float scale
// (d = max|x| / 127, q = round(x / d)), once per call. A block's product is then an exact integer
// dot product (maddubs/madd) times d_w * d_x, plus, for Q4_0's offset and Q4_1's min, the
// weight's offset times the block's sum of rounded activations (d_x * sum q). What is computed
// is therefore the product of the GGUF's exact weights with 8-bit-rounded activations, in float32
// — the computation llama.cpp does. One row's blocks are summed in one fixed order whatever the
// other rows are, as above.

namespace {

struct QuantizedRows {
  std::vector<int8_t> q;     // [n, in]
  std::vector<float> scale;  // [n, in / 32]
  std::vector<float> sum;    // [n, in / 32]: scale * sum(q) of the block
  std::vector<int32_t> half_sums;  // [n, in / 16]: sum(q) of each 16 values (Q6_K)
};

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

QuantizedRows quantize_rows(const float* x, int64_t n, int64_t in) {
  const int64_t blocks = in / 32;
  QuantizedRows out{std::vector<int8_t>(n * in), std::vector<float>(n * blocks),
                    std::vector<float>(n * blocks), std::vector<int32_t>(2 * n * blocks)};
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  // packs_epi32 then packs_epi16 leave the four 8-value parts' 4-byte groups in the order
  // 0.lo 1.lo 2.lo 3.lo 0.hi 1.hi 2.hi 3.hi; this puts them back in value order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // rows are independent: a prompt's many rows are split over the threads (a few rows are not
  // worth waking them for)
#pragma omp parallel for schedule(static) if (n * in >= (int64_t{1} << 14))
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + r * in + 32 * b;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(xb + 8 * k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[k]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float d = _mm_cvtss_f32(m4) / 127.0f;
      const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
      __m256i q[4];  // |q| <= 127: the packs below never saturate
      for (int k = 0; k < 4; ++k)
        q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], id),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i bytes = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
          order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + r * in + 32 * b), bytes);
      const int32_t first = hsum_epi32(_mm256_add_epi32(q[0], q[1]));
      const int32_t second = hsum_epi32(_mm256_add_epi32(q[2], q[3]));
      out.half_sums[2 * (r * blocks + b)] = first;
      out.half_sums[2 * (r * blocks + b) + 1] = second;
      out.scale[r * blocks + b] = d;
      out.sum[r * blocks + b] = d * static_cast<float>(first + second);
    }
  }
  return out;
}

inline __m256i nibbles(const uint8_t* qs) {  // 16 bytes -> 32 unsigned 4-bit values in order
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

// sum over 32 lanes of u8 a * s8 b, as 8 int32 lanes
inline __m256i dot_u8s8(__m256i a, __m256i b) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}

constexpr int64_t kTile = 4;  // activation rows per pass over a weight row

// Rows [r0, r0 + T) of y[:, o] for one weight row. Each row sums even and odd blocks into two
// accumulators (so consecutive blocks do not wait on each other), added at the end; the tile
// size T changes nothing in a row's arithmetic.
template <int T>
void q8_tile(int64_t type, const uint8_t* row, const QuantizedRows& xq, int64_t in, int64_t r0,
             float* y, int64_t ldy, int64_t o) {
  const int64_t blocks = in / 32, bb = block_bytes(type);
  __m256 acc[2][T];
  float extra[2][T];
  for (int t = 0; t < T; ++t) {
    acc[0][t] = acc[1][t] = _mm256_setzero_ps();
    extra[0][t] = extra[1][t] = 0.0f;
  }
  const int8_t* xbase = xq.q.data() + r0 * in;
  const float* scale = xq.scale.data() + r0 * blocks;
  const float* sum = xq.sum.data() + r0 * blocks;
  // one block into accumulator P (a compile-time index, so the accumulators stay in registers)
  auto block = [&](int64_t b, auto parity) __attribute__((always_inline)) {
    constexpr int P = decltype(parity)::value;
    const uint8_t* blk = row + b * bb;
    const float dw = half_to_float(blk);
    __m256i w;
    float offset;  // weight = dw * q + offset, summed against d_x * sum(q_x)
    if (type == Q8_0) {
      w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      offset = 0.0f;
    } else if (type == Q4_1) {
      w = nibbles(blk + 4);
      offset = half_to_float(blk + 2);
    } else {  // Q4_0: q - 8
      w = nibbles(blk + 2);
      offset = -8.0f * dw;
    }
    const __m256i w_abs = type == Q8_0 ? _mm256_sign_epi8(w, w) : w;
#pragma GCC unroll 16  // acc[t] in registers, not on the stack
    for (int t = 0; t < T; ++t) {
      __m256i x = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(xbase + t * in + 32 * b));
      if (type == Q8_0) x = _mm256_sign_epi8(x, w);  // |w| * (x * sign(w)) = w * x
      const __m256 products = _mm256_cvtepi32_ps(dot_u8s8(w_abs, x));
      acc[P][t] = _mm256_fmadd_ps(products, _mm256_set1_ps(dw * scale[t * blocks + b]),
                                  acc[P][t]);
      extra[P][t] += offset * sum[t * blocks + b];
    }
  };
  int64_t b = 0;
  for (; b + 1 < blocks; b += 2) {
    block(b, std::integral_constant<int, 0>());
    block(b + 1, std::integral_constant<int, 1>());
  }
  if (b < blocks) block(b, std::integral_constant<int, 0>());
  for (int t = 0; t < T; ++t) {
    y[(r0 + t) * ldy + o] =
        hsum(_mm256_add_ps(acc[0][t], acc[1][t])) + (extra[0][t] + extra[1][t]);
  }
}

void q8_rows(int64_t type, const uint8_t* row, const QuantizedRows& xq, int64_t in, int64_t r0,
             int64_t count, float* y, int64_t ldy, int64_t o) {
  switch (count) {
    case 1: return q8_tile<1>(type, row, xq, in, r0, y, ldy, o);
    case 2: return q8_tile<2>(type, row, xq, in, r0, y, ldy, o);
    case 3: return q8_tile<3>(type, row, xq, in, r0, y, ldy, o);
    default: return q8_tile<4>(type, row, xq, in, r0, y, ldy, o);
  }
}

bool has_q8_path(int64_t type) { return type == Q4_0 || type == Q4_1 || type == Q8_0; }

// y[r * ldy + o] = q8(x[r]) . w[o] for r < n, o < out
void matmul_q8(int64_t type, const uint8_t* wp, int64_t row_bytes, int64_t out,
               const QuantizedRows& xq, int64_t n, int64_t in, float* yp, int64_t ldy) {
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t r0 = 0; r0 < n; r0 += kTile) {
      q8_rows(type, wp + o * row_bytes, xq, in, r0, std::min(kTile, n - r0), yp, ldy, o);
    }
  }
}


}  // namespace
