// The packed products' vector on AVX-512 (R = 16 output rows per register of lanes; VNNI
// dpbusd for the integer dot products). Included by simd.h on AVX-512 VNNI builds only.
#pragma once

constexpr int64_t kRows = 16;
struct Vec {
  using I = __m512i;
  using F = __m512;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I bcast4(const uint8_t* p) {  // the 4 bytes at p in every lane
    int32_t four;
    std::memcpy(&four, p, 4);
    return _mm512_set1_epi32(four);
  }
  static I low_nibbles(I p) { return _mm512_and_si512(p, _mm512_set1_epi8(0x0F)); }
  static I high_nibbles(I p) {
    return _mm512_and_si512(_mm512_srli_epi16(p, 4), _mm512_set1_epi8(0x0F));
  }
  // dpbusd sums into int32 itself: the int16 steps of the maddubs path (simd_avx2.h) are never
  // taken here, and exist so that code naming them compiles on every build
  static constexpr bool kWidenLate = false;
  static I products16(I w, I x) { return _mm512_maddubs_epi16(w, x); }
  static I add16(I a, I b) { return _mm512_add_epi16(a, b); }
  static I widen(I p16) { return _mm512_madd_epi16(p16, _mm512_set1_epi16(1)); }
  static I dot_u4(I sum, I w, I x) { return _mm512_dpbusd_epi32(sum, w, x); }
  // dot_u4 with x = the 4 bytes at p broadcast by the instruction itself ({1to16}): GCC does
  // not fold _mm512_set1_epi32 into vpdpbusd, and the separate broadcasts were a third of the
  // instructions of a 4-bit block's product
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
  static I shl2(I a) { return _mm512_slli_epi16(a, 2); }
  static I shr32(I a, int bits) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(bits)); }
  static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static F s8s(const int8_t* p) {  // R signed bytes -> R floats
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
