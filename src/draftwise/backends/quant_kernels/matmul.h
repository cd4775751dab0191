// A packed matrix times many rows: the tiles of rows (products_packed.h) or AMX (amx.h),
// output groups split over the threads.
#pragma once

namespace {

// The tiles pay from a few rows for Q8_0 (the LM head); the 4-bit types' nibbles are split into
// a buffer first and their per-block scaling leaves the tiles little to win below a full tile,
// hence four times as many rows (Tuning::amx_min_rows).

template <int T>
inline void any_tile(int64_t type, const uint8_t* group, const QuantizedRows& xq, int64_t in,
                     int64_t r0, float* y, int64_t ldy, int64_t o0, const Tuning& tuning) {
  // prefetch on the first pass over the group's blocks only
  const int64_t ahead = r0 == 0 ? tuning.prefetch_bytes : 0;
  if (type == Q5_0) return packed_tile_q5<T>(group, xq, in, r0, y, ldy, o0, ahead);
  if (type == Q4_K) {
    if constexpr (Vec::kWidenLate && T >= 4)
      return packed_tile_q4k_rows<T>(group, xq, in, r0, y, ldy, o0, ahead);
    return packed_tile_q4k<T, false>(group, xq, in, r0, y, ldy, o0, ahead);
  }
  if (type == Q5_K) return packed_tile_q4k<T, true>(group, xq, in, r0, y, ldy, o0, ahead);
  if (type == Q6_K) return packed_tile_q6k<T>(group, xq, in, r0, y, ldy, o0, ahead);
  packed_tile<T>(type, group, xq, in, r0, y, ldy, o0, ahead);
}

template <int T>
inline void pair_tile(int64_t type, const uint8_t* group, int64_t group_bytes,
                      const QuantizedRows& xq, int64_t in, int64_t r0, float* y, int64_t ldy,
                      int64_t o0, const Tuning& tuning) {
  const int64_t ahead = r0 == 0 ? tuning.prefetch_bytes : 0;
  if (type == Q5_K)
    return packed_tile2_q4k<T, true>(group, group_bytes, xq, in, r0, y, ldy, o0, ahead);
  if (type == Q6_K) return packed_tile2_q6k<T>(group, group_bytes, xq, in, r0, y, ldy, o0, ahead);
  packed_tile2_q4k<T, false>(group, group_bytes, xq, in, r0, y, ldy, o0, ahead);
}

void matmul_packed(int64_t type, const uint8_t* wp, int64_t out, const QuantizedRows& xq,
                   int64_t n, int64_t in, float* yp, int64_t ldy, const Tuning& tuning) {
  const int64_t group_bytes = (in / block_weights(type)) * packed_stride(type);
  const int64_t tile_rows = type == Q8_0 ? tuning.amx_min_rows : 4 * tuning.amx_min_rows;
  if (kAmxBuild && has_q8_path(type) && n >= tile_rows && amx_granted()) {
    // up to 16 rows: one tile of n rows; more: tiles of 16, the rest on the VNNI path
    const int M = static_cast<int>(std::min<int64_t>(n, 16));
    const int64_t tiled = n <= 16 ? n : n / 16 * 16;
#pragma omp parallel
    {
      configure_tiles(M);
      std::vector<uint8_t> buffer;
#pragma omp for schedule(static)
      for (int64_t g = 0; g < out / kRows; ++g) {
        const uint8_t* group = wp + g * group_bytes;
        int64_t wstride = 0;
        const uint8_t* w = tile_weights(type, group, in / 32, buffer, &wstride,
                                              tuning.prefetch_bytes);
        for (int64_t r0 = 0; r0 < tiled; r0 += M)
          amx_tile(type, group, w, wstride, xq, in, r0, M, yp, ldy, kRows * g,
                   tuning.prefetch_bytes);
        int64_t r0 = tiled;
        for (; r0 + 8 <= n; r0 += 8) any_tile<8>(type, group, xq, in, r0, yp, ldy, kRows * g, tuning);
        for (; r0 < n; ++r0) any_tile<1>(type, group, xq, in, r0, yp, ldy, kRows * g, tuning);
      }
#if defined(__AMX_TILE__)
      _tile_release();
#endif
    }
    return;
  }
  // Two groups per broadcast activation (packed_tile2_*): rows in tiles of 4, the last tile up
  // to 6 (Q6_K: 5) rows in one pass, since a second pass over a few rows costs nearly a full
  // row's products at low throughput. Q6_K's weights cost more to decode than a broadcast: past
  // 5 rows one group's 8-row tile, which decodes each block once, wins (measured).
  const int64_t one_pass = type == Q6_K ? 5 : 6;
  const bool pairs = kRows == 16 && (out / kRows) % 2 == 0 &&
                     (type == Q4_K || type == Q5_K || (type == Q6_K && n <= one_pass));
  if (pairs) {
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < out / kRows; g += 2) {
      const uint8_t* group = wp + g * group_bytes;
      const int64_t o0 = kRows * g;
      int64_t r0 = 0;
      for (; n - r0 > one_pass; r0 += 4)
        pair_tile<4>(type, group, group_bytes, xq, in, r0, yp, ldy, o0, tuning);
      switch (n - r0) {
        case 6: pair_tile<6>(type, group, group_bytes, xq, in, r0, yp, ldy, o0, tuning); break;
        case 5: pair_tile<5>(type, group, group_bytes, xq, in, r0, yp, ldy, o0, tuning); break;
        case 4: pair_tile<4>(type, group, group_bytes, xq, in, r0, yp, ldy, o0, tuning); break;
        case 3: pair_tile<3>(type, group, group_bytes, xq, in, r0, yp, ldy, o0, tuning); break;
        case 2: pair_tile<2>(type, group, group_bytes, xq, in, r0, yp, ldy, o0, tuning); break;
        case 1: pair_tile<1>(type, group, group_bytes, xq, in, r0, yp, ldy, o0, tuning); break;
        default: break;
      }
    }
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < out / kRows; ++g) {
    const uint8_t* group = wp + g * group_bytes;
    const int64_t o0 = kRows * g;
    int64_t r0 = 0;
    // 32 vector registers: weights stay put for 8 activation rows; AVX2 without VNNI: Q4_K's
    // rows tile (packed_tile_q4k_rows) keeps runs, not weights, in its 16
    if (kRows == 16 || (Vec::kWidenLate && type == Q4_K)) {
      for (; r0 + 8 <= n; r0 += 8) any_tile<8>(type, group, xq, in, r0, yp, ldy, o0, tuning);
    }
    for (; r0 + 4 <= n; r0 += 4) any_tile<4>(type, group, xq, in, r0, yp, ldy, o0, tuning);
    switch (n - r0) {
      case 3: any_tile<3>(type, group, xq, in, r0, yp, ldy, o0, tuning); break;
      case 2: any_tile<2>(type, group, xq, in, r0, yp, ldy, o0, tuning); break;
      case 1: any_tile<1>(type, group, xq, in, r0, yp, ldy, o0, tuning); break;
      default: break;
    }
  }
}

}  // namespace
