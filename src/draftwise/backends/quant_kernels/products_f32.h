// Float32-activation products on the GGUF layout: each block decoded once per call and used for
// every activation row, one fixed accumulation order per output (see quant_kernels.cpp).
#pragma once

namespace {

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
