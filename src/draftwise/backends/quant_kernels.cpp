// Matrix products on GGUF block-quantized weights, for the quant backend (backends/quant.py).
//
// y[r, o] = sum_i x[r, i] * w[o, i] with x in float32 and w stored as the GGUF stores it: each
// output row o is a run of blocks (32 weights for Q4_0/Q4_1/Q8_0, 256 for Q4_K/Q6_K) holding
// small integers and float16 scales. A block is decoded to float32 exactly as ggml dequantizes
// it, once per call, and used for every activation row.
//
// One accumulation order for every row count: each output is four float32 vector accumulators
// (8 lanes each) taking the 8-weight chunks of the row in turn (chunk c into accumulator c % 4),
// summed at the end in a fixed order. The row count, the thread count and which path runs (one
// row: decode into registers; several: decode into a buffer and stream the rows past it) change
// nothing in that order, so a row's result is bit-identical whether it is verified alone or in a
// tree of 64 rows.
//
// Built once per machine with -mavx2 -mfma plus the widest extension the CPU has (AVX-VNNI,
// AVX-512 VNNI, AMX tiles: quant.kernel_isa; torch.utils.cpp_extension, cached); the Python
// side checks the CPU has AVX2 and FMA before loading it.

#include <torch/extension.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>
#include <numeric>
#include <cmath>
#include <memory>

#include <sys/syscall.h>
#include <unistd.h>

namespace {

enum Type : int64_t { F32 = 0, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

int64_t block_weights(int64_t type) { return (type == Q4_K || type == Q6_K) ? 256 : 32; }

int64_t block_bytes(int64_t type) {
  switch (type) {
    case F32: return 128;  // dense rows, read as 32-float "blocks"
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q6_K: return 210;
  }
  return 0;
}

// 8 unsigned bytes -> 8 floats
inline __m256 bytes_to_floats(__m128i bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

// 8 signed bytes -> 8 floats
inline __m256 sbytes_to_floats(__m128i bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

// Decode one 32-weight block into v[0..3] (8 floats each, in weight order).
inline void decode32(int64_t type, const uint8_t* b, __m256 v[4]) {
  if (type == F32) {
    for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(reinterpret_cast<const float*>(b) + 8 * k);
    return;
  }
  if (type == Q5_0) {  // d, 32 high bits, 16 bytes of nibbles: w = d * ((nibble | bit << 4) - 16)
    const float d = half_to_float(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const uint8_t* qs = b + 6;
    alignas(32) float w[32];
    for (int j = 0; j < 16; ++j) {
      const int lo = static_cast<int>((qs[j] & 0xF) | (((qh >> j) & 1) << 4));
      const int hi = static_cast<int>((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
      w[j] = static_cast<float>(lo - 16) * d;
      w[j + 16] = static_cast<float>(hi - 16) * d;
    }
    for (int k = 0; k < 4; ++k) v[k] = _mm256_load_ps(w + 8 * k);
    return;
  }
  if (type == Q8_0) {
    const __m256 d = _mm256_set1_ps(half_to_float(b));
    for (int k = 0; k < 4; ++k) {
      __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * k));
      v[k] = _mm256_mul_ps(sbytes_to_floats(q), d);
    }
    return;
  }
  // Q4_0 / Q4_1: 16 bytes; weight j < 16 is the low nibble of byte j, weight j + 16 the high.
  const bool has_min = type == Q4_1;
  const uint8_t* qs = b + (has_min ? 4 : 2);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  const __m256 d = _mm256_set1_ps(half_to_float(b));
  __m256 q[4] = {bytes_to_floats(lo), bytes_to_floats(_mm_srli_si128(lo, 8)),
                 bytes_to_floats(hi), bytes_to_floats(_mm_srli_si128(hi, 8))};
  if (has_min) {
    const __m256 m = _mm256_set1_ps(half_to_float(b + 2));
    for (int k = 0; k < 4; ++k) v[k] = _mm256_fmadd_ps(q[k], d, m);  // d * q + m, one rounding
  } else {
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int k = 0; k < 4; ++k) v[k] = _mm256_mul_ps(_mm256_sub_ps(q[k], eight), d);
  }
}

// ggml's 6-bit scale and min of sub-block j of a Q4_K block
inline void scale_min_k4(int j, const uint8_t* s, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Decode one 256-weight block into out[0..255] (as ggml's dequantize_row_q4_K / q6_K).
inline void decode256(int64_t type, const uint8_t* b, float* out) {
  if (type == Q4_K) {
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* q = b + 16;
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int j = 0; j < 8; j += 2) {  // 64 weights: 32 low nibbles, then 32 high nibbles
      uint8_t sc, m;
      scale_min_k4(j, scales, &sc, &m);
      const __m256 d1 = _mm256_set1_ps(d * sc), m1 = _mm256_set1_ps(dmin * m);
      scale_min_k4(j + 1, scales, &sc, &m);
      const __m256 d2 = _mm256_set1_ps(d * sc), m2 = _mm256_set1_ps(dmin * m);
      for (int half = 0; half < 2; ++half) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * half));
        const __m128i lo = _mm_and_si128(raw, mask);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        float* o = out + 32 * j + 16 * half;
        _mm256_storeu_ps(o, _mm256_fmsub_ps(d1, bytes_to_floats(lo), m1));
        _mm256_storeu_ps(o + 8, _mm256_fmsub_ps(d1, bytes_to_floats(_mm_srli_si128(lo, 8)), m1));
        _mm256_storeu_ps(o + 32, _mm256_fmsub_ps(d2, bytes_to_floats(hi), m2));
        _mm256_storeu_ps(o + 40,
                         _mm256_fmsub_ps(d2, bytes_to_floats(_mm_srli_si128(hi, 8)), m2));
      }
      q += 32;
    }
    return;
  }
  // Q6_K: ql[128] low 4 bits, qh[64] high 2 bits, 16 int8 scales, then d. Per half (128
  // weights), byte l of ql/qh gives weights l, l+32, l+64, l+96 (l < 32): 32 at a time here.
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_to_float(b + 208);
  const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
  const __m256i bias = _mm256_set1_epi8(32);
  for (int n = 0; n < 256; n += 128) {
    const __m256i A = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
    const __m256i B = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
    const __m256i H = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
    auto high = [&](int shift) {  // ((H >> shift) & 3) << 4
      return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, shift), m2), 4);
    };
    const __m256i q[4] = {
        _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(A, m4), high(0)), bias),
        _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(B, m4), high(2)), bias),
        _mm256_sub_epi8(
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), m4), high(4)), bias),
        _mm256_sub_epi8(
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), m4), high(6)), bias),
    };
    for (int k = 0; k < 4; ++k) {  // weights n + 32k + l, scale sc[2k + l / 16]
      alignas(32) int8_t bytes[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(bytes), q[k]);
      for (int c = 0; c < 4; ++c) {  // 8 weights at a time
        const float scale = d * static_cast<float>(sc[2 * k + c / 2]);
        const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * c));
        _mm256_storeu_ps(out + n + 32 * k + 8 * c,
                         _mm256_mul_ps(_mm256_set1_ps(scale), sbytes_to_floats(eight)));
      }
    }
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

// One whole weight row into out[0..in).
void decode_row(int64_t type, const uint8_t* row, int64_t in, float* out) {
  const int64_t bw = block_weights(type), bb = block_bytes(type);
  for (int64_t blk = 0; blk < in / bw; ++blk) {
    if (bw == 32) {
      __m256 v[4];
      decode32(type, row + blk * bb, v);
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + 32 * blk + 8 * k, v[k]);
    } else {
      decode256(type, row + blk * bb, out + 256 * blk);
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float finish(__m256 a[4]) {
  return hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
}

// Dot products of two decoded weight rows with one activation row (chunk c -> accumulator c%4).
inline void dot2(const float* w0, const float* w1, const float* x, int64_t in, float* y0,
                 float* y1) {
  __m256 a[4], b[4];
  for (int k = 0; k < 4; ++k) a[k] = b[k] = _mm256_setzero_ps();
  for (int64_t i = 0; i < in; i += 32) {
    for (int k = 0; k < 4; ++k) {
      const __m256 xv = _mm256_loadu_ps(x + i + 8 * k);
      a[k] = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i + 8 * k), xv, a[k]);
      b[k] = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i + 8 * k), xv, b[k]);
    }
  }
  *y0 = finish(a);
  *y1 = finish(b);
}

// One activation row, one output: decode in registers, same order as dot2.
float dot_direct(int64_t type, const uint8_t* row, const float* x, int64_t in) {
  __m256 a[4];
  for (int k = 0; k < 4; ++k) a[k] = _mm256_setzero_ps();
  const int64_t bb = block_bytes(type);
  if (block_weights(type) == 32) {
    for (int64_t blk = 0; blk < in / 32; ++blk) {
      __m256 v[4];
      decode32(type, row + blk * bb, v);
      for (int k = 0; k < 4; ++k)
        a[k] = _mm256_fmadd_ps(v[k], _mm256_loadu_ps(x + 32 * blk + 8 * k), a[k]);
    }
  } else {
    alignas(32) float w[256];
    for (int64_t blk = 0; blk < in / 256; ++blk) {
      decode256(type, row + blk * bb, w);
      const float* xb = x + 256 * blk;
      for (int64_t i = 0; i < 256; i += 32)
        for (int k = 0; k < 4; ++k)
          a[k] = _mm256_fmadd_ps(_mm256_load_ps(w + i + 8 * k), _mm256_loadu_ps(xb + i + 8 * k),
                                 a[k]);
    }
  }
  return finish(a);
}

void check(const torch::Tensor& weight, int64_t type, int64_t in) {
  TORCH_CHECK(block_bytes(type) > 0, "quantized type ", type, " is not implemented");
  TORCH_CHECK(weight.dtype() == torch::kUInt8 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous uint8 [out, row_bytes] tensor");
  TORCH_CHECK(in % block_weights(type) == 0, "in_features must be a multiple of the block");
  TORCH_CHECK(weight.size(1) == in / block_weights(type) * block_bytes(type),
              "row bytes do not match in_features for this type");
}

}  // namespace

namespace {

// y[r * ldy + o] = x[r] . w[o] for r < n, o < out (float32 activations)
void matmul_f32(int64_t type, const uint8_t* wp, int64_t row_bytes, int64_t out, const float* xp,
                int64_t n, int64_t in, float* yp, int64_t ldy) {
  if (n == 1) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; ++o) yp[o] = dot_direct(type, wp + o * row_bytes, xp, in);
    return;
  }
#pragma omp parallel
  {
    std::vector<float> buffer(2 * in);
    float* w0 = buffer.data();
    float* w1 = w0 + in;
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < (out + 1) / 2; ++pair) {
      const int64_t o = 2 * pair;
      const bool two = o + 1 < out;
      decode_row(type, wp + o * row_bytes, in, w0);
      if (two) decode_row(type, wp + (o + 1) * row_bytes, in, w1);
      else std::memcpy(w1, w0, in * sizeof(float));
      for (int64_t r = 0; r < n; ++r) {
        float y0, y1;
        dot2(w0, w1, xp + r * in, in, &y0, &y1);
        yp[r * ldy + o] = y0;
        if (two) yp[r * ldy + o + 1] = y1;
      }
    }
  }
}

}  // namespace

// x: [n, in] float32; weight: [out, row_bytes] uint8 blocks -> [n, out] float32
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor weight, int64_t type, int64_t in) {
  check(weight, type, in);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == in,
              "x must be a float32 [n, in_features] tensor");
  x = x.contiguous();
  const int64_t n = x.size(0), out = weight.size(0);
  auto y = torch::empty({n, out}, x.options());
  matmul_f32(type, weight.data_ptr<uint8_t>(), weight.size(1), out, x.data_ptr<float>(), n, in,
             y.data_ptr<float>(), out);
  return y;
}

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


// ---- 8-bit activations on weights packed R output rows at a time ---------------------------
//
// The layout above asks one output row's blocks to be summed to one number, a horizontal sum per
// block. Packing R output rows together (as llama.cpp's repacked CPU formats do) turns each
// 32-bit lane of a vector into one output row, so a block's R integer dot products come out of
// the same instructions with no horizontal sums, and the R rows' scales load as one vector.
// R = 16 (one AVX-512 register of lanes) where the kernels are built for AVX-512, else 8. The
// packed block holds exactly the GGUF blocks' bytes, regrouped (the same size in memory):
//   Q4_0: half d[R],          uint8 q[4][4R]   q[k][4r + i] = qs_r[4k + i]
//   Q4_1: half d[R], m[R],    uint8 q[4][4R]   (low nibbles: weights 4k..4k+3 of row r,
//                                               high nibbles: weights 16+4k..16+4k+3)
//   Q8_0: half d[R],          int8  q[8][4R]   q[g][4r + i] = qs_r[4g + i]
// Each lane (output row) sums its blocks in block order:
//   acc = fma(float(integer dot), d_w * d_x, acc); acc = fma(m_w, d_x * sum(q_x), acc)
// with m_w = -8 d_w for Q4_0 and 0 for Q8_0 — per row, whatever the other rows or the tile.
// The integer dot products use VNNI (dpbusd) where the machine has it, else AVX2's
// maddubs + madd; all are exact integer sums, so every build gives the same bits.

