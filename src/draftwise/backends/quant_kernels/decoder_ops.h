// The decoder's per-row pieces: linears over their GGUF parts, RMSNorm, rotary, and the KV
// cache's float16/float32 rows.
#pragma once

namespace {

struct Linear {
  torch::Tensor w;  // uint8 [out, row_bytes] blocks (type F32: float32 rows viewed as bytes)
  int64_t type, in, out;
  torch::Tensor bias;  // float32 [out], or empty
};

struct Layer {
  torch::Tensor attn_norm, mlp_norm;
  // parts on one input, outputs side by side (out and down: one part each)
  std::vector<Linear> qkv, out, gate_up, down;
  // Gemma 3 (empty elsewhere): per-head norms of queries and keys, norms of the attention's
  // and the MLP's outputs before each residual add
  torch::Tensor q_norm, k_norm, post_attn_norm, post_mlp_norm;
  int64_t reach = 0;  // a sliding layer's: its rows see the keys of their last reach positions
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
           bool int8, const Tuning& tuning, bool batched = false) {
  const int64_t in = parts[0].in;
  std::unique_ptr<QuantizedRows> xq;
  int64_t offset = 0;
  for (const auto& p : parts) {
    const uint8_t* wp = p.w.data_ptr<uint8_t>();
    const int64_t row_bytes = p.w.size(1);
    if (p.type > kPacked) {
      if (!xq) xq = std::make_unique<QuantizedRows>(quantize_rows(x, n, in));
      matmul_packed(p.type - kPacked, wp, p.out, *xq, n, in, y + offset, ldy, tuning);
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

}  // namespace
