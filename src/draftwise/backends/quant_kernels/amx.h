// AMX tiles (Sapphire Rapids and later) for products of many rows: the same exact integer block
// dot products as the VNNI path, so the same bits.
#pragma once

namespace {

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
                                   std::vector<uint8_t>& buffer, int64_t* stride,
                                   int64_t ahead) {
  if (type == Q8_0) {
    *stride = packed_stride(type);
    return group + quants_at(type);
  }
  buffer.resize(512 * blocks + 64);
  uint8_t* out = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64;
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_block(group + b * packed_stride(type), packed_stride(type), ahead);
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
              int64_t o0, int64_t ahead) {
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
    if (r0 == 0 && type == Q8_0) prefetch_block(group + b * stride, 2 * stride, ahead);
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
                                   int64_t*, int64_t) { return nullptr; }
void amx_tile(int64_t, const uint8_t*, const uint8_t*, int64_t, const QuantizedRows&, int64_t,
              int64_t, int, float*, int64_t, int64_t, int64_t) {}
#endif

}  // namespace
