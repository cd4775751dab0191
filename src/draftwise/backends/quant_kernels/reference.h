// Plain scalar dequantization, one function per GGUF block type: ggml's formulas written out
// with no vector instructions and no fused multiply-adds, so each weight is the float32 value
// ggml's reference (and the gguf package) computes. The SIMD decoders (blocks.h, repack.h) and
// the products built on them are tested against these; nothing on a fast path calls them.
#pragma once

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

namespace {

inline float half_bits(const uint8_t* p) { return half_to_float(p); }

void dequantize_q4_0_generic(const uint8_t* b, float* y) {  // half d, uint8 qs[16]
  const float d = half_bits(b);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>((b[2 + j] & 0x0F) - 8);
    y[j + 16] = d * static_cast<float>((b[2 + j] >> 4) - 8);
  }
}

void dequantize_q4_1_generic(const uint8_t* b, float* y) {  // half d, half m, uint8 qs[16]
  const float d = half_bits(b), m = half_bits(b + 2);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(b[4 + j] & 0x0F) + m;
    y[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
  }
}

void dequantize_q5_0_generic(const uint8_t* b, float* y) {  // half d, uint32 qh, uint8 qs[16]
  const float d = half_bits(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  for (int j = 0; j < 16; ++j) {
    const int lo = (b[6 + j] & 0x0F) | static_cast<int>(((qh >> j) & 1u) << 4);
    const int hi = (b[6 + j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
    y[j] = d * static_cast<float>(lo - 16);
    y[j + 16] = d * static_cast<float>(hi - 16);
  }
}

void dequantize_q8_0_generic(const uint8_t* b, float* y) {  // half d, int8 qs[32]
  const float d = half_bits(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}

// the 6-bit scale and min of sub-block j of a Q4_K/Q5_K block's 12 scale bytes
float scale_k4(int j, const uint8_t* scales) {
  return static_cast<float>(j < 4 ? scales[j] & 63
                                  : (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4));
}

float min_k4(int j, const uint8_t* scales) {
  return static_cast<float>(j < 4 ? scales[j + 4] & 63
                                  : (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
}

// half d, half dmin, uint8 scales[12] (6-bit scale and min per 32 weights), uint8 qs[128]
void dequantize_q4_k_generic(const uint8_t* b, float* y) {
  const float d = half_bits(b), dmin = half_bits(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0; j < 8; ++j) {  // sub-block j: 32 weights
    const float d1 = d * scale_k4(j, scales), m1 = dmin * min_k4(j, scales);
    const uint8_t* qs = q + 32 * (j / 2);
    for (int l = 0; l < 32; ++l) {
      const int v = j % 2 == 0 ? (qs[l] & 0x0F) : (qs[l] >> 4);
      y[32 * j + l] = d1 * static_cast<float>(v) - m1;
    }
  }
}

// half d, half dmin, uint8 scales[12] (as Q4_K), uint8 qh[32] (bit j of byte l: the fifth bit
// of weight l of sub-block j), uint8 qs[128] (as Q4_K)
void dequantize_q5_k_generic(const uint8_t* b, float* y) {
  const float d = half_bits(b), dmin = half_bits(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* q = b + 48;
  for (int j = 0; j < 8; ++j) {
    const float d1 = d * scale_k4(j, scales), m1 = dmin * min_k4(j, scales);
    const uint8_t* qs = q + 32 * (j / 2);
    for (int l = 0; l < 32; ++l) {
      const int low = j % 2 == 0 ? (qs[l] & 0x0F) : (qs[l] >> 4);
      const int v = low | (((qh[l] >> j) & 1) << 4);
      y[32 * j + l] = d1 * static_cast<float>(v) - m1;
    }
  }
}

// uint8 ql[128] (low 4 bits), uint8 qh[64] (high 2 bits), int8 scales[16], half d
void dequantize_q6_k_generic(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_bits(b + 208);
  for (int n = 0; n < 2; ++n) {  // halves of 128 weights
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
    y += 128, ql += 64, qh += 32, sc += 8;
  }
}

// one row of GGUF blocks -> float32 (F32 rows are copied)
void dequantize_row_generic(int64_t type, const uint8_t* row, int64_t in, float* out) {
  const int64_t bw = block_weights(type), bb = block_bytes(type);
  for (int64_t blk = 0; blk < in / bw; ++blk) {
    const uint8_t* b = row + blk * bb;
    float* y = out + blk * bw;
    switch (type) {
      case F32: std::memcpy(y, b, 32 * sizeof(float)); break;
      case Q4_0: dequantize_q4_0_generic(b, y); break;
      case Q4_1: dequantize_q4_1_generic(b, y); break;
      case Q5_0: dequantize_q5_0_generic(b, y); break;
      case Q8_0: dequantize_q8_0_generic(b, y); break;
      case Q4_K: dequantize_q4_k_generic(b, y); break;
      case Q5_K: dequantize_q5_k_generic(b, y); break;
      case Q6_K: dequantize_q6_k_generic(b, y); break;
      default: TORCH_CHECK(false, "no reference decoding for type ", type);
    }
  }
}

}  // namespace

// weight: [out, row_bytes] GGUF blocks (the file's layout) -> [out, in] float32, scalar code
torch::Tensor dequantize_reference(torch::Tensor weight, int64_t type, int64_t in) {
  check(weight, type, in);
  auto y = torch::empty({weight.size(0), in}, torch::kFloat32);
  for (int64_t o = 0; o < weight.size(0); ++o)
    dequantize_row_generic(type, weight.data_ptr<uint8_t>() + o * weight.size(1), in,
                           y.data_ptr<float>() + o * in);
  return y;
}

#pragma GCC pop_options
