// GGUF block formats: type ids, block sizes, and decoding a block to float32 exactly as ggml
// dequantizes it (AVX2), for the float32 products and for rows looked up by id.
#pragma once

namespace {

enum Type : int64_t { F32 = 0, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

int64_t block_weights(int64_t type) { return (type == Q4_K || type == Q5_K || type == Q6_K) ? 256 : 32; }

int64_t block_bytes(int64_t type) {
  switch (type) {
    case F32: return 128;  // dense rows, read as 32-float "blocks"
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
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
  if (type == Q4_K || type == Q5_K) {  // Q5_K: Q4_K's nibbles plus a fifth bit from qh
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t* scales = b + 4;
    const bool five = type == Q5_K;
    const uint8_t* qh = b + 16;  // (Q5_K)
    const uint8_t* q = b + (five ? 48 : 16);
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int j = 0; j < 8; j += 2) {  // 64 weights: 32 low nibbles, then 32 high nibbles
      uint8_t sc, m;
      scale_min_k4(j, scales, &sc, &m);
      const __m256 d1 = _mm256_set1_ps(d * sc), m1 = _mm256_set1_ps(dmin * m);
      scale_min_k4(j + 1, scales, &sc, &m);
      const __m256 d2 = _mm256_set1_ps(d * sc), m2 = _mm256_set1_ps(dmin * m);
      for (int half = 0; half < 2; ++half) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * half));
        __m128i lo = _mm_and_si128(raw, mask);
        __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        if (five) {  // bit j (low nibbles) and j + 1 (high) of qh[l], moved to bit 4
          const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + 16 * half));
          const __m128i one = _mm_set1_epi8(1);
          lo = _mm_or_si128(lo, _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, j), one), 4));
          hi = _mm_or_si128(hi, _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, j + 1), one), 4));
        }
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


}  // namespace