constexpr int64_t kPacked = 100;  // packed type = kPacked + GGUF type

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr int64_t kRows = 16;
struct Vec {
  using I = __m512i;
  using F = __m512;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I low_nibbles(I p) { return _mm512_and_si512(p, _mm512_set1_epi8(0x0F)); }
  static I high_nibbles(I p) {
    return _mm512_and_si512(_mm512_srli_epi16(p, 4), _mm512_set1_epi8(0x0F));
  }
  static I dot_u4(I sum, I w, I x) { return _mm512_dpbusd_epi32(sum, w, x); }
  // dot_u4 with x = the 4 bytes at p broadcast by the instruction itself ({1to16}): GCC does
  // not fold _mm512_set1_epi32 into vpdpbusd, and the separate broadcasts were a third of the
  // instructions of a 4-bit block's product (4-8 rows: 2-5% of a step)
  static I dot_u4_at(I sum, I w, const uint8_t* p) {
    using Word = int32_t __attribute__((may_alias));
    asm("vpdpbusd %2%{1to16%}, %1, %0"
        : "+v"(sum)
        : "v"(w), "m"(*reinterpret_cast<const Word*>(p)));
    return sum;
  }
  static I dot_s8(I sum, I w, I x) {  // |w| * (x * sign(w)) = w * x
    const __mmask64 negative = _mm512_movepi8_mask(w);
    const I xs = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
    return _mm512_dpbusd_epi32(sum, _mm512_abs_epi8(w), xs);
  }
  static I zero() { return _mm512_setzero_si512(); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static F halves(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F fzero() { return _mm512_setzero_ps(); }
  static F fset1(float v) { return _mm512_set1_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static F u8s(const uint8_t* p) {  // R unsigned bytes -> R floats
    return _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I shr(I a, int bits) { return _mm512_srl_epi16(a, _mm_cvtsi32_si128(bits)); }
  static I shl4(I a) { return _mm512_slli_epi16(a, 4); }
  static I shr32(I a, int bits) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(bits)); }
  static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static F s8s(const int8_t* p) {  // R signed bytes -> R floats
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#else
constexpr int64_t kRows = 8;
struct Vec {
  using I = __m256i;
  using F = __m256;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I low_nibbles(I p) { return _mm256_and_si256(p, _mm256_set1_epi8(0x0F)); }
  static I high_nibbles(I p) {
    return _mm256_and_si256(_mm256_srli_epi16(p, 4), _mm256_set1_epi8(0x0F));
  }
  static I dot_u4(I sum, I w, I x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(sum, w, x);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(sum, w, x);
#else
    return _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x),
                                                   _mm256_set1_epi16(1)));
#endif
  }
  static I dot_s8(I sum, I w, I x) {  // |w| * (x * sign(w)) = w * x
    return dot_u4(sum, _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  }
  static I dot_u4_at(I sum, I w, const uint8_t* p) {
    int32_t four;
    std::memcpy(&four, p, 4);
    return dot_u4(sum, w, set1(four));
  }
  static I zero() { return _mm256_setzero_si256(); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static F halves(const uint8_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F fzero() { return _mm256_setzero_ps(); }
  static F fset1(float v) { return _mm256_set1_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F u8s(const uint8_t* p) {  // R unsigned bytes -> R floats
    return _mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I shr(I a, int bits) { return _mm256_srl_epi16(a, _mm_cvtsi32_si128(bits)); }
  static I shl4(I a) { return _mm256_slli_epi16(a, 4); }
  static I shr32(I a, int bits) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(bits)); }
  static I mullo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static F s8s(const int8_t* p) {  // R signed bytes -> R floats
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};
#endif

// bytes of one packed block (one 256-weight super-block for Q4_K, with its 6-bit scales and
// mins unpacked to bytes: 148 bytes per row where the GGUF has 144)
int64_t packed_stride(int64_t type) {
  return type == Q4_K ? kRows * 148 : kRows * block_bytes(type);
}

bool packable(int64_t type) {
  return has_q8_path(type) || type == Q5_0 || type == Q4_K || type == Q6_K;
}

// offsets inside a packed block: scales, mins (Q4_1), quants
constexpr int64_t kScales = 0, kMins = 2 * kRows;
inline int64_t quants_at(int64_t type) { return (type == Q4_1 ? 4 : 2) * kRows; }

// The 8 four-weight groups of one 32-weight block against one activation row's block, as four
// independent integer chains (integer sums: any grouping gives the same bits). ``kHalves``:
// chains 0-1 take weights 0..15 and chains 2-3 weights 16..31 (Q6_K's 16-weight scales); else
// group g goes to chain g % 4. ``kSigned``: w is int8 (Q8_0), else unsigned (nibbles, 5/6 bits).
template <bool kSigned, bool kHalves>
__attribute__((always_inline)) inline void group_dots(const typename Vec::I w[8], const int8_t* xb,
                                                      typename Vec::I part[4]) {
  for (int c = 0; c < 4; ++c) part[c] = Vec::zero();
  for (int g = 0; g < 8; ++g) {
    const int c = kHalves ? g % 2 + 2 * (g / 4) : g % 4;
    const uint8_t* four = reinterpret_cast<const uint8_t*>(xb) + 4 * g;
    if (!kSigned) {
      part[c] = Vec::dot_u4_at(part[c], w[g], four);
    } else {
      int32_t x;
      std::memcpy(&x, four, 4);
      part[c] = Vec::dot_s8(part[c], w[g], Vec::set1(x));
    }
  }
}

template <bool kSigned>
__attribute__((always_inline)) inline typename Vec::I block_dot(const typename Vec::I w[8],
                                                                const int8_t* xb) {
  typename Vec::I part[4];
  group_dots<kSigned, false>(w, xb, part);
  return Vec::add(Vec::add(part[0], part[1]), Vec::add(part[2], part[3]));
}

// Weights stream from memory once per step (a model is larger than the cache a core may use),
// and one row's products are too few operations to hide a miss: the first row pass over each
// block asks for the bytes ``prefetch_bytes`` ahead, so several lines are in flight per core
// rather than the one the current block waits on. Within a thread's run of groups the packed
// blocks are contiguous, so the lines ahead are the next ones it reads (past a matrix's end
// they are only wasted: a prefetch never faults). No arithmetic changes.
int64_t prefetch_bytes = 4096;
inline void prefetch_block(const uint8_t* blk, int64_t stride) {
  for (int64_t at = 0; at < stride; at += 64)
    _mm_prefetch(reinterpret_cast<const char*>(blk + prefetch_bytes + at), _MM_HINT_T0);
}

template <int T>
void packed_tile(int64_t type, const uint8_t* group, const QuantizedRows& xq, int64_t in,
                 int64_t r0, float* y, int64_t ldy, int64_t o0, bool fetch) {
  const int64_t blocks = in / 32, stride = packed_stride(type), lane_bytes = 4 * kRows;
  typename Vec::F acc[T];
  for (int t = 0; t < T; ++t) acc[t] = Vec::fzero();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = group + b * stride;
    if (fetch) prefetch_block(blk, stride);
    const typename Vec::F dw = Vec::halves(blk + kScales);
    typename Vec::F mw = Vec::fzero();
    typename Vec::I w[8];
    const uint8_t* q = blk + quants_at(type);
    if (type == Q8_0) {
      for (int g = 0; g < 8; ++g) w[g] = Vec::load(q + lane_bytes * g);
    } else {
      mw = type == Q4_1 ? Vec::halves(blk + kMins) : Vec::mul(dw, Vec::fset1(-8.0f));
      for (int k = 0; k < 4; ++k) {
        const typename Vec::I p = Vec::load(q + lane_bytes * k);
        w[k] = Vec::low_nibbles(p);
        w[k + 4] = Vec::high_nibbles(p);
      }
    }
#pragma GCC unroll 16  // acc[t] in registers, not on the stack
    for (int t = 0; t < T; ++t) {
      const int64_t r = r0 + t;
      const int8_t* xb = xq.q.data() + r * in + 32 * b;
      const typename Vec::I dot = type == Q8_0 ? block_dot<true>(w, xb) : block_dot<false>(w, xb);
      const typename Vec::F dx = Vec::fset1(xq.scale[r * blocks + b]);
      acc[t] = Vec::fma(Vec::to_float(dot), Vec::mul(dw, dx), acc[t]);
      if (type != Q8_0) acc[t] = Vec::fma(mw, Vec::fset1(xq.sum[r * blocks + b]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) Vec::store(y + (r0 + t) * ldy + o0, acc[t]);
}

// Q4_K, packed per super-block: half d[R], dmin[R], uint8 sc[8][R], m[8][R], then for each
// pair j of 32-weight sub-blocks uint8 q[8][4R] with q[k][4r + i] = qs_r[32j + 4k + i] (low
// nibbles: sub-block 2j, high: 2j + 1). Sub-block s of row r weighs w = d1 q - m1 with
// d1 = d sc[s] and m1 = dmin m[s] in float32, as ggml decodes it, against the 32-value
// activation block it covers: acc = fma(float(dot), d1 d_x, acc); acc -= m1 d_x sum(q_x).
template <int T>
void packed_tile_q4k(const uint8_t* group, const QuantizedRows& xq, int64_t in, int64_t r0,
                     float* y, int64_t ldy, int64_t o0, bool fetch) {
  const int64_t supers = in / 256, blocks = in / 32, stride = packed_stride(Q4_K);
  const int64_t lane_bytes = 4 * kRows;
  typename Vec::F acc[T];
  for (int t = 0; t < T; ++t) acc[t] = Vec::fzero();
  for (int64_t sb = 0; sb < supers; ++sb) {
    const uint8_t* blk = group + sb * stride;
    if (fetch) prefetch_block(blk, stride);
    const typename Vec::F d = Vec::halves(blk), dmin = Vec::halves(blk + 2 * kRows);
    const uint8_t* sc = blk + 4 * kRows;
    const uint8_t* mn = blk + 12 * kRows;
    const uint8_t* q = blk + 20 * kRows;
    for (int s = 0; s < 8; ++s) {
      const typename Vec::F d1 = Vec::mul(d, Vec::u8s(sc + s * kRows));
      const typename Vec::F m1 = Vec::mul(dmin, Vec::u8s(mn + s * kRows));
      typename Vec::I w[8];
      const uint8_t* pair = q + (s / 2) * 8 * lane_bytes;
      for (int k = 0; k < 8; ++k) {
        const typename Vec::I p = Vec::load(pair + lane_bytes * k);
        w[k] = s % 2 ? Vec::high_nibbles(p) : Vec::low_nibbles(p);
      }
      const int64_t b = 8 * sb + s;  // the activation block
#pragma GCC unroll 16  // acc[t] in registers, not on the stack
      for (int t = 0; t < T; ++t) {
        const int64_t r = r0 + t;
        const int8_t* xb = xq.q.data() + r * in + 32 * b;
        const typename Vec::I dot = block_dot<false>(w, xb);
        acc[t] = Vec::fma(Vec::to_float(dot), Vec::mul(d1, Vec::fset1(xq.scale[r * blocks + b])),
                          acc[t]);
        acc[t] = Vec::fnma(m1, Vec::fset1(xq.sum[r * blocks + b]), acc[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) Vec::store(y + (r0 + t) * ldy + o0, acc[t]);
}

// Q6_K, packed per super-block: half d[R], int8 sc[16][R], then per 128-weight half n the
// bytes ql[n*64 + 4k..], ql[n*64 + 32 + 4k..] and qh[n*32 + 4k..] of every row as
// A[8][4R], B[8][4R], H[8][4R] (k = 0..7). 32-weight block c of half n is
// q = (A or B nibble) | (2 bits of H) << 4, minus 32; its first and last 16 weights have scales
// d sc[8n + 2c] and d sc[8n + 2c + 1]. Per 16 weights: integer dot of q (0..63) with q_x, less
// 32 sum(q_x) (exact), then acc = fma(float(that), d sc d_x, acc).
template <int T>
void packed_tile_q6k(const uint8_t* group, const QuantizedRows& xq, int64_t in, int64_t r0,
                     float* y, int64_t ldy, int64_t o0, bool fetch) {
  const int64_t supers = in / 256, blocks = in / 32, stride = packed_stride(Q6_K);
  const int64_t lane_bytes = 4 * kRows;
  typename Vec::F acc[T];
  for (int t = 0; t < T; ++t) acc[t] = Vec::fzero();
  const typename Vec::I two = Vec::set1(0x03030303);
  for (int64_t sb = 0; sb < supers; ++sb) {
    const uint8_t* blk = group + sb * stride;
    if (fetch) prefetch_block(blk, stride);
    const typename Vec::F d = Vec::halves(blk);
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 2 * kRows);
    for (int n = 0; n < 2; ++n) {
      const uint8_t* A = blk + 18 * kRows + n * 96 * kRows;
      const uint8_t* B = A + 8 * lane_bytes;
      const uint8_t* H = B + 8 * lane_bytes;
      for (int c = 0; c < 4; ++c) {
        typename Vec::I w[8];
        for (int k = 0; k < 8; ++k) {
          const typename Vec::I low = Vec::load((c % 2 ? B : A) + lane_bytes * k);
          const typename Vec::I nib = c < 2 ? Vec::low_nibbles(low) : Vec::high_nibbles(low);
          const typename Vec::I h = Vec::load(H + lane_bytes * k);
          w[k] = Vec::or_(nib, Vec::shl4(Vec::and_(Vec::shr(h, 2 * c), two)));
        }
        const typename Vec::F d_a = Vec::mul(d, Vec::s8s(sc + (8 * n + 2 * c) * kRows));
        const typename Vec::F d_b = Vec::mul(d, Vec::s8s(sc + (8 * n + 2 * c + 1) * kRows));
        const int64_t b = 8 * sb + 4 * n + c;  // the activation block
#pragma GCC unroll 16  // acc[t] in registers, not on the stack
        for (int t = 0; t < T; ++t) {
          const int64_t r = r0 + t;
          const int8_t* xb = xq.q.data() + r * in + 32 * b;
          typename Vec::I part[4];
          group_dots<false, true>(w, xb, part);
          const int32_t* halves = xq.half_sums.data() + 2 * (r * blocks + b);
          const typename Vec::I dot_a =
              Vec::sub(Vec::add(part[0], part[1]), Vec::set1(32 * halves[0]));
          const typename Vec::I dot_b =
              Vec::sub(Vec::add(part[2], part[3]), Vec::set1(32 * halves[1]));
          const typename Vec::F dx = Vec::fset1(xq.scale[r * blocks + b]);
          acc[t] = Vec::fma(Vec::to_float(dot_a), Vec::mul(d_a, dx), acc[t]);
          acc[t] = Vec::fma(Vec::to_float(dot_b), Vec::mul(d_b, dx), acc[t]);
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) Vec::store(y + (r0 + t) * ldy + o0, acc[t]);
}

// Q5_0, packed: half d[R], uint32 qh[R], uint8 q[4][4R] laid out as Q4_0's. Group g (weights
// 4g..4g+3) of lane r is its nibbles plus bits 4g..4g+3 of qh_r, each moved to bit 4 of its byte
// (t * 0x00204081 spreads 4 bits to the low bit of 4 bytes, no carries); q - 16 in integers.
template <int T>
void packed_tile_q5(const uint8_t* group, const QuantizedRows& xq, int64_t in, int64_t r0,
                    float* y, int64_t ldy, int64_t o0, bool fetch) {
  const int64_t blocks = in / 32, stride = packed_stride(Q5_0), lane_bytes = 4 * kRows;
  typename Vec::F acc[T];
  for (int t = 0; t < T; ++t) acc[t] = Vec::fzero();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = group + b * stride;
    if (fetch) prefetch_block(blk, stride);
    const typename Vec::F dw = Vec::halves(blk);
    const typename Vec::I qh = Vec::load(blk + 2 * kRows);
    const uint8_t* q = blk + 6 * kRows;
    typename Vec::I w[8];
    for (int k = 0; k < 4; ++k) {
      const typename Vec::I p = Vec::load(q + lane_bytes * k);
      w[k] = Vec::low_nibbles(p);
      w[k + 4] = Vec::high_nibbles(p);
    }
    for (int g = 0; g < 8; ++g) {
      const typename Vec::I bits = Vec::and_(Vec::shr32(qh, 4 * g), Vec::set1(0xF));
      const typename Vec::I spread =
          Vec::and_(Vec::mullo(bits, Vec::set1(0x00204081)), Vec::set1(0x01010101));
      w[g] = Vec::or_(w[g], Vec::shl4(spread));
    }
#pragma GCC unroll 16  // acc[t] in registers, not on the stack
    for (int t = 0; t < T; ++t) {
      const int64_t r = r0 + t;
      const int8_t* xb = xq.q.data() + r * in + 32 * b;
      const int32_t* halves = xq.half_sums.data() + 2 * (r * blocks + b);
      const typename Vec::I dot =
          Vec::sub(block_dot<false>(w, xb), Vec::set1(16 * (halves[0] + halves[1])));
      acc[t] = Vec::fma(Vec::to_float(dot), Vec::mul(dw, Vec::fset1(xq.scale[r * blocks + b])),
                        acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) Vec::store(y + (r0 + t) * ldy + o0, acc[t]);
}

// ---- AMX tiles (Sapphire Rapids and later) for many rows ------------------------------------
//
// The packed layout above is exactly what AMX's tile multiply reads as its right operand: for
// one 32-weight block of R = 16 output rows, eight rows of 64 bytes, row g holding the four
// weights 4g..4g+3 of each output row (Q8_0 as stored; Q4_0/Q4_1 after splitting the low and
// high nibbles into rows 0-3 and 4-7). One TDPBSSD/TDPBSUD multiplies up to 16 activation rows'
// 32 int8 values (the left operand, read straight from the quantized rows) into a 16 x 16 tile
// of int32 block dot products — the same exact integers the VNNI path sums — and each row's
// lane vector then takes them in block order with the same float32 operations as packed_tile.
// So an AMX result is bit-identical to the VNNI one: the path is a speed choice, never a
// numerical one. Linux hands out tile state only on request (arch_prctl), once per process;
// without it the VNNI path runs.
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
constexpr bool kAmxBuild = true;

bool amx_granted() {
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-1: int32 results (M x 16), 2-3: activations (M x 32 bytes), 4-5: weights (8 x 64)
void configure_tiles(int M) {
  TileConfig c;
  for (int t = 0; t < 2; ++t) {
    c.rows[t] = static_cast<uint8_t>(M), c.colsb[t] = 64;
    c.rows[2 + t] = static_cast<uint8_t>(M), c.colsb[2 + t] = 32;
    c.rows[4 + t] = 8, c.colsb[4 + t] = 64;
  }
  // as an asm with the struct as its operand: GCC 12 may drop the stores before the builtin
  asm volatile("ldtilecfg %0" : : "m"(c));
}

// the 8 x 64-byte right operands of a group's blocks, in block order: Q8_0's packed blocks as
// they are (stride packed_stride), the 4-bit types' nibbles split into a buffer first (stride
// 512; all blocks at once, so no tile load waits on the stores that wrote it)
inline const uint8_t* tile_weights(int64_t type, const uint8_t* group, int64_t blocks,
                                   std::vector<uint8_t>& buffer, int64_t* stride) {
  if (type == Q8_0) {
    *stride = packed_stride(type);
    return group + quants_at(type);
  }
  buffer.resize(512 * blocks + 64);
  uint8_t* out = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64;
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_block(group + b * packed_stride(type), packed_stride(type));
    const uint8_t* q = group + b * packed_stride(type) + quants_at(type);
    for (int k = 0; k < 4; ++k) {
      const Vec::I p = Vec::load(q + 64 * k);
      _mm512_store_si512(out + 512 * b + 64 * k, Vec::low_nibbles(p));
      _mm512_store_si512(out + 512 * b + 64 * (k + 4), Vec::high_nibbles(p));
    }
  }
  *stride = 512;
  return out;
}

// rows [r0, r0 + M) of one 16-output group, M <= 16; the tile configuration is for M rows.
// Blocks go through the tiles two at a time (results in tiles 0 and 1), and the next two are
// issued before this pair's results are scaled, so the tile unit and the vector unit overlap.
// `w`, `wstride`: the group's right operands from tile_weights.
void amx_tile(int64_t type, const uint8_t* group, const uint8_t* w, int64_t wstride,
              const QuantizedRows& xq, int64_t in, int64_t r0, int M, float* y, int64_t ldy,
              int64_t o0) {
  const int64_t blocks = in / 32, stride = packed_stride(type);
  alignas(64) int32_t products[2][2][256];  // [pair parity][block of the pair][row * 16 + lane]
  const int8_t* x0 = xq.q.data() + r0 * in;
  auto issue = [&](int64_t b, int32_t (*out)[256]) {
    _tile_loadd(2, x0 + 32 * b, in);
    _tile_loadd(4, w + b * wstride, 64);
    _tile_zero(0);
    if (type == Q8_0) _tile_dpbssd(0, 2, 4); else _tile_dpbsud(0, 2, 4);
    if (b + 1 < blocks) {
      _tile_loadd(3, x0 + 32 * (b + 1), in);
      _tile_loadd(5, w + (b + 1) * wstride, 64);
      _tile_zero(1);
      if (type == Q8_0) _tile_dpbssd(1, 3, 5); else _tile_dpbsud(1, 3, 5);
    }
    _tile_stored(0, out[0], 64);
    if (b + 1 < blocks) _tile_stored(1, out[1], 64);
  };
  Vec::F acc[16];
  for (int t = 0; t < M; ++t) acc[t] = Vec::fzero();
  issue(0, products[0]);
  for (int64_t b = 0; b < blocks; b += 2) {
    const int parity = static_cast<int>((b / 2) % 2);
    // (the 4-bit types' blocks were read, and so fetched, by tile_weights' nibble split)
    if (r0 == 0 && type == Q8_0) prefetch_block(group + b * stride, 2 * stride);
    if (b + 2 < blocks) issue(b + 2, products[1 - parity]);
    for (int64_t j = 0; j < 2 && b + j < blocks; ++j) {  // packed_tile's operations, row by row
      const uint8_t* blk = group + (b + j) * stride;
      const Vec::F dw = Vec::halves(blk + kScales);
      const Vec::F mw = type == Q8_0   ? Vec::fzero()
                        : type == Q4_1 ? Vec::halves(blk + kMins)
                                       : Vec::mul(dw, Vec::fset1(-8.0f));
      const int32_t* dots = products[parity][j];
      for (int t = 0; t < M; ++t) {
        const int64_t at = (r0 + t) * blocks + b + j;
        const Vec::I dot = _mm512_load_si512(dots + 16 * t);
        acc[t] = Vec::fma(Vec::to_float(dot), Vec::mul(dw, Vec::fset1(xq.scale[at])), acc[t]);
        if (type != Q8_0) acc[t] = Vec::fma(mw, Vec::fset1(xq.sum[at]), acc[t]);
      }
    }
  }
  for (int t = 0; t < M; ++t) Vec::store(y + (r0 + t) * ldy + o0, acc[t]);
}
#else
constexpr bool kAmxBuild = false;
bool amx_granted() { return false; }
void configure_tiles(int) {}
inline const uint8_t* tile_weights(int64_t, const uint8_t*, int64_t, std::vector<uint8_t>&,
                                   int64_t*) { return nullptr; }
void amx_tile(int64_t, const uint8_t*, const uint8_t*, int64_t, const QuantizedRows&, int64_t,
              int64_t, int, float*, int64_t, int64_t) {}
#endif

// The fewest rows for which the tiles beat the VNNI path, measured on a Sapphire Rapids class
// Xeon (2 cores): 4 for Q8_0 (the LM head: 1.5x at 8 rows, 2.8x at 16); four times that for the
// 4-bit types, whose nibbles are split into a buffer first and whose per-block scaling leaves
// the tiles little to win below a full tile (whole decoder: slower at 8 rows, 1.2x at 16).
int64_t amx_min_rows = 4;

template <int T>
inline void any_tile(int64_t type, const uint8_t* group, const QuantizedRows& xq, int64_t in,
                     int64_t r0, float* y, int64_t ldy, int64_t o0) {
  const bool fetch = r0 == 0;  // the first pass over the group's blocks
  if (type == Q5_0) return packed_tile_q5<T>(group, xq, in, r0, y, ldy, o0, fetch);
  if (type == Q4_K) return packed_tile_q4k<T>(group, xq, in, r0, y, ldy, o0, fetch);
  if (type == Q6_K) return packed_tile_q6k<T>(group, xq, in, r0, y, ldy, o0, fetch);
  packed_tile<T>(type, group, xq, in, r0, y, ldy, o0, fetch);
}

void matmul_packed(int64_t type, const uint8_t* wp, int64_t out, const QuantizedRows& xq,
                   int64_t n, int64_t in, float* yp, int64_t ldy) {
  const int64_t group_bytes = (in / block_weights(type)) * packed_stride(type);
  const int64_t tile_rows = type == Q8_0 ? amx_min_rows : 4 * amx_min_rows;
  if (kAmxBuild && has_q8_path(type) && n >= tile_rows && amx_granted()) {
    // up to 16 rows: one tile of n rows; more: tiles of 16, the rest on the VNNI path
    const int M = static_cast<int>(std::min<int64_t>(n, 16));
    const int64_t tiled = n <= 16 ? n : n / 16 * 16;
#pragma omp parallel
    {
      configure_tiles(M);
      std::vector<uint8_t> buffer;
#pragma omp for schedule(static)
      for (int64_t g = 0; g < out / kRows; ++g) {
        const uint8_t* group = wp + g * group_bytes;
        int64_t wstride = 0;
        const uint8_t* w = tile_weights(type, group, in / 32, buffer, &wstride);
        for (int64_t r0 = 0; r0 < tiled; r0 += M)
          amx_tile(type, group, w, wstride, xq, in, r0, M, yp, ldy, kRows * g);
        int64_t r0 = tiled;
        for (; r0 + 8 <= n; r0 += 8) any_tile<8>(type, group, xq, in, r0, yp, ldy, kRows * g);
        for (; r0 < n; ++r0) any_tile<1>(type, group, xq, in, r0, yp, ldy, kRows * g);
      }
#if defined(__AMX_TILE__)
      _tile_release();
#endif
    }
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < out / kRows; ++g) {
    const uint8_t* group = wp + g * group_bytes;
    const int64_t o0 = kRows * g;
    int64_t r0 = 0;
    if (kRows == 16) {  // 32 vector registers: weights stay put for 8 activation rows
      for (; r0 + 8 <= n; r0 += 8) any_tile<8>(type, group, xq, in, r0, yp, ldy, o0);
    }
    for (; r0 + 4 <= n; r0 += 4) any_tile<4>(type, group, xq, in, r0, yp, ldy, o0);
    switch (n - r0) {
      case 3: any_tile<3>(type, group, xq, in, r0, yp, ldy, o0); break;
      case 2: any_tile<2>(type, group, xq, in, r0, yp, ldy, o0); break;
      case 1: any_tile<1>(type, group, xq, in, r0, yp, ldy, o0); break;
      default: break;
    }
  }
}

// one row of a packed matrix, decoded to float32 (as ggml dequantizes the original block)
void decode_packed_row(int64_t type, const uint8_t* wp, int64_t o, int64_t in, float* out) {
  const int64_t r = o % kRows;
  if (type == Q4_K) {
    const int64_t supers = in / 256, stride = packed_stride(type);
    const uint8_t* group = wp + (o / kRows) * supers * stride;
    for (int64_t sb = 0; sb < supers; ++sb) {
      const uint8_t* blk = group + sb * stride;
      const float d = half_to_float(blk + 2 * r), dmin = half_to_float(blk + 2 * kRows + 2 * r);
      const uint8_t* q = blk + 20 * kRows;
      for (int s = 0; s < 8; ++s) {
        const float d1 = d * blk[4 * kRows + s * kRows + r];
        const float m1 = dmin * blk[12 * kRows + s * kRows + r];
        for (int l = 0; l < 32; ++l) {
          const uint8_t byte = q[(s / 2) * 32 * kRows + (l / 4) * 4 * kRows + 4 * r + l % 4];
          const float nib = static_cast<float>(s % 2 ? byte >> 4 : byte & 0xF);
          out[256 * sb + 32 * s + l] = std::fma(d1, nib, -m1);  // as decode256: one rounding
        }
      }
    }
    return;
  }
  if (type == Q5_0) {
    const int64_t blocks = in / 32, stride = packed_stride(type);
    const uint8_t* group = wp + (o / kRows) * blocks * stride;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* blk = group + b * stride;
      uint8_t original[22];  // rebuild the GGUF block, decode it as decode32 does
      std::memcpy(original, blk + 2 * r, 2);
      std::memcpy(original + 2, blk + 2 * kRows + 4 * r, 4);
      for (int k = 0; k < 4; ++k)
        std::memcpy(original + 6 + 4 * k, blk + 6 * kRows + 4 * kRows * k + 4 * r, 4);
      __m256 v[4];
      decode32(Q5_0, original, v);
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + 32 * b + 8 * k, v[k]);
    }
    return;
  }
  if (type == Q6_K) {
    const int64_t supers = in / 256, stride = packed_stride(type);
    const uint8_t* group = wp + (o / kRows) * supers * stride;
    for (int64_t sb = 0; sb < supers; ++sb) {
      const uint8_t* blk = group + sb * stride;
      const float d = half_to_float(blk + 2 * r);
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 2 * kRows);
      for (int n = 0; n < 2; ++n) {
        const uint8_t* A = blk + 18 * kRows + n * 96 * kRows;
        const uint8_t* B = A + 32 * kRows;
        const uint8_t* H = B + 32 * kRows;
        for (int c = 0; c < 4; ++c) {
          for (int l = 0; l < 32; ++l) {
            const int64_t at = (l / 4) * 4 * kRows + 4 * r + l % 4;
            const uint8_t low = (c % 2 ? B : A)[at];
            const int nib = c < 2 ? (low & 0xF) : (low >> 4);
            const int q = (nib | (((H[at] >> (2 * c)) & 3) << 4)) - 32;
            const float scale = d * static_cast<float>(sc[(8 * n + 2 * c + l / 16) * kRows + r]);
            out[256 * sb + 128 * n + 32 * c + l] = scale * static_cast<float>(q);
          }
        }
      }
    }
    return;
  }
  const int64_t blocks = in / 32, stride = packed_stride(type);
  const uint8_t* group = wp + (o / kRows) * blocks * stride;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = group + b * stride;
    const uint8_t* q = blk + quants_at(type);
    const float d = half_to_float(blk + kScales + 2 * r);
    for (int j = 0; j < 32; ++j) {
      const int g = j / 4, i = j % 4;
      float v;
      if (type == Q8_0) {
        v = d * static_cast<float>(static_cast<int8_t>(q[4 * kRows * g + 4 * r + i]));
      } else {
        const uint8_t byte = q[4 * kRows * (g % 4) + 4 * r + i];
        const int nib = g < 4 ? (byte & 0xF) : (byte >> 4);
        v = type == Q4_1
                ? std::fma(static_cast<float>(nib), d, half_to_float(blk + kMins + 2 * r))
                : (static_cast<float>(nib) - 8.0f) * d;
      }
      out[32 * b + j] = v;
    }
  }
}

}  // namespace

torch::Tensor pack_q4k(torch::Tensor weight, int64_t in) {
  const int64_t out = weight.size(0), row_bytes = weight.size(1), supers = in / 256;
  const int64_t stride = packed_stride(Q4_K);
  auto packed = torch::empty({out / kRows, supers * stride}, weight.options());
  const uint8_t* src = weight.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  for (int64_t g = 0; g < out / kRows; ++g) {
    for (int64_t sb = 0; sb < supers; ++sb) {
      uint8_t* blk = dst + (g * supers + sb) * stride;
      for (int64_t r = 0; r < kRows; ++r) {
        const uint8_t* orig = src + (kRows * g + r) * row_bytes + sb * 144;
        std::memcpy(blk + 2 * r, orig, 2);                  // d
        std::memcpy(blk + 2 * kRows + 2 * r, orig + 2, 2);  // dmin
        for (int s = 0; s < 8; ++s) {
          uint8_t sc, m;
          scale_min_k4(s, orig + 4, &sc, &m);
          blk[4 * kRows + s * kRows + r] = sc;
          blk[12 * kRows + s * kRows + r] = m;
        }
        const uint8_t* qs = orig + 16;
        uint8_t* q = blk + 20 * kRows;
        for (int64_t c = 0; c < 32; ++c)  // 4-byte groups: pair c / 8, group c % 8
          std::memcpy(q + 4 * kRows * c + 4 * r, qs + 4 * c, 4);
      }
    }
  }
  return packed;
}

torch::Tensor pack_q5(torch::Tensor weight, int64_t in) {
  const int64_t out = weight.size(0), row_bytes = weight.size(1), blocks = in / 32;
  const int64_t stride = packed_stride(Q5_0);
  auto packed = torch::empty({out / kRows, blocks * stride}, weight.options());
  const uint8_t* src = weight.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  for (int64_t g = 0; g < out / kRows; ++g) {
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* blk = dst + (g * blocks + b) * stride;
      for (int64_t r = 0; r < kRows; ++r) {
        const uint8_t* orig = src + (kRows * g + r) * row_bytes + b * 22;
        std::memcpy(blk + 2 * r, orig, 2);                  // d
        std::memcpy(blk + 2 * kRows + 4 * r, orig + 2, 4);  // qh
        for (int64_t k = 0; k < 4; ++k)
          std::memcpy(blk + 6 * kRows + 4 * kRows * k + 4 * r, orig + 6 + 4 * k, 4);
      }
    }
  }
  return packed;
}

torch::Tensor pack_q6k(torch::Tensor weight, int64_t in) {
  const int64_t out = weight.size(0), row_bytes = weight.size(1), supers = in / 256;
  const int64_t stride = packed_stride(Q6_K);
  auto packed = torch::empty({out / kRows, supers * stride}, weight.options());
  const uint8_t* src = weight.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  for (int64_t g = 0; g < out / kRows; ++g) {
    for (int64_t sb = 0; sb < supers; ++sb) {
      uint8_t* blk = dst + (g * supers + sb) * stride;
      for (int64_t r = 0; r < kRows; ++r) {
        const uint8_t* orig = src + (kRows * g + r) * row_bytes + sb * 210;
        std::memcpy(blk + 2 * r, orig + 208, 2);  // d
        for (int s = 0; s < 16; ++s) blk[2 * kRows + s * kRows + r] = orig[192 + s];
        for (int n = 0; n < 2; ++n) {
          uint8_t* A = blk + 18 * kRows + n * 96 * kRows;
          uint8_t* B = A + 32 * kRows;
          uint8_t* H = B + 32 * kRows;
          for (int k = 0; k < 8; ++k) {
            std::memcpy(A + 4 * kRows * k + 4 * r, orig + 64 * n + 4 * k, 4);
            std::memcpy(B + 4 * kRows * k + 4 * r, orig + 64 * n + 32 + 4 * k, 4);
            std::memcpy(H + 4 * kRows * k + 4 * r, orig + 128 + 32 * n + 4 * k, 4);
          }
        }
      }
    }
  }
  return packed;
}

// GGUF blocks [out, row_bytes] (Q4_0/Q4_1/Q8_0/Q4_K/Q6_K, out % rows_per_pack() == 0) -> the packed
// layout (the same bytes regrouped; Q4_K's 6-bit scales unpacked to bytes)
torch::Tensor pack_rows(torch::Tensor weight, int64_t type, int64_t in) {
  check(weight, type, in);
  TORCH_CHECK(packable(type) && weight.size(0) % kRows == 0,
              "packing needs Q4_0/Q4_1/Q8_0/Q4_K and a multiple of ", kRows, " rows");
  if (type == Q4_K) return pack_q4k(weight, in);
  if (type == Q6_K) return pack_q6k(weight, in);
  if (type == Q5_0) return pack_q5(weight, in);
  const int64_t out = weight.size(0), row_bytes = weight.size(1), blocks = in / 32;
  const int64_t bb = block_bytes(type), stride = packed_stride(type);
  auto packed = torch::empty({out / kRows, blocks * stride}, weight.options());
  const uint8_t* src = weight.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  const int64_t header = type == Q4_1 ? 4 : 2, quants = bb - header;
  for (int64_t g = 0; g < out / kRows; ++g) {
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* blk = dst + (g * blocks + b) * stride;
      uint8_t* q = blk + quants_at(type);
      for (int64_t r = 0; r < kRows; ++r) {
        const uint8_t* orig = src + (kRows * g + r) * row_bytes + b * bb;
        std::memcpy(blk + kScales + 2 * r, orig, 2);                      // d
        if (type == Q4_1) std::memcpy(blk + kMins + 2 * r, orig + 2, 2);  // m
        const uint8_t* qs = orig + header;
        for (int64_t c = 0; c < quants / 4; ++c)
          std::memcpy(q + 4 * kRows * c + 4 * r, qs + 4 * c, 4);
      }
    }
  }
  return packed;
}

int64_t rows_per_pack() { return kRows; }

// ``bytes`` of memory for weights, aligned to 2 MiB and marked for transparent huge pages
// (where the kernel allows them on request): a step streams every weight once, and 2 MiB pages
// spare that stream ~25 thousand 4 KiB page walks. Pages still come as they are first written.
torch::Tensor weight_arena(int64_t bytes) {
  constexpr int64_t kHuge = int64_t{2} << 20;
  const int64_t size = std::max<int64_t>(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
  void* p = std::aligned_alloc(kHuge, size);
  TORCH_CHECK(p != nullptr, "could not allocate ", size, " bytes for the weights");
#if defined(MADV_HUGEPAGE)
  madvise(p, size, MADV_HUGEPAGE);  // advice only: without it the arena is ordinary memory
#endif
  return torch::from_blob(p, {bytes}, [](void* q) { std::free(q); }, torch::kUInt8);
}

// x: [n, in] float32, rounded to 8 bits per 32-block; weight: Q4_0/Q4_1/Q8_0 -> [n, out]
torch::Tensor qmatmul_q8(torch::Tensor x, torch::Tensor weight, int64_t type, int64_t in) {
  if (type > kPacked) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == in,
                "x must be a float32 [n, in_features] tensor");
    x = x.contiguous();
    const int64_t n = x.size(0), out = weight.size(0) * kRows;
    const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), n, in);
    auto y = torch::empty({n, out}, x.options());
    matmul_packed(type - kPacked, weight.data_ptr<uint8_t>(), out, xq, n, in,
                  y.data_ptr<float>(), out);
    return y;
  }
  check(weight, type, in);
  TORCH_CHECK(has_q8_path(type), "8-bit activations are implemented for Q4_0, Q4_1 and Q8_0");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == in,
              "x must be a float32 [n, in_features] tensor");
  x = x.contiguous();
  const int64_t n = x.size(0), out = weight.size(0);
  const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), n, in);
  auto y = torch::empty({n, out}, x.options());
  matmul_q8(type, weight.data_ptr<uint8_t>(), weight.size(1), out, xq, n, in,
            y.data_ptr<float>(), out);
  return y;
}

namespace {

void check_any(const torch::Tensor& weight, int64_t type, int64_t in) {
  if (type <= kPacked) return check(weight, type, in);
  TORCH_CHECK(packable(type - kPacked), "packed type ", type, " is not implemented");
  const int64_t bw = block_weights(type - kPacked);
  TORCH_CHECK(weight.dtype() == torch::kUInt8 && weight.dim() == 2 && weight.is_contiguous() &&
                  in % bw == 0 && weight.size(1) == in / bw * packed_stride(type - kPacked),
              "packed weight must be a contiguous uint8 [out / R, blocks * stride] tensor");
}

// one weight row as float32, whichever layout
void decode_any(int64_t type, const torch::Tensor& weight, int64_t o, int64_t in, float* out) {
  if (type > kPacked) {
    return decode_packed_row(type - kPacked, weight.data_ptr<uint8_t>(), o, in, out);
  }
  decode_row(type, weight.data_ptr<uint8_t>() + o * weight.size(1), in, out);
}

int64_t rows_of(const torch::Tensor& weight, int64_t type) {
  return type > kPacked ? weight.size(0) * kRows : weight.size(0);
}

}  // namespace

// Rows ``ids`` of a quantized matrix (either layout), decoded: [len(ids), in] float32
torch::Tensor dequantize_rows(torch::Tensor weight, torch::Tensor ids, int64_t type, int64_t in) {
  check_any(weight, type, in);
  ids = ids.to(torch::kInt64).contiguous();
  const int64_t n = ids.size(0), rows = rows_of(weight, type);
  auto out = torch::empty({n, in}, torch::dtype(torch::kFloat32));
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(ip[r] >= 0 && ip[r] < rows, "row id out of range");
    decode_any(type, weight, ip[r], in, out.data_ptr<float>() + r * in);
  }
  return out;
}

