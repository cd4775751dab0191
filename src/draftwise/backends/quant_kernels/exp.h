// e^x as one polynomial (Cephes' expf) for 8 lanes, 16 lanes and scalars alike, so softmax and
// SiLU give the same bits whichever width computes them.
#pragma once

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


}  // namespace
