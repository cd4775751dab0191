// The packed layout: GGUF blocks regrouped R output rows at a time (the same bytes; Q4_K's
// scales unpacked to bytes), a packed row decoded back, and the entry points that take
// either layout (qmatmul_q8, dequantize_rows).
#pragma once

namespace {


// one row of a packed matrix, decoded to float32 (as ggml dequantizes the original block)
void decode_packed_row(int64_t type, const uint8_t* wp, int64_t o, int64_t in, float* out) {
  const int64_t r = o % kRows;
  if (type == Q4_K || type == Q5_K) {  // Q5_K: plus the fifth bits after the quants
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
          const int64_t at = (l / 4) * 4 * kRows + 4 * r + l % 4;
          const uint8_t byte = q[(s / 2) * 32 * kRows + at];
          int v = s % 2 ? byte >> 4 : byte & 0xF;
          if (type == Q5_K) v |= ((q[128 * kRows + at] >> s) & 1) << 4;
          const float nib = static_cast<float>(v);
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


// Q4_K, and Q5_K with its qh[32] after the quants as H[8][4R] (H[c][4r + i] = qh_r[4c + i])
torch::Tensor pack_q4k(torch::Tensor weight, int64_t in, int64_t type) {
  const int64_t out = weight.size(0), row_bytes = weight.size(1), supers = in / 256;
  const int64_t stride = packed_stride(type), bytes = block_bytes(type);
  const int64_t quants = type == Q5_K ? 48 : 16;
  auto packed = torch::empty({out / kRows, supers * stride}, weight.options());
  const uint8_t* src = weight.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  for (int64_t g = 0; g < out / kRows; ++g) {
    for (int64_t sb = 0; sb < supers; ++sb) {
      uint8_t* blk = dst + (g * supers + sb) * stride;
      for (int64_t r = 0; r < kRows; ++r) {
        const uint8_t* orig = src + (kRows * g + r) * row_bytes + sb * bytes;
        std::memcpy(blk + 2 * r, orig, 2);                  // d
        std::memcpy(blk + 2 * kRows + 2 * r, orig + 2, 2);  // dmin
        for (int s = 0; s < 8; ++s) {
          uint8_t sc, m;
          scale_min_k4(s, orig + 4, &sc, &m);
          blk[4 * kRows + s * kRows + r] = sc;
          blk[12 * kRows + s * kRows + r] = m;
        }
        const uint8_t* qs = orig + quants;
        uint8_t* q = blk + 20 * kRows;
        for (int64_t c = 0; c < 32; ++c)  // 4-byte groups: pair c / 8, group c % 8
          std::memcpy(q + 4 * kRows * c + 4 * r, qs + 4 * c, 4);
        if (type == Q5_K) {
          for (int64_t c = 0; c < 8; ++c)
            std::memcpy(q + 128 * kRows + 4 * kRows * c + 4 * r, orig + 16 + 4 * c, 4);
        }
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

// GGUF blocks [out, row_bytes] (Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q5_K/Q6_K, out % rows_per_pack() == 0)
// -> the packed layout (the same bytes regrouped; the K types' 6-bit scales unpacked to bytes)
torch::Tensor pack_rows(torch::Tensor weight, int64_t type, int64_t in) {
  check(weight, type, in);
  TORCH_CHECK(packable(type) && weight.size(0) % kRows == 0,
              "packing needs a packable block type and a multiple of ", kRows, " rows");
  if (type == Q4_K || type == Q5_K) return pack_q4k(weight, in, type);
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

// x: [n, in] float32, rounded to 8 bits per 32-block; weight: Q4_0/Q4_1/Q8_0 -> [n, out].
// amx_min_rows: as Tuning's (a packed weight only).
torch::Tensor qmatmul_q8(torch::Tensor x, torch::Tensor weight, int64_t type, int64_t in,
                         int64_t amx_min_rows) {
  if (type > kPacked) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == in,
                "x must be a float32 [n, in_features] tensor");
    x = x.contiguous();
    const int64_t n = x.size(0), out = weight.size(0) * kRows;
    const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), n, in);
    auto y = torch::empty({n, out}, x.options());
    TORCH_CHECK(amx_min_rows >= 1, "amx_min_rows must be >= 1");
    Tuning tuning;
    tuning.amx_min_rows = amx_min_rows;
    matmul_packed(type - kPacked, weight.data_ptr<uint8_t>(), out, xq, n, in,
                  y.data_ptr<float>(), out, tuning);
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