// ---- The decoder layers in one call, row by row -----------------------------------------------
//
// Model::forward runs every layer of a Llama/Qwen2 decoder over T new rows: RMSNorm, the QKV
// products (+ bias), rotary, the KV-cache write, attention, the output product, the residual,
// RMSNorm, gate/up, SiLU * up, down, the residual, and the final RMSNorm. Everything a row
// computes depends only on that row and on the keys and values it may see, never on the other
// rows of the call or on the thread count:
// - the matrix products are the kernels above (row-independent by construction);
// - norms, rotary and SiLU are per-row loops of one fixed shape;
// - attention is computed for each (row, head) alone, over exactly the keys the row may see, in
//   position order: the committed prefix, then the row's tree ancestors and itself, with one fixed
//   order of exponentials, sums and the weighted sum of values.
// A tree node at depth k therefore gets bit for bit the values plain decoding gets at that
// position with the same tokens before it: verification is exact at no extra cost, whatever the
// activations are rounded to. A prompt is no exception: its rows go through the same attention
// (in runs of kPromptRun rows, each run's shared keys scored key-major for all its queries), so a
// prompt prefilled at once leaves the cache and logits that prefilling a part and decoding the
// rest token by token leaves — a cached prefix can be reused exactly. Only a float32-path
// product (activations="float32", or a type the packed kernels do not take) of a prefill of 32
// rows or more goes through torch's batched kernel on weights decoded for the call.

