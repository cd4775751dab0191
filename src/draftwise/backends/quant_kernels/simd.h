// One vector type per instruction set for the packed products (see products_packed.h): the
// build's flags pick it; every variant computes the same exact integer sums.
#pragma once

namespace {

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
#include "simd_avx512.h"
#else
#include "simd_avx2.h"
#endif
}  // namespace
