// The packed products' vector on AVX2 (R = 8 output rows per register of lanes; AVX-VNNI or
// AVX-512 VL dpbusd where built with them, else maddubs + madd). Included by simd.h.
#pragma once

constexpr int64_t kRows = 8;
struct Vec {
  using I = __m256i;
  using F = __m256;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I bcast4(const uint8_t* p) {  // the 4 bytes at p in every lane
    int32_t four;
    std::memcpy(&four, p, 4);
    return _mm256_set1_epi32(four);
  }
  static I low_nibbles(I p) { return _mm256_and_si256(p, _mm256_set1_epi8(0x0F)); }
  static I high_nibbles(I p) {
    return _mm256_and_si256(_mm256_srli_epi16(p, 4), _mm256_set1_epi8(0x0F));
  }
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
  static constexpr bool kWidenLate = false;
#else
  // Without VNNI a product is maddubs (int16 sums of two byte products) widened to int32 by madd
  // with ones: several groups' int16 sums may add before one widening (run_dot says when).
  static constexpr bool kWidenLate = true;
#endif
  static I products16(I w, I x) { return _mm256_maddubs_epi16(w, x); }
  static I add16(I a, I b) { return _mm256_add_epi16(a, b); }
  static I widen(I p16) { return _mm256_madd_epi16(p16, _mm256_set1_epi16(1)); }
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
  static I dot_u4_at(I sum, I w, const uint8_t* p) { return dot_u4(sum, w, bcast4(p)); }
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
  static I shl2(I a) { return _mm256_slli_epi16(a, 2); }
  static I shr32(I a, int bits) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(bits)); }
  static I mullo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static F s8s(const int8_t* p) {  // R signed bytes -> R floats
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};