namespace {

inline float hsum_ps(__m256 v) { return hsum(v); }

// Cephes' expf: range, ln 2 split in two, and the polynomial's coefficients (exp8 and exp16
// take them from here, so their lanes cannot drift apart)
namespace exp_poly {
constexpr float kExpLo = -87.3f;
constexpr float kExpHi = 88.3f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f;
constexpr float kP1 = 1.3981999507e-3f;
constexpr float kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f;
constexpr float kP4 = 1.6666665459e-1f;
constexpr float kP5 = 5.0000001201e-1f;
}  // namespace exp_poly

// e^x, one polynomial (Cephes' expf) for vector lanes and scalars alike
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(exp_poly::kExpLo)),
                    _mm256_set1_ps(exp_poly::kExpHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(exp_poly::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(exp_poly::kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(exp_poly::kLn2Lo), r);
  __m256 p = _mm256_set1_ps(exp_poly::kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_poly::kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_poly::kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_poly::kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_poly::kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_poly::kP5));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#if defined(__AVX512F__)
// exp8 on sixteen lanes: each lane takes exactly exp8's operations, so the same result
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(exp_poly::kExpLo)),
                    _mm512_set1_ps(exp_poly::kExpHi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(exp_poly::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(exp_poly::kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(exp_poly::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(exp_poly::kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_poly::kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_poly::kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_poly::kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_poly::kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_poly::kP5));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

inline float exp1(float x) {  // exp8 on one lane: the same operations, the same result
  return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x)));
}

struct Linear {
  torch::Tensor w;  // uint8 [out, row_bytes] blocks (type F32: float32 rows viewed as bytes)
  int64_t type, in, out;
  torch::Tensor bias;  // float32 [out], or empty
};

struct Layer {
  torch::Tensor attn_norm, mlp_norm;
  // parts on one input, outputs side by side (out and down: one part each)
  std::vector<Linear> qkv, out, gate_up, down;
};

int64_t width(const std::vector<Linear>& parts) {
  int64_t total = 0;
  for (const auto& p : parts) total += p.out;
  return total;
}

// y[:, :] = x @ [parts].T (+ bias), y row stride ldy
// y[:, :] = x @ [parts].T (+ bias), y row stride ldy. ``batched`` (a prefill of many rows): a
// part on the float32 path (activations="float32", or a shape the packed kernels do not take)
// is decoded to float32 once and multiplied by torch's batched kernel, which beats
// decoding-and-dotting row after row once there are ~32 rows.
void apply(const std::vector<Linear>& parts, const float* x, int64_t n, float* y, int64_t ldy,
           bool int8, bool batched = false) {
  const int64_t in = parts[0].in;
  std::unique_ptr<QuantizedRows> xq;
  int64_t offset = 0;
  for (const auto& p : parts) {
    const uint8_t* wp = p.w.data_ptr<uint8_t>();
    const int64_t row_bytes = p.w.size(1);
    if (p.type > kPacked) {
      if (!xq) xq = std::make_unique<QuantizedRows>(quantize_rows(x, n, in));
      matmul_packed(p.type - kPacked, wp, p.out, *xq, n, in, y + offset, ldy);
    } else if (int8 && has_q8_path(p.type)) {
      if (!xq) xq = std::make_unique<QuantizedRows>(quantize_rows(x, n, in));
      matmul_q8(p.type, wp, row_bytes, p.out, *xq, n, in, y + offset, ldy);
    } else if (batched && p.type != F32) {
      auto w = torch::empty({p.out, in}, torch::kFloat32);
      float* wd = w.data_ptr<float>();
#pragma omp parallel for schedule(static)
      for (int64_t o = 0; o < p.out; ++o) decode_row(p.type, wp + o * row_bytes, in, wd + o * in);
      auto xt = torch::from_blob(const_cast<float*>(x), {n, in}, torch::kFloat32);
      torch::from_blob(y + offset, {n, p.out}, {ldy, 1}, torch::kFloat32)
          .copy_(torch::mm(xt, w.t()));
    } else {
      matmul_f32(p.type, wp, row_bytes, p.out, x, n, in, y + offset, ldy);
    }
    if (p.bias.numel()) {
      const float* b = p.bias.data_ptr<float>();
      for (int64_t r = 0; r < n; ++r)
        for (int64_t o = 0; o < p.out; ++o) y[r * ldy + offset + o] += b[o];
    }
    offset += p.out;
  }
}

// Rows from which the per-row loops between the products (norms, rotary and the cache write,
// residual adds) are split over the threads: a prompt's; a few rows are not worth waking them.
constexpr int64_t kThreadedLoops = 16;

// y = w * (x * rsqrt(mean(x^2) + eps)), row by row (in % 8 == 0)
void rms_norm(const float* x, int64_t n, int64_t in, const float* w, float eps, float* y) {
#pragma omp parallel for schedule(static) if (n >= kThreadedLoops)
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * in;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    const float scale = 1.0f / std::sqrt(hsum_ps(acc) / static_cast<float>(in) + eps);
    for (int64_t i = 0; i < in; ++i) y[r * in + i] = w[i] * (xr[i] * scale);
  }
}

// x * cos + rotate_half(x) * sin on one head vector of d values
inline void rotate(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// The KV cache holds float16 (llama.cpp's default, half the bytes attention reads) or float32
// values; these load 8 (16) of them as float32 and store a row rounded to the cache's type.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif
inline void store_row(float* dst, const float* src, int64_t d) {
  std::memcpy(dst, src, d * sizeof(float));
}
inline void store_row(uint16_t* dst, const float* src, int64_t d) {  // round to nearest even
  for (int64_t i = 0; i < d; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Attention reads each key and value once per query group, and at one row per step the cache
// comes from memory (the weights streamed since evicted it): these ask for the rows of the keys
// ``kKeysAhead`` further on, the next ones the loops below will read. No arithmetic changes.
constexpr int64_t kKeysAhead = 32;
template <typename KV>
inline void prefetch_rows(const KV* base, const int64_t* slots, int64_t from, int64_t to,
                          int64_t d) {
  for (int64_t j = from; j < to; ++j)
    for (int64_t at = 0; at < d * static_cast<int64_t>(sizeof(KV)); at += 64)
      _mm_prefetch(reinterpret_cast<const char*>(base + slots[j] * d) + at, _MM_HINT_T0);
}

// scores[j] = scale * (q . K[slots[j]]) for j < count, eight keys at a time: one vector
// accumulator per key over the head's 8-value chunks in order, then one transposing add tree
// that gives every key ((x0+x1)+(x2+x3))+((x4+x5)+(x6+x7)) of its accumulator's lanes. Keys
// past ``count`` are a zero row, so every key, wherever it falls in a block, is summed alike.
template <typename KV>
void key_scores(const float* q, const KV* K, const int64_t* slots, int64_t count, int64_t d,
                float scale, float* scores, const KV* zero_row) {
  for (int64_t j0 = 0; j0 < count; j0 += 8) {
    prefetch_rows(K, slots, std::min(j0 + kKeysAhead, count),
                  std::min(j0 + kKeysAhead + 8, count), d);
    const KV* rows[8];
    for (int k = 0; k < 8; ++k) rows[k] = j0 + k < count ? K + slots[j0 + k] * d : zero_row;
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(qv, load8(rows[k] + i), acc[k]);
    }
    const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                      _mm256_permute2f128_ps(h0123, h4567, 0x31));
    _mm256_storeu_ps(scores + j0, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
  }
}

#if defined(__AVX512F__)
// The AVX-512 builds' scores (d % 16 == 0): sixteen keys at a time, one 16-lane accumulator per
// key over the head's 16-value chunks in order, then one transposing add tree that treats
// every key alike: pairs of lanes, then pairs of pairs within each 128-bit quarter, then
// (quarter 0 + quarter 2) + (quarter 1 + quarter 3). Half the instructions of the 8-lane
// version; a build's scores do not depend on where a key falls in a block (keys past ``count``
// are a zero row), so tree rows still get plain decoding's bits.
constexpr int64_t kKeyBlock = 16;

inline __m512 pair_sums(__m512 x, __m512 y) {  // per 128-bit quarter: x0+x1, x2+x3, y0+y1, y2+y3
  return _mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}

template <typename KV>
void key_scores_16(const float* q, const KV* K, const int64_t* slots, int64_t count,
                   int64_t d, float scale, float* scores, const KV* zero_row) {
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    prefetch_rows(K, slots, std::min(j0 + kKeysAhead, count),
                  std::min(j0 + kKeysAhead + 16, count), d);
    const KV* rows[16];
    for (int k = 0; k < 16; ++k) rows[k] = j0 + k < count ? K + slots[j0 + k] * d : zero_row;
    __m512 acc[16];
    for (int k = 0; k < 16; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 qv = _mm512_loadu_ps(q + i);
      for (int k = 0; k < 16; ++k) acc[k] = _mm512_fmadd_ps(qv, load16(rows[k] + i), acc[k]);
    }
    __m512 h[8], g[4];
    for (int k = 0; k < 8; ++k) h[k] = pair_sums(acc[2 * k], acc[2 * k + 1]);
    for (int k = 0; k < 4; ++k) g[k] = pair_sums(h[2 * k], h[2 * k + 1]);  // keys 4k..4k+3
    // g[k], quarter c: keys 4k..4k+3 summed over lanes 4c..4c+3
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(g[0], g[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(g[0], g[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(g[2], g[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(g[2], g[3], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(scores + j0, _mm512_mul_ps(sums, _mm512_set1_ps(scale)));
  }
}


// key_scores_16's scores of keys [begin, end) for Q queries (Q <= 3) that see the same keys,
// eight keys at a time: each key's 16-value chunk is loaded and widened once for all Q queries
// rather than once per query. Per key and query: the same fused multiply-adds over the head's
// chunks in order and the same add tree (pairs of lanes, pairs of pairs within each quarter,
// then (quarter 0 + quarter 2) + (quarter 1 + quarter 3)), so key_scores_16's bits.
// (end - begin) % 8 == 0.
template <int Q, typename KV>
void key_scores_group(const float* const* q, const KV* K, const int64_t* slots, int64_t begin,
                      int64_t end, int64_t d, float scale, float* const* scores) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j0 = begin; j0 < end; j0 += 8) {
    prefetch_rows(K, slots, std::min(j0 + kKeysAhead, end), std::min(j0 + kKeysAhead + 8, end),
                  d);
    const KV* rows[8];
    for (int k = 0; k < 8; ++k) rows[k] = K + slots[j0 + k] * d;
    __m512 acc[Q][8];
    for (int i = 0; i < Q; ++i)
      for (int k = 0; k < 8; ++k) acc[i][k] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16)
      for (int k = 0; k < 8; ++k) {
        const __m512 kv = load16(rows[k] + c);
        for (int i = 0; i < Q; ++i)
          acc[i][k] = _mm512_fmadd_ps(_mm512_loadu_ps(q[i] + c), kv, acc[i][k]);
      }
    for (int i = 0; i < Q; ++i) {
      __m512 h[4];
      for (int k = 0; k < 4; ++k) h[k] = pair_sums(acc[i][2 * k], acc[i][2 * k + 1]);
      const __m512 g0 = pair_sums(h[0], h[1]), g1 = pair_sums(h[2], h[3]);  // keys 0-3, 4-7
      const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(g0, g1, _MM_SHUFFLE(1, 0, 1, 0)),
                                       _mm512_shuffle_f32x4(g0, g1, _MM_SHUFFLE(3, 2, 3, 2)));
      const __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s01, _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_f32x4(s01, s01, _MM_SHUFFLE(3, 1, 3, 1)));
      _mm256_storeu_ps(scores[i] + j0, _mm512_castps512_ps256(_mm512_mul_ps(sums, s)));
    }
  }
}

// key_scores_group for any number of queries, three at a time
template <typename KV>
void key_scores_few(const float* const* q, int64_t m, const KV* K, const int64_t* slots,
                    int64_t begin, int64_t end, int64_t d, float scale, float* const* scores) {
  int64_t i = 0;
  for (; i + 3 <= m; i += 3)
    key_scores_group<3>(q + i, K, slots, begin, end, d, scale, scores + i);
  if (m - i == 2) key_scores_group<2>(q + i, K, slots, begin, end, d, scale, scores + i);
  if (m - i == 1) key_scores_group<1>(q + i, K, slots, begin, end, d, scale, scores + i);
}

// 16 rows of 16 floats -> r[j] = lane j of every row (row k in lane k)
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: rows 2i, 2i+1 interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + e], lane L: element 4L + e of rows 4i..4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), e = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, e));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, e));
  }
  for (int e = 0; e < 4; ++e) {  // element 4L + e of all rows: lane L of u[e], u[4+e], ...
    const __m512 v_lo = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44);
    const __m512 v_hi = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
    const __m512 w_lo = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44);
    const __m512 w_hi = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_f32x4(v_lo, w_lo, 0x88);
    r[4 + e] = _mm512_shuffle_f32x4(v_lo, w_lo, 0xDD);
    r[8 + e] = _mm512_shuffle_f32x4(v_hi, w_hi, 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(v_hi, w_hi, 0xDD);
  }
}

// Keys in key-major order: kt[c * 16 + k] = dimension c of key slots[k], for the 16 keys of a
// block, widened to float32 (d x 16 floats, one vector per head dimension over the keys).
template <typename KV>
void transpose_keys(const KV* K, const int64_t* slots, int64_t d, float* kt) {
  for (int64_t c = 0; c < d; c += 16) {
    __m512 r[16];
    for (int k = 0; k < 16; ++k) r[k] = load16(K + slots[k] * d + c);
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_ps(kt + (c + j) * 16, r[j]);
  }
}

// key_scores_16's scores of one 16-key block (kt, key-major) for m queries, into
// scores[i][0..16): every query sums its lanes' products in vertical registers. Lane j of
// key_scores_16's accumulator is part[j] here — the same fused multiply-adds over the head's
// 16-value chunks in order — and its transposing add tree, ((S0 + S2) + (S1 + S3)) with
// S_Q = (a_4Q + a_4Q+1) + (a_4Q+2 + a_4Q+3), is the same sum of parts, so every score has
// key_scores_16's bits, without its per-key shuffles.
// Q queries at a time: each key-major vector loaded once for all Q, one quarter of the parts
// (four lanes' worth) at a time so that the Q x 4 accumulators stay in registers.
template <int Q>
inline void block_scores_of(const float* const* q, const float* kt, int64_t d, __m512 s,
                            float* const* scores, int64_t j0) {
  __m512 quarter[Q][4];
  for (int G = 0; G < 4; ++G) {
    __m512 part[Q][4];
    for (int i = 0; i < Q; ++i)
      for (int j = 0; j < 4; ++j) part[i][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16)
      for (int j = 0; j < 4; ++j) {
        const __m512 k = _mm512_loadu_ps(kt + (c + 4 * G + j) * 16);
        for (int i = 0; i < Q; ++i)
          part[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(q[i][c + 4 * G + j]), k, part[i][j]);
      }
    for (int i = 0; i < Q; ++i)
      quarter[i][G] = _mm512_add_ps(_mm512_add_ps(part[i][0], part[i][1]),
                                    _mm512_add_ps(part[i][2], part[i][3]));
  }
  for (int i = 0; i < Q; ++i) {
    const __m512 sums = _mm512_add_ps(_mm512_add_ps(quarter[i][0], quarter[i][2]),
                                      _mm512_add_ps(quarter[i][1], quarter[i][3]));
    _mm512_storeu_ps(scores[i] + j0, _mm512_mul_ps(sums, s));
  }
}

inline void block_scores(const float* const* q, int64_t m, const float* kt, int64_t d,
                         float scale, float* const* scores, int64_t j0) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) block_scores_of<4>(q + i, kt, d, s, scores + i, j0);
  for (; i < m; ++i) block_scores_of<1>(q + i, kt, d, s, scores + i, j0);
}

// key_scores_16's scores for m queries over the same keys (count % 16 == 0), key-major: each
// 16-key block is widened and transposed once into kt for all m queries — or, given
// ``transposed`` (the blocks already in key-major order, d x 16 floats each), not at all.
template <typename KV>
void key_scores_many(const float* const* q, int64_t m, const KV* K, const int64_t* slots,
                     int64_t count, int64_t d, float scale, float* const* scores, float* kt,
                     const float* transposed) {
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    if (transposed != nullptr) {
      block_scores(q, m, transposed + j0 * d, d, scale, scores, j0);
      continue;
    }
    prefetch_rows(K, slots, std::min(j0 + kKeysAhead, count),
                  std::min(j0 + kKeysAhead + 16, count), d);
    transpose_keys(K, slots + j0, d, kt);
    block_scores(q, m, kt, d, scale, scores, j0);
  }
}
constexpr bool kGroupedScores = true;  // key_scores_few
#else
constexpr int64_t kKeyBlock = 8;
constexpr bool kGroupedScores = false;
#endif

// Value sums: acc += p[j] V[slots[j]] over keys j in order, each lane its own chain of fused
// multiply-adds (the output is then acc * (1 / sum p)). Several queries that see the same keys
// (the query heads sharing a KV head, the rows of one tree) go through those keys together, each
// key's values loaded once for all of them; each query's lanes take exactly the operations they
// would take alone, so grouping changes no bits.
#if defined(__AVX512F__)
struct Lanes {
  using F = __m512;
  static constexpr int64_t kWidth = 16, kMaxAcc = 16;  // of 32 registers
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  template <typename KV> static F kv(const KV* p) { return load16(p); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#else
struct Lanes {
  using F = __m256;
  static constexpr int64_t kWidth = 8, kMaxAcc = 8;  // of 16 registers
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  template <typename KV> static F kv(const KV* p) { return load8(p); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};
#endif

// acc[q][0..d) += p[q][j] V[slots[j]] for j in [begin, end), M queries, d = C lanes-widths
template <typename KV, int C, int M>
void value_sums(const float* const* p, const int64_t* slots, int64_t begin, int64_t end,
                const KV* V, float* const* acc) {
  constexpr int64_t W = Lanes::kWidth;
  typename Lanes::F a[M][C];
  for (int q = 0; q < M; ++q)
    for (int c = 0; c < C; ++c) a[q][c] = Lanes::load(acc[q] + W * c);
  for (int64_t j = begin; j < end; ++j) {
    if (j + kKeysAhead < end) prefetch_rows(V, slots, j + kKeysAhead, j + kKeysAhead + 1, W * C);
    const KV* v = V + slots[j] * (W * C);
    typename Lanes::F w[M];
    for (int q = 0; q < M; ++q) w[q] = Lanes::set1(p[q][j]);
    for (int c = 0; c < C; ++c) {
      const typename Lanes::F vc = Lanes::kv(v + W * c);
      for (int q = 0; q < M; ++q) a[q][c] = Lanes::fma(w[q], vc, a[q][c]);
    }
  }
  for (int q = 0; q < M; ++q)
    for (int c = 0; c < C; ++c) Lanes::store(acc[q] + W * c, a[q][c]);
}

// up to kMaxAcc / C queries at a time
template <typename KV, int C>
void value_sums_c(int64_t m, const float* const* p, const int64_t* slots, int64_t begin,
                  int64_t end, const KV* V, float* const* acc) {
  constexpr int64_t most = std::max<int64_t>(1, std::min<int64_t>(4, Lanes::kMaxAcc / C));
  for (int64_t q = 0; q < m; q += most) {
    const float* const* pq = p + q;
    float* const* aq = acc + q;
    switch (std::min(most, m - q)) {
      case 4: value_sums<KV, C, std::min<int64_t>(4, most)>(pq, slots, begin, end, V, aq); break;
      case 3: value_sums<KV, C, std::min<int64_t>(3, most)>(pq, slots, begin, end, V, aq); break;
      case 2: value_sums<KV, C, std::min<int64_t>(2, most)>(pq, slots, begin, end, V, aq); break;
      default: value_sums<KV, C, 1>(pq, slots, begin, end, V, aq); break;
    }
  }
}

// m queries' value sums over keys [begin, end) into acc[q][0..d)
template <typename KV>
void value_sums_any(int64_t d, int64_t m, const float* const* p, const int64_t* slots,
                    int64_t begin, int64_t end, const KV* V, float* const* acc) {
  switch (d / Lanes::kWidth * (d % Lanes::kWidth == 0)) {
    case 4: return value_sums_c<KV, 4>(m, p, slots, begin, end, V, acc);
    case 8: return value_sums_c<KV, 8>(m, p, slots, begin, end, V, acc);
    case 16: return value_sums_c<KV, 16>(m, p, slots, begin, end, V, acc);
    default: break;
  }
  // any other multiple of 8: the same sums, one 8-value chunk at a time
  for (int64_t q = 0; q < m; ++q)
    for (int64_t c = 0; c < d; c += 8) {
      __m256 a = _mm256_loadu_ps(acc[q] + c);
      for (int64_t j = begin; j < end; ++j)
        a = _mm256_fmadd_ps(_mm256_set1_ps(p[q][j]), load8(V + slots[j] * d + c), a);
      _mm256_storeu_ps(acc[q] + c, a);
    }
}

class Model {
 public:
  Model(std::vector<Layer> layers, torch::Tensor norm, double eps, int64_t heads,
        int64_t kv_heads, int64_t head_dim, bool int8)
      : layers_(std::move(layers)), norm_(norm.contiguous()), eps_(static_cast<float>(eps)),
        heads_(heads), kv_heads_(kv_heads), d_(head_dim), int8_(int8) {
    TORCH_CHECK(head_dim % 8 == 0, "head_dim must be a multiple of 8");
  }

  // x: [T, hidden] input rows (embeddings); keys/values: [layers, kv, S, d] caches (both float16
  // or both float32), rows start..start+T-1 written here; cos/sin: [T, d] at the rows'
  // positions; tree: [T, T] uint8, tree[r][j] = row r may see row j (itself and its ancestors).
  // Returns the final-normed hidden states [T, hidden].
  torch::Tensor forward(torch::Tensor x, torch::Tensor keys, torch::Tensor values, int64_t start,
                        torch::Tensor cos, torch::Tensor sin, torch::Tensor tree, bool prefill) {
    TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "caches must be contiguous");
    check_caches(keys, values);
    tree = tree.to(torch::kUInt8).contiguous();
    const int64_t T = x.size(0), S = keys.size(2);
    TORCH_CHECK(keys.size(0) == static_cast<int64_t>(layers_.size()) && start + T <= S,
                "cache shape does not match");
    TORCH_CHECK(tree.size(0) == T && tree.size(1) == T, "tree must be [T, T]");
    Rows rows(T, keys.size(1) * S * d_, S, keys.element_size());
    // the cache slots each row may see, in position order: the same for every head and layer
    const uint8_t* tp = tree.data_ptr<uint8_t>();
    bool causal = true;  // a prompt: every row sees the rows before it and itself
    for (int64_t r = 0; r < T; ++r)
      for (int64_t j = 0; j < T; ++j) causal = causal && tp[r * T + j] == (j <= r);
    for (int64_t r = 0; r < T; ++r) {
      rows.kbase[r] = static_cast<char*>(keys.data_ptr());
      rows.vbase[r] = static_cast<char*>(values.data_ptr());
      rows.write[r] = start + r;
      rows.visible[r].resize(start);
      std::iota(rows.visible[r].begin(), rows.visible[r].end(), int64_t{0});
      for (int64_t j = 0; j < T; ++j)
        if (tp[r * T + j]) rows.visible[r].push_back(start + j);
    }
    return run(x, rows, cos, sin, prefill && T >= 32, prefill && causal);
  }

  // Several sequences' rows in one pass. keys/values: [B, layers, kv, W, d], one region per
  // sequence; row r belongs to sequence seq[r], is written at slot write[r] of its region and
  // sees the slots 0..prefix[r]-1 of that region (its committed tokens), then
  // extra[offsets[r]:offsets[r+1]] (its tree ancestors and itself, in position order). Each
  // row is computed alone, as in forward(): a row's result does not depend on which other rows
  // share the pass.
  torch::Tensor forward_batch(torch::Tensor x, torch::Tensor keys, torch::Tensor values,
                              torch::Tensor seq, torch::Tensor write, torch::Tensor prefix,
                              torch::Tensor offsets, torch::Tensor extra, torch::Tensor cos,
                              torch::Tensor sin) {
    TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.dim() == 5,
                "caches must be contiguous [B, layers, kv, W, d]");
    TORCH_CHECK(keys.size(1) == static_cast<int64_t>(layers_.size()), "cache has other layers");
    check_caches(keys, values);
    const int64_t T = x.size(0), B = keys.size(0), W = keys.size(3);
    seq = seq.to(torch::kInt64).contiguous();
    write = write.to(torch::kInt64).contiguous();
    prefix = prefix.to(torch::kInt64).contiguous();
    offsets = offsets.to(torch::kInt64).contiguous();
    extra = extra.to(torch::kInt64).contiguous();
    TORCH_CHECK(seq.numel() == T && write.numel() == T && prefix.numel() == T &&
                    offsets.numel() == T + 1,
                "seq, write, prefix: [T]; offsets: [T + 1]");
    const int64_t region = keys.size(1) * keys.size(2) * W * d_;
    Rows rows(T, keys.size(2) * W * d_, W, keys.element_size());
    const int64_t *sp = seq.data_ptr<int64_t>(), *wp = write.data_ptr<int64_t>();
    const int64_t *pp = prefix.data_ptr<int64_t>(), *op = offsets.data_ptr<int64_t>();
    const int64_t* ep = extra.data_ptr<int64_t>();
    TORCH_CHECK(op[0] == 0 && op[T] == extra.numel(), "offsets do not match extra");
    for (int64_t r = 0; r < T; ++r) {
      TORCH_CHECK(sp[r] >= 0 && sp[r] < B && wp[r] >= 0 && wp[r] < W, "row outside the cache");
      TORCH_CHECK(pp[r] >= 0 && pp[r] <= W && op[r] <= op[r + 1], "bad prefix or offsets");
      rows.kbase[r] = static_cast<char*>(keys.data_ptr()) + sp[r] * region * rows.bytes;
      rows.vbase[r] = static_cast<char*>(values.data_ptr()) + sp[r] * region * rows.bytes;
      rows.write[r] = wp[r];
      std::vector<int64_t>& seen = rows.visible[r];
      seen.resize(pp[r]);
      std::iota(seen.begin(), seen.end(), int64_t{0});
      for (int64_t i = op[r]; i < op[r + 1]; ++i) {
        TORCH_CHECK(ep[i] >= 0 && ep[i] < W, "slot outside the cache");
        seen.push_back(ep[i]);
      }
    }
    return run(x, rows, cos, sin, false, false);
  }

 private:
  // where each row's keys/values live and which of them it sees
  struct Rows {
    Rows(int64_t T, int64_t layer_stride_, int64_t S_, int64_t bytes_)
        : kbase(T), vbase(T), write(T), visible(T), layer_stride(layer_stride_), S(S_),
          bytes(bytes_) {}
    std::vector<char*> kbase, vbase;  // layer 0 of the row's cache, [layers, kv, S, d]
    std::vector<int64_t> write;        // the slot the row's key/value is written to
    std::vector<std::vector<int64_t>> visible;
    int64_t layer_stride, S;
    int64_t bytes;  // of one cached value: 2 (float16) or 4 (float32)
  };

  static void check_caches(const torch::Tensor& keys, const torch::Tensor& values) {
    TORCH_CHECK(keys.scalar_type() == values.scalar_type() &&
                    (keys.scalar_type() == torch::kFloat16 ||
                     keys.scalar_type() == torch::kFloat32),
                "the caches must both be float16 or both float32");
  }

  // consecutive rows on one cache (a tree: all its rows; a batch: each sequence's), and how many
  // slots, from the first, every one of them sees
  struct Span {
    int64_t begin, end, shared;
  };

  static std::vector<Span> spans(const Rows& rows, int64_t most) {
    std::vector<Span> out;
    const int64_t T = static_cast<int64_t>(rows.kbase.size());
    for (int64_t begin = 0; begin < T;) {
      int64_t end = begin + 1;
      while (end < T && end - begin < most && rows.kbase[end] == rows.kbase[begin]) ++end;
      const std::vector<int64_t>& first = rows.visible[begin];
      int64_t shared = static_cast<int64_t>(first.size());
      for (int64_t r = begin + 1; r < end; ++r) {
        const std::vector<int64_t>& other = rows.visible[r];
        const int64_t most = std::min<int64_t>(shared, other.size());
        shared = std::mismatch(first.begin(), first.begin() + most, other.begin()).first -
                 first.begin();
      }
      out.push_back({begin, end, shared});
      begin = end;
    }
    return out;
  }

  // every decoder layer over the rows, then the final norm
  torch::Tensor run(torch::Tensor x, const Rows& rows, torch::Tensor cos, torch::Tensor sin,
                    bool batched, bool prompt) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [T, hidden]");
    x = x.contiguous().clone();
    cos = cos.contiguous();
    sin = sin.contiguous();
    const int64_t T = x.size(0), hidden = x.size(1), d = d_, S = rows.S;
    TORCH_CHECK(cos.size(0) == T && sin.size(0) == T, "cos/sin must be [T, d]");
    float* xp = x.data_ptr<float>();
    std::vector<float> normed(T * hidden), tmp(T * hidden), attn(T * heads_ * d);
    const int64_t qkv_width = (heads_ + 2 * kv_heads_) * d;
    std::vector<float> qkv(T * qkv_width), gu, act;
    std::vector<const char*> K(T), V(T);
    const std::vector<Span> runs = spans(rows, prompt ? kPromptRun : T);
    Work work = plan(runs, prompt);
    if (!prompt && runs.size() > 1) {
      const int64_t items = static_cast<int64_t>(work.span.size());
      std::vector<int64_t>& cost = work.cost;
      cost.resize(items);
      for (int64_t k = 0; k < items; ++k)
        cost[k] = (work.bounds[k + 1] - work.bounds[k]) *
                  static_cast<int64_t>(rows.visible[work.queries[work.bounds[k]].first].size());
      if (*std::min_element(cost.begin(), cost.end()) !=
          *std::max_element(cost.begin(), cost.end())) {  // (equal items: contiguous shares)
        work.longest_first.resize(items);
        std::iota(work.longest_first.begin(), work.longest_first.end(), int64_t{0});
        std::stable_sort(work.longest_first.begin(), work.longest_first.end(),
                         [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
      }
    }
    // A prompt's runs all see the keys from slot 0 on (its last row sees them all, in order):
    // each layer's are put in key-major order once for every attention item, instead of once
    // per item (the same floats in the same lanes: no bits change).
    int64_t major_blocks = 0;
    std::vector<float> major;
#if defined(__AVX512F__)
    if (prompt && d % 16 == 0) major_blocks = static_cast<int64_t>(rows.visible[T - 1].size()) / 16;
#endif
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      rms_norm(xp, T, hidden, layer.attn_norm.data_ptr<float>(), eps_, normed.data());
      TORCH_CHECK(width(layer.qkv) == qkv_width, "qkv width does not match the heads");
      apply(layer.qkv, normed.data(), T, qkv.data(), qkv_width, int8_, batched);
#pragma omp parallel for schedule(static) if (T >= kThreadedLoops)
      for (int64_t r = 0; r < T; ++r) {  // (each row writes its own cache slots)
        char* Kr = rows.kbase[r] + l * rows.layer_stride * rows.bytes;
        char* Vr = rows.vbase[r] + l * rows.layer_stride * rows.bytes;
        K[r] = Kr;
        V[r] = Vr;
        float* row = qkv.data() + r * qkv_width;
        const float* c = cos.data_ptr<float>() + r * d;
        const float* s = sin.data_ptr<float>() + r * d;
        for (int64_t h = 0; h < heads_ + kv_heads_; ++h) rotate(row + h * d, c, s, d);
        for (int64_t h = 0; h < kv_heads_; ++h) {
          const int64_t at = (h * S + rows.write[r]) * d;
          const float *k = row + (heads_ + h) * d, *v = row + (heads_ + kv_heads_ + h) * d;
          if (rows.bytes == 2) {
            store_row(reinterpret_cast<uint16_t*>(Kr) + at, k, d);
            store_row(reinterpret_cast<uint16_t*>(Vr) + at, v, d);
          } else {
            store_row(reinterpret_cast<float*>(Kr) + at, k, d);
            store_row(reinterpret_cast<float*>(Vr) + at, v, d);
          }
        }
      }
      if (rows.bytes == 2) {
        attend<uint16_t>(qkv.data(), qkv_width, K, V, S, rows.visible, runs, work, major_blocks,
                         major, attn.data());
      } else {
        attend<float>(qkv.data(), qkv_width, K, V, S, rows.visible, runs, work, major_blocks,
                      major, attn.data());
      }
      apply(layer.out, attn.data(), T, tmp.data(), hidden, int8_, batched);
      add_rows(xp, tmp.data(), T, hidden);
      rms_norm(xp, T, hidden, layer.mlp_norm.data_ptr<float>(), eps_, normed.data());
      const int64_t inter = layer.down[0].in, gu_width = width(layer.gate_up);
      TORCH_CHECK(gu_width == 2 * inter, "gate/up width does not match down's input");
      gu.resize(T * gu_width);
      act.resize(T * inter);
      apply(layer.gate_up, normed.data(), T, gu.data(), gu_width, int8_, batched);
#pragma omp parallel for schedule(static) if (T >= kThreadedRows)
      for (int64_t r = 0; r < T; ++r) silu_mul(gu.data() + r * gu_width, inter,
                                               act.data() + r * inter);
      apply(layer.down, act.data(), T, tmp.data(), hidden, int8_, batched);
      add_rows(xp, tmp.data(), T, hidden);
    }
    auto out = torch::empty({T, hidden}, torch::kFloat32);
    rms_norm(xp, T, hidden, norm_.data_ptr<float>(), eps_, out.data_ptr<float>());
    return out;
  }

  // x += y over T rows of n values (the residual)
  static void add_rows(float* x, const float* y, int64_t T, int64_t n) {
#pragma omp parallel for schedule(static) if (T >= kThreadedLoops)
    for (int64_t r = 0; r < T; ++r)
      for (int64_t i = r * n; i < (r + 1) * n; ++i) x[i] += y[i];
  }

  // silu(gate) * up for one row: gate = g[0..n), up = g[n..2n)
  static void silu_mul(const float* g, int64_t n, float* out) {
    const float* up = g + n;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {  // (each lane: the 8-lane loop's operations)
      const __m512 gate = _mm512_loadu_ps(g + i);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate));
      const __m512 silu = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
      _mm512_storeu_ps(out + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
    }
#endif
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
      const __m256 gate = _mm256_loadu_ps(g + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate));
      const __m256 silu = _mm256_div_ps(gate, _mm256_add_ps(one, e));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; ++i) out[i] = (g[i] / (1.0f + exp1(-g[i]))) * up[i];
  }

  static constexpr int64_t kThreadedRows = 4;  // rows from which the gate's SiLU is threaded
  static constexpr int64_t kPromptRun = 16;  // a prompt's rows per run of shared keys
  static constexpr int64_t kMostQueries = 12;  // queries of one attention work item
  static constexpr int64_t kChunk = 64;        // keys scored for every query of an item in turn
  static constexpr int64_t kKeyMajor = 6;      // queries from which an item scores key-major

  // Attention's work items: queries (row, query head) of one run that share one KV head — for a
  // tree, every row's query heads of that KV head — split into chunks so that every thread gets
  // some — but where the build scores three queries per key load (AVX-512), never below one
  // row's query heads of the KV head: a decoding row's three items of three queries beat nine
  // items of one that each read the keys (a step 1.03-1.1x faster at 300 keys, 1.07-1.2x at
  // 1000, though two threads then share three items). An item reads the keys and values its
  // rows all see (the committed prefix) once for all its queries: keys a chunk at a time,
  // scored for every query while in L1 (key-major for six queries or more); values one key at a
  // time for up to four queries at once. Every query's scores, exponentials and sums are the
  // operations it takes alone, in the same order, so the grouping changes no bits. The same for
  // every layer: planned once per forward. A prompt's runs (kPromptRun rows each) see ever
  // more keys: its items are dealt to the threads in turn, not in contiguous shares, so that no
  // thread gets all the long ones.
  struct Work {
    std::vector<std::pair<int64_t, int64_t>> queries;  // (row, query head), item by item
    // item k: queries[bounds[k], bounds[k + 1]) of runs[span[k]]
    std::vector<int64_t> bounds{0}, span;
    bool in_turn = false;
    // several sequences' rows (a server's batch) see caches of different lengths: their items
    // are dealt longest first, each to the thread with the least work so far (keys it reads),
    // and each thread runs its own in item order (which thread computes an item changes nothing
    // in what it computes); empty: contiguous shares
    std::vector<int64_t> longest_first, cost;
  };

  Work plan(const std::vector<Span>& runs, bool prompt) const {
    Work work;
    work.in_turn = prompt;
    const int64_t group = heads_ / kv_heads_;
    const int64_t heads_of_runs = static_cast<int64_t>(runs.size()) * kv_heads_;
    const int64_t pieces = std::max<int64_t>(1, (4 * omp_get_max_threads() + heads_of_runs - 1) /
                                                    heads_of_runs);
    for (size_t u = 0; u < runs.size(); ++u) {
      const int64_t n = (runs[u].end - runs[u].begin) * group;
      const int64_t size = std::clamp<int64_t>((n + pieces - 1) / pieces,
                                               std::min(n, kGroupedScores ? group : 1),
                                               kMostQueries);
      for (int64_t kvh = 0; kvh < kv_heads_; ++kvh) {
        for (int64_t i = 0; i < n; ++i) {
          work.queries.emplace_back(runs[u].begin + i / group, kvh * group + i % group);
          if ((i + 1) % size == 0 || i + 1 == n) {
            work.bounds.push_back(static_cast<int64_t>(work.queries.size()));
            work.span.push_back(static_cast<int64_t>(u));
          }
        }
      }
    }
    return work;
  }

  // out[r, h*d:(h+1)*d] = softmax(q . K_visible / sqrt(d)) V_visible for each row r, head h
  // K[r], V[r]: the layer's [kv, S, d] cache of row r's sequence; runs: the rows on one cache.
  // major_blocks > 0 (a prompt): the first major_blocks * 16 keys of the last row's slots, which
  // every run's shared keys begin with, are put in key-major order into ``major`` first.
  template <typename KV>
  void attend(const float* qkv, int64_t ldq, const std::vector<const char*>& K,
              const std::vector<const char*>& V, int64_t S,
              const std::vector<std::vector<int64_t>>& visible, const std::vector<Span>& runs,
              const Work& work, int64_t major_blocks, std::vector<float>& major,
              float* out) const {
    const int64_t d = d_, group = heads_ / kv_heads_;
    if (major_blocks > 0)
      transpose_prompt_keys(reinterpret_cast<const KV*>(K[0]), S, visible.back().data(),
                            major_blocks, major);
    const float* transposed = major_blocks > 0 ? major.data() : nullptr;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const std::vector<std::pair<int64_t, int64_t>>& queries = work.queries;
    const std::vector<int64_t>& bounds = work.bounds;
    const int64_t items = static_cast<int64_t>(work.span.size());
#pragma omp parallel
    {
      std::vector<float> scores, acc, kt;
      std::vector<const float*> qs;
      std::vector<float*> a, score_rows;
      const std::vector<KV> zero_row(d, KV{0});
      auto item = [&](int64_t k) {
        const int64_t first = bounds[k], m = bounds[k + 1] - first;
        const int64_t row0 = queries[first].first, kvh = queries[first].second / group;
        const int64_t shared = runs[work.span[k]].shared;  // slots every row of the run sees first
        const KV* Kh = reinterpret_cast<const KV*>(K[row0]) + kvh * S * d;
        const KV* Vh = reinterpret_cast<const KV*>(V[row0]) + kvh * S * d;
        int64_t longest = 0;
        for (int64_t i = 0; i < m; ++i)
          longest = std::max<int64_t>(longest, visible[queries[first + i].first].size());
        const int64_t stride = (longest + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
        scores.resize(m * stride);
        acc.assign(m * d, 0.0f);
        a.resize(m);
        score_rows.resize(m);
        for (int64_t i = 0; i < m; ++i) {
          score_rows[i] = scores.data() + i * stride;
          a[i] = acc.data() + i * d;
        }
        auto query = [&](int64_t i) {
          return qkv + queries[first + i].first * ldq + queries[first + i].second * d;
        };
        auto slots_of = [&](int64_t i) { return visible[queries[first + i].first].data(); };
        auto count_of = [&](int64_t i) {
          return static_cast<int64_t>(visible[queries[first + i].first].size());
        };
        // scores: the shared keys for every query (key-major for many queries, else a chunk at
        // a time for every query while it is in L1: three queries per key load where the build
        // has AVX-512), then each query's own
        const int64_t blocks = shared / kKeyBlock * kKeyBlock;
        bool scored = false;
#if defined(__AVX512F__)
        if (d % 16 == 0) {
          qs.resize(m);
          for (int64_t i = 0; i < m; ++i) qs[i] = query(i);
          if (m >= kKeyMajor) {
            kt.resize(16 * d);
            key_scores_many(qs.data(), m, Kh, slots_of(0), blocks, d, scale, score_rows.data(),
                            kt.data(),
                            transposed ? transposed + kvh * major_blocks * 16 * d : nullptr);
          } else {
            for (int64_t j0 = 0; j0 < blocks; j0 += kChunk)
              key_scores_few(qs.data(), m, Kh, slots_of(0), j0, std::min(j0 + kChunk, blocks),
                             d, scale, score_rows.data());
          }
          scored = true;
        }
#endif
        for (int64_t j0 = 0; !scored && j0 < blocks; j0 += kChunk)
          for (int64_t i = 0; i < m; ++i)
            score_keys(query(i), Kh, slots_of(i) + j0, std::min(kChunk, blocks - j0), d, scale,
                       scores.data() + i * stride + j0, zero_row.data());
        for (int64_t i = 0; i < m; ++i)
          if (count_of(i) > blocks)
            score_keys(query(i), Kh, slots_of(i) + blocks, count_of(i) - blocks, d, scale,
                       scores.data() + i * stride + blocks, zero_row.data());
        // softmax numerators in place, and each query's 1 / sum
        float inv[kMostQueries];
        for (int64_t i = 0; i < m; ++i)
          inv[i] = exponentials(scores.data() + i * stride, count_of(i));
        // values: the shared keys for all queries together, then each query's own
        value_sums_any(d, m, score_rows.data(), slots_of(0), 0, shared, Vh, a.data());
        for (int64_t i = 0; i < m; ++i) {
          value_sums_any(d, 1, score_rows.data() + i, slots_of(i), shared, count_of(i), Vh,
                         a.data() + i);
          const auto& [r, h] = queries[first + i];
          float* o = out + r * heads_ * d + h * d;
          const __m256 scale_i = _mm256_set1_ps(inv[i]);
          for (int64_t c = 0; c < d; c += 8)  // (d % 8 == 0)
            _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(a[i] + c), scale_i));
        }
      };
      if (work.in_turn) {
#pragma omp for schedule(static, 1)
        for (int64_t k = 0; k < items; ++k) item(k);
      } else if (!work.longest_first.empty()) {
        const int threads = omp_get_num_threads(), me = omp_get_thread_num();
        std::vector<int64_t> load(threads, 0);
        std::vector<int> owner(items);
        for (const int64_t k : work.longest_first) {  // the same deal on every thread
          const int t = static_cast<int>(std::min_element(load.begin(), load.end()) -
                                         load.begin());
          owner[k] = t;
          load[t] += work.cost[k];
        }
        for (int64_t k = 0; k < items; ++k)
          if (owner[k] == me) item(k);
      } else {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < items; ++k) item(k);
      }
    }
  }

  // major <- the first blocks * 16 keys of slots, block by block in key-major order (d x 16
  // floats each), for every KV head of a layer's cache K ([kv, S, d])
  template <typename KV>
  void transpose_prompt_keys(const KV* K, int64_t S, const int64_t* slots, int64_t blocks,
                             std::vector<float>& major) const {
#if defined(__AVX512F__)
    const int64_t d = d_, per_head = blocks * 16 * d;
    major.resize(kv_heads_ * per_head);
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < kv_heads_ * blocks; ++k) {
      const int64_t h = k / blocks, b = k % blocks;
      transpose_keys(K + h * S * d, slots + b * 16, d, major.data() + h * per_head + b * 16 * d);
    }
#endif
  }

  // scores[j] = scale * (q . K[slots[j]]) for j < count, written up to count rounded up to a
  // key block (this build's key_scores)
  template <typename KV>
  static void score_keys(const float* q, const KV* K, const int64_t* slots, int64_t count,
                         int64_t d, float scale, float* scores, const KV* zero_row) {
#if defined(__AVX512F__)
    if (d % 16 == 0) return key_scores_16(q, K, slots, count, d, scale, scores, zero_row);
#endif
    key_scores(q, K, slots, count, d, scale, scores, zero_row);
  }

  // scores[j] <- exp(scores[j] - max) for j < count, 0 up to the next multiple of 8; returns
  // 1 / the sum (eight lanes in key order, then one horizontal sum)
  static float exponentials(float* scores, int64_t count) {
    float top = -INFINITY;  // (a maximum is exact in any order: eight lanes, then across)
    int64_t j = 0;
    if (count >= 8) {
      __m256 most = _mm256_loadu_ps(scores);
      for (j = 8; j + 8 <= count; j += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(scores + j));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, most);
      for (float lane : lanes) top = std::max(top, lane);
    }
    for (; j < count; ++j) top = std::max(top, scores[j]);
    __m256 total = _mm256_setzero_ps();
    const __m256 top8 = _mm256_set1_ps(top);
    j = 0;
#if defined(__AVX512F__)
    // sixteen at a time, added to the eight-lane total half by half: the same sums in order
    for (const __m512 top16 = _mm512_set1_ps(top); j + 16 <= count; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), top16));
      _mm512_storeu_ps(scores + j, e);
      total = _mm256_add_ps(total, _mm512_castps512_ps256(e));
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1));
      total = _mm256_add_ps(total, high);
    }
#endif
    for (; j < count; j += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top8));
      if (j + 8 > count) {  // lanes past the last key are zero
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, e);
        for (int64_t k = count - j; k < 8; ++k) lanes[k] = 0.0f;
        e = _mm256_load_ps(lanes);
      }
      _mm256_storeu_ps(scores + j, e);
      total = _mm256_add_ps(total, e);
    }
    return 1.0f / hsum_ps(total);
  }

  std::vector<Layer> layers_;
  torch::Tensor norm_;
  float eps_;
  int64_t heads_, kv_heads_, d_;
  bool int8_;
};

Linear make_linear(torch::Tensor w, int64_t type, int64_t in, torch::Tensor bias) {
  check_any(w, type, in);
  const int64_t out = rows_of(w, type);
  TORCH_CHECK(bias.numel() == 0 || (bias.dtype() == torch::kFloat32 && bias.numel() == out),
              "bias must be float32 [out] or empty");
  return Linear{w, type, in, out, bias.contiguous()};
}

Layer make_layer(torch::Tensor attn_norm, std::vector<Linear> qkv, Linear out,
                 torch::Tensor mlp_norm, std::vector<Linear> gate_up, Linear down) {
  return Layer{attn_norm.contiguous(), mlp_norm.contiguous(), std::move(qkv), {std::move(out)},
               std::move(gate_up), {std::move(down)}};
}

}  // namespace

// The passes and products run without the GIL: they touch no Python object, and a server's
// HTTP thread can then answer its clients during a pass instead of stopping the scheduler's
// thread between passes (tensors in and out are converted while it is held).
constexpr auto kFree = pybind11::call_guard<pybind11::gil_scoped_release>();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Linear>(m, "Linear").def(pybind11::init(&make_linear));
  pybind11::class_<Layer>(m, "Layer").def(pybind11::init(&make_layer));
  pybind11::class_<Model>(m, "Model")
      .def(pybind11::init<std::vector<Layer>, torch::Tensor, double, int64_t, int64_t, int64_t,
                          bool>())
      .def("forward", &Model::forward, "every decoder layer over T rows (see Model)", kFree)
      .def("forward_batch", &Model::forward_batch, "rows of several sequences in one pass",
           kFree);
  m.def("qmatmul", &qmatmul, "x @ dequantize(weight).T on GGUF blocks", kFree);
  m.def("dequantize_rows", &dequantize_rows, "rows of a GGUF-quantized matrix as float32");
  m.def("pack_rows", &pack_rows, "GGUF Q4_0/Q4_1/Q8_0 blocks regrouped R rows at a time");
  m.def("weight_arena", &weight_arena, "uint8 [bytes], 2 MiB aligned, huge pages requested");
  m.def("rows_per_pack", &rows_per_pack, "R, the output rows packed together by pack_rows");
  m.def("qmatmul_q8", &qmatmul_q8, "x rounded to 8 bits per block @ dequantize(weight).T",
        kFree);
  m.def("tiles", [](int64_t min_rows) {
    const int64_t before = amx_min_rows;
    if (min_rows > 0) amx_min_rows = min_rows;
    return pybind11::make_tuple(kAmxBuild && amx_granted(), before);
  }, "(AMX tiles usable, the fewest rows that use them); min_rows > 0 sets that count");
  m.def("prefetch", [](int64_t bytes) {
    const int64_t before = prefetch_bytes;
    if (bytes >= 0) prefetch_bytes = bytes;
    return before;
  }, "how far ahead the first row pass prefetches weights (bytes; 0: not at all); >= 0 sets it");
}
