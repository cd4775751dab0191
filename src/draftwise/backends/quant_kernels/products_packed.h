// 8-bit-activation products on blocks packed R output rows at a time (repack.h), one tile of
// activation rows per call: Q4_0/Q4_1/Q8_0, Q5_0, Q4_K/Q5_K, Q6_K, and the K types over two
// groups of R output rows at once.
#pragma once

namespace {

// What a build may tune without changing a bit of any result: how far ahead the first pass over
// a matrix prefetches its weights (bytes; 0: no prefetch), and the fewest activation rows that
// go to the AMX tiles (Q8_0; four times as many for the 4-bit types). A Model takes them from
// its constructor; the defaults were measured on this project's machines (docs/benchmarks.md).
struct Tuning {
  int64_t prefetch_bytes = 4096;
  int64_t amx_min_rows = 4;
};


// bytes of one packed block (one 256-weight super-block for Q4_K/Q5_K, with its 6-bit scales
// and mins unpacked to bytes: 148 bytes per row where the GGUF has 144; Q5_K 180 for 176)
int64_t packed_stride(int64_t type) {
  if (type == Q4_K || type == Q5_K) return kRows * (block_bytes(type) + 4);
  return kRows * block_bytes(type);
}

bool packable(int64_t type) {
  return has_q8_path(type) || type == Q5_0 || type == Q4_K || type == Q5_K || type == Q6_K;
}

// offsets inside a packed block: scales, mins (Q4_1), quants
constexpr int64_t kScales = 0, kMins = 2 * kRows;
inline int64_t quants_at(int64_t type) { return (type == Q4_1 ? 4 : 2) * kRows; }

// The 8 four-weight groups of one 32-weight block against one activation row's block, as four
// independent integer chains (integer sums: any grouping gives the same bits). ``kHalves``:
// chains 0-1 take weights 0..15 and chains 2-3 weights 16..31 (Q6_K's 16-weight scales); else
// group g goes to chain g % 4. ``kSigned``: w is int8 (Q8_0), else unsigned (nibbles, 5/6 bits).
template <bool kSigned, bool kHalves>
__attribute__((always_inline)) inline void group_dots(const typename Vec::I w[8], const int8_t* xb,
                                                      typename Vec::I part[4]) {
  for (int c = 0; c < 4; ++c) part[c] = Vec::zero();
  for (int g = 0; g < 8; ++g) {
    const int c = kHalves ? g % 2 + 2 * (g / 4) : g % 4;
    const uint8_t* four = reinterpret_cast<const uint8_t*>(xb) + 4 * g;
    if (!kSigned) {
      part[c] = Vec::dot_u4_at(part[c], w[g], four);
    } else {
      int32_t x;
      std::memcpy(&x, four, 4);
      part[c] = Vec::dot_s8(part[c], w[g], Vec::set1(x));
    }
  }
}

// Groups g0..g0+n-1 of unsigned ``kBits``-bit weights on the maddubs path (Vec::kWidenLate):
// each product is int16 sums of two byte products, and runs of up to kRun groups' int16 sums add
// before one widening to int32 (|q_x| <= 127: kRun * 2 * (2^kBits - 1) * 127 < 2^15, so none
// saturates). Half the widenings and adds of a product per group: the same exact integer. The
// run is one chain: an int16 add waits on a product, never a product on an add.
template <int kBits, int g0, int n>
__attribute__((always_inline)) inline typename Vec::I run_dot(const typename Vec::I w[8],
                                                              const int8_t* xb) {
  constexpr int kRun = 32767 / (2 * ((1 << kBits) - 1) * 127);  // 8, 4, 2 groups for 4, 5, 6 bits
  static_assert(kRun >= 2, "int16 sums of fewer than two groups gain nothing");
  const uint8_t* x = reinterpret_cast<const uint8_t*>(xb);
  typename Vec::I total = Vec::zero(), run = Vec::zero();
#pragma GCC unroll 8
  for (int i = 0; i < n; ++i) {
    const typename Vec::I p = Vec::products16(w[g0 + i], Vec::bcast4(x + 4 * (g0 + i)));
    run = i % kRun == 0 ? p : Vec::add16(run, p);
    if (i % kRun == kRun - 1 || i == n - 1)
      total = i < kRun ? Vec::widen(run) : Vec::add(total, Vec::widen(run));
  }
  return total;
}

// One block's exact integer dot product (unsigned weights of at most ``kBits`` bits, or int8).
template <bool kSigned, int kBits = 4>
__attribute__((always_inline)) inline typename Vec::I block_dot(const typename Vec::I w[8],
                                                                const int8_t* xb) {
  if constexpr (Vec::kWidenLate && !kSigned) return run_dot<kBits, 0, 8>(w, xb);
  typename Vec::I part[4];
  group_dots<kSigned, false>(w, xb, part);
  return Vec::add(Vec::add(part[0], part[1]), Vec::add(part[2], part[3]));
}

// The block's two 16-weight halves' exact integer dot products (Q6_K: 6-bit weights).
template <int kBits>
__attribute__((always_inline)) inline void half_dots(const typename Vec::I w[8], const int8_t* xb,
                                                     typename Vec::I half[2]) {
  if constexpr (Vec::kWidenLate) {
    half[0] = run_dot<kBits, 0, 4>(w, xb);
    half[1] = run_dot<kBits, 4, 4>(w, xb);
  } else {
    typename Vec::I part[4];
    group_dots<false, true>(w, xb, part);
    half[0] = Vec::add(part[0], part[1]);
    half[1] = Vec::add(part[2], part[3]);
  }
}

// Weights stream from memory once per step (a model is larger than the cache a core may use),
// and one row's products are too few operations to hide a miss: the first row pass over each
// block asks for the bytes ``Tuning::prefetch_bytes`` ahead, so several lines are in flight per core
// rather than the one the current block waits on. Within a thread's run of groups the packed
// blocks are contiguous, so the lines ahead are the next ones it reads (past a matrix's end
// they are only wasted: a prefetch never faults). No arithmetic changes.
//
// prefetch_part asks for part ``part`` of ``parts`` of those lines: spread over a block's work,
// so the loads that work needs do not queue behind a burst of misses.
inline void prefetch_part(const uint8_t* blk, int64_t stride, int64_t ahead, int part, int parts) {
  const int64_t lines = (stride + 63) / 64;
  for (int64_t line = lines * part / parts; line < lines * (part + 1) / parts; ++line)
    _mm_prefetch(reinterpret_cast<const char*>(blk + ahead + 64 * line), _MM_HINT_T0);
}

inline void prefetch_block(const uint8_t* blk, int64_t stride, int64_t ahead) {
  prefetch_part(blk, stride, ahead, 0, 1);
}

template <int T>
void packed_tile(int64_t type, const uint8_t* group, const QuantizedRows& xq, int64_t in,
                 int64_t r0, float* y, int64_t ldy, int64_t o0, int64_t ahead) {
  const int64_t blocks = in / 32, stride = packed_stride(type), lane_bytes = 4 * kRows;
  typename Vec::F acc[T];
  for (int t = 0; t < T; ++t) acc[t] = Vec::fzero();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = group + b * stride;
    if (ahead) prefetch_block(blk, stride, ahead);
    const typename Vec::F dw = Vec::halves(blk + kScales);
    typename Vec::F mw = Vec::fzero();
    typename Vec::I w[8];
    const uint8_t* q = blk + quants_at(type);
    if (type == Q8_0) {
      for (int g = 0; g < 8; ++g) w[g] = Vec::load(q + lane_bytes * g);
    } else {
      mw = type == Q4_1 ? Vec::halves(blk + kMins) : Vec::mul(dw, Vec::fset1(-8.0f));
      for (int k = 0; k < 4; ++k) {
        const typename Vec::I p = Vec::load(q + lane_bytes * k);
        w[k] = Vec::low_nibbles(p);
        w[k + 4] = Vec::high_nibbles(p);
      }
    }
#pragma GCC unroll 16  // acc[t] in registers, not on the stack
    for (int t = 0; t < T; ++t) {
      const int64_t r = r0 + t;
      const int8_t* xb = xq.q.data() + r * in + 32 * b;
      const typename Vec::I dot = type == Q8_0 ? block_dot<true>(w, xb) : block_dot<false>(w, xb);
      const typename Vec::F dx = Vec::fset1(xq.scale[r * blocks + b]);
      acc[t] = Vec::fma(Vec::to_float(dot), Vec::mul(dw, dx), acc[t]);
      if (type != Q8_0) acc[t] = Vec::fma(mw, Vec::fset1(xq.sum[r * blocks + b]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) Vec::store(y + (r0 + t) * ldy + o0, acc[t]);
}

// One Q4_K/Q5_K sub-block of one activation row into its accumulator: acc + float(dot) d1 d_x,
// less m1 d_x sum(q_x), in this order (the bits depend on it; packed_tile2_q4k does the same
// with each row's broadcasts shared by its two groups).
__attribute__((always_inline)) inline typename Vec::F q4k_step(typename Vec::F acc,
                                                               typename Vec::I dot,
                                                               typename Vec::F d1,
                                                               typename Vec::F m1,
                                                               const QuantizedRows& xq,
                                                               int64_t at) {
  acc = Vec::fma(Vec::to_float(dot), Vec::mul(d1, Vec::fset1(xq.scale[at])), acc);
  return Vec::fnma(m1, Vec::fset1(xq.sum[at]), acc);
}

// Q4_K, packed per super-block: half d[R], dmin[R], uint8 sc[8][R], m[8][R], then for each
// pair j of 32-weight sub-blocks uint8 q[8][4R] with q[k][4r + i] = qs_r[32j + 4k + i] (low
// nibbles: sub-block 2j, high: 2j + 1). Sub-block s of row r weighs w = d1 q - m1 with
// d1 = d sc[s] and m1 = dmin m[s] in float32, as ggml decodes it, against the 32-value
// activation block it covers: acc = fma(float(dot), d1 d_x, acc); acc -= m1 d_x sum(q_x).
// ``kFive`` (Q5_K): then uint8 H[8][4R] follow the quants, H[k][4r + i] = qh_r[4k + i], whose bit
// s is the fifth bit (16) of weight 4k + i of sub-block s: q = nibble | bit << 4, 0..31.
template <int T, bool kFive>
void packed_tile_q4k(const uint8_t* group, const QuantizedRows& xq, int64_t in, int64_t r0,
                     float* y, int64_t ldy, int64_t o0, int64_t ahead) {
  constexpr int64_t kType = kFive ? Q5_K : Q4_K;
  const int64_t supers = in / 256, blocks = in / 32, stride = packed_stride(kType);
  const int64_t lane_bytes = 4 * kRows;
  typename Vec::F acc[T];
  for (int t = 0; t < T; ++t) acc[t] = Vec::fzero();
  for (int64_t sb = 0; sb < supers; ++sb) {
    const uint8_t* blk = group + sb * stride;
    const typename Vec::F d = Vec::halves(blk), dmin = Vec::halves(blk + 2 * kRows);
    const uint8_t* sc = blk + 4 * kRows;
    const uint8_t* mn = blk + 12 * kRows;
    const uint8_t* q = blk + 20 * kRows;
    for (int s = 0; s < 8; ++s) {
      if (ahead) prefetch_part(blk, stride, ahead, s, 8);
      const typename Vec::F d1 = Vec::mul(d, Vec::u8s(sc + s * kRows));
      const typename Vec::F m1 = Vec::mul(dmin, Vec::u8s(mn + s * kRows));
      typename Vec::I w[8];
      const uint8_t* pair = q + (s / 2) * 8 * lane_bytes;
      for (int k = 0; k < 8; ++k) {
        const typename Vec::I p = Vec::load(pair + lane_bytes * k);
        w[k] = s % 2 ? Vec::high_nibbles(p) : Vec::low_nibbles(p);
        if (kFive) {
          const typename Vec::I h = Vec::load(q + 32 * lane_bytes + lane_bytes * k);
          w[k] = Vec::or_(w[k], Vec::shl4(Vec::and_(Vec::shr(h, s), Vec::set1(0x01010101))));
        }
      }
      const int64_t b = 8 * sb + s;  // the activation block
#pragma GCC unroll 16  // acc[t] in registers, not on the stack
      for (int t = 0; t < T; ++t) {
        const int64_t r = r0 + t;
        const int8_t* xb = xq.q.data() + r * in + 32 * b;
        acc[t] = q4k_step(acc[t], block_dot<false, kFive ? 5 : 4>(w, xb), d1, m1, xq,
                          r * blocks + b);
      }
    }
  }
  for (int t = 0; t < T; ++t) Vec::store(y + (r0 + t) * ldy + o0, acc[t]);
}

// Q4_K on the maddubs path (Vec::kWidenLate) for 8 rows: group by group, each group's weights
// decoded once for all T rows and its products added into the rows' int16 runs (a block's 8
// groups are one run for 4-bit weights). AVX2's 16 registers then hold the T runs, the group's
// weights and a broadcast, where packed_tile_q4k's 8 decoded groups and T accumulators would
// spill at T = 8. Each lane sums what packed_tile_q4k sums, in the same order: the same bits.
template <int T>
void packed_tile_q4k_rows(const uint8_t* group, const QuantizedRows& xq, int64_t in, int64_t r0,
                          float* y, int64_t ldy, int64_t o0, int64_t ahead) {
  static_assert(Vec::kWidenLate || T < 0, "VNNI builds sum in int32 directly: packed_tile_q4k");
  const int64_t supers = in / 256, blocks = in / 32, stride = packed_stride(Q4_K);
  const int64_t lane_bytes = 4 * kRows;
  typename Vec::F acc[T];
  for (int t = 0; t < T; ++t) acc[t] = Vec::fzero();
  for (int64_t sb = 0; sb < supers; ++sb) {
    const uint8_t* blk = group + sb * stride;
    const typename Vec::F d = Vec::halves(blk), dmin = Vec::halves(blk + 2 * kRows);
    const uint8_t* q = blk + 20 * kRows;
    for (int s = 0; s < 8; ++s) {
      if (ahead) prefetch_part(blk, stride, ahead, s, 8);
      const int64_t b = 8 * sb + s;  // the activation block
      typename Vec::I run[T];
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const typename Vec::I p = Vec::load(q + (s / 2) * 8 * lane_bytes + lane_bytes * k);
        const typename Vec::I w = s % 2 ? Vec::high_nibbles(p) : Vec::low_nibbles(p);
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) {
          const uint8_t* x = reinterpret_cast<const uint8_t*>(xq.q.data() + (r0 + t) * in + 32 * b);
          const typename Vec::I product = Vec::products16(w, Vec::bcast4(x + 4 * k));
          run[t] = k == 0 ? product : Vec::add16(run[t], product);
        }
      }
      const typename Vec::F d1 = Vec::mul(d, Vec::u8s(blk + 4 * kRows + s * kRows));
      const typename Vec::F m1 = Vec::mul(dmin, Vec::u8s(blk + 12 * kRows + s * kRows));
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        acc[t] = q4k_step(acc[t], Vec::widen(run[t]), d1, m1, xq, (r0 + t) * blocks + b);
      }
    }
  }
  for (int t = 0; t < T; ++t) Vec::store(y + (r0 + t) * ldy + o0, acc[t]);
}

// Four-weight group k of activation block b, rows r0..r0+T: each row's four bytes broadcast
// once into both groups' integer dot products.
template <int T>
__attribute__((always_inline)) inline void pair_dots(const typename Vec::I w[2],
                                                     const QuantizedRows& xq, int64_t in,
                                                     int64_t r0, int64_t b, int k,
                                                     typename Vec::I dot[2][T]) {
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    const typename Vec::I x = Vec::bcast4(
        reinterpret_cast<const uint8_t*>(xq.q.data() + (r0 + t) * in + 32 * b) + 4 * k);
    dot[0][t] = Vec::dot_u4(dot[0][t], w[0], x);
    dot[1][t] = Vec::dot_u4(dot[1][t], w[1], x);
  }
}

// packed_tile_q4k over two neighbouring groups (2R output rows) at once: each activation row's
// four bytes are broadcast once for both groups' products. A broadcast costs as much as a
// product on these CPUs, so one group per broadcast left the products at half their rate. Every
// lane computes exactly what packed_tile_q4k computes, in the same order: the same bits.
template <int T, bool kFive>
void packed_tile2_q4k(const uint8_t* group, int64_t group_bytes, const QuantizedRows& xq,
                      int64_t in, int64_t r0, float* y, int64_t ldy, int64_t o0, int64_t ahead) {
  constexpr int64_t kType = kFive ? Q5_K : Q4_K;
  const int64_t supers = in / 256, blocks = in / 32, stride = packed_stride(kType);
  const int64_t lane_bytes = 4 * kRows;
  typename Vec::F acc[2][T];
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < T; ++t) acc[h][t] = Vec::fzero();
  for (int64_t sb = 0; sb < supers; ++sb) {
    const uint8_t* blk[2] = {group + sb * stride, group + group_bytes + sb * stride};
    for (int s = 0; s < 8; ++s) {
      if (ahead) {
        prefetch_part(blk[0], stride, ahead, s, 8);
        prefetch_part(blk[1], stride, ahead, s, 8);
      }
      typename Vec::F d1[2], m1[2];
      for (int h = 0; h < 2; ++h) {
        d1[h] = Vec::mul(Vec::halves(blk[h]), Vec::u8s(blk[h] + 4 * kRows + s * kRows));
        m1[h] = Vec::mul(Vec::halves(blk[h] + 2 * kRows), Vec::u8s(blk[h] + 12 * kRows + s * kRows));
      }
      const int64_t b = 8 * sb + s;  // the activation block
      typename Vec::I dot[2][T];
      for (int h = 0; h < 2; ++h)
        for (int t = 0; t < T; ++t) dot[h][t] = Vec::zero();
      for (int k = 0; k < 8; ++k) {
        typename Vec::I w[2];
        for (int h = 0; h < 2; ++h) {
          const uint8_t* q = blk[h] + 20 * kRows;
          const typename Vec::I p = Vec::load(q + (s / 2) * 8 * lane_bytes + lane_bytes * k);
          w[h] = s % 2 ? Vec::high_nibbles(p) : Vec::low_nibbles(p);
          if (kFive) {
            const typename Vec::I hb = Vec::load(q + 32 * lane_bytes + lane_bytes * k);
            w[h] = Vec::or_(w[h], Vec::shl4(Vec::and_(Vec::shr(hb, s), Vec::set1(0x01010101))));
          }
        }
        pair_dots<T>(w, xq, in, r0, b, k, dot);
      }
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        const int64_t r = r0 + t;
        const typename Vec::F dx = Vec::fset1(xq.scale[r * blocks + b]);
        const typename Vec::F sx = Vec::fset1(xq.sum[r * blocks + b]);
        for (int h = 0; h < 2; ++h) {
          acc[h][t] = Vec::fma(Vec::to_float(dot[h][t]), Vec::mul(d1[h], dx), acc[h][t]);
          acc[h][t] = Vec::fnma(m1[h], sx, acc[h][t]);
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    Vec::store(y + (r0 + t) * ldy + o0, acc[0][t]);
    Vec::store(y + (r0 + t) * ldy + o0 + kRows, acc[1][t]);
  }
}

// Q6_K, packed per super-block: half d[R], int8 sc[16][R], then per 128-weight half n the
// bytes ql[n*64 + 4k..], ql[n*64 + 32 + 4k..] and qh[n*32 + 4k..] of every row as
// A[8][4R], B[8][4R], H[8][4R] (k = 0..7). 32-weight block c of half n is
// q = (A or B nibble) | (2 bits of H) << 4, minus 32; its first and last 16 weights have scales
// d sc[8n + 2c] and d sc[8n + 2c + 1]. Per 16 weights: integer dot of q (0..63) with q_x, less
// 32 sum(q_x) (exact), then acc = fma(float(that), d sc d_x, acc).
template <int T>
void packed_tile_q6k(const uint8_t* group, const QuantizedRows& xq, int64_t in, int64_t r0,
                     float* y, int64_t ldy, int64_t o0, int64_t ahead) {
  const int64_t supers = in / 256, blocks = in / 32, stride = packed_stride(Q6_K);
  const int64_t lane_bytes = 4 * kRows;
  typename Vec::F acc[T];
  for (int t = 0; t < T; ++t) acc[t] = Vec::fzero();
  const typename Vec::I two = Vec::set1(0x03030303);
  for (int64_t sb = 0; sb < supers; ++sb) {
    const uint8_t* blk = group + sb * stride;
    
    const typename Vec::F d = Vec::halves(blk);
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 2 * kRows);
    for (int n = 0; n < 2; ++n) {
      const uint8_t* A = blk + 18 * kRows + n * 96 * kRows;
      const uint8_t* B = A + 8 * lane_bytes;
      const uint8_t* H = B + 8 * lane_bytes;
      for (int c = 0; c < 4; ++c) {
        if (ahead) prefetch_part(blk, stride, ahead, 4 * n + c, 8);
        typename Vec::I w[8];
        for (int k = 0; k < 8; ++k) {
          const typename Vec::I low = Vec::load((c % 2 ? B : A) + lane_bytes * k);
          const typename Vec::I nib = c < 2 ? Vec::low_nibbles(low) : Vec::high_nibbles(low);
          const typename Vec::I h = Vec::load(H + lane_bytes * k);
          w[k] = Vec::or_(nib, Vec::shl4(Vec::and_(Vec::shr(h, 2 * c), two)));
        }
        const typename Vec::F d_a = Vec::mul(d, Vec::s8s(sc + (8 * n + 2 * c) * kRows));
        const typename Vec::F d_b = Vec::mul(d, Vec::s8s(sc + (8 * n + 2 * c + 1) * kRows));
        const int64_t b = 8 * sb + 4 * n + c;  // the activation block
#pragma GCC unroll 16  // acc[t] in registers, not on the stack
        for (int t = 0; t < T; ++t) {
          const int64_t r = r0 + t;
          const int8_t* xb = xq.q.data() + r * in + 32 * b;
          typename Vec::I half[2];
          half_dots<6>(w, xb, half);
          const int32_t* halves = xq.half_sums.data() + 2 * (r * blocks + b);
          const typename Vec::I dot_a = Vec::sub(half[0], Vec::set1(32 * halves[0]));
          const typename Vec::I dot_b = Vec::sub(half[1], Vec::set1(32 * halves[1]));
          const typename Vec::F dx = Vec::fset1(xq.scale[r * blocks + b]);
          acc[t] = Vec::fma(Vec::to_float(dot_a), Vec::mul(d_a, dx), acc[t]);
          acc[t] = Vec::fma(Vec::to_float(dot_b), Vec::mul(d_b, dx), acc[t]);
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) Vec::store(y + (r0 + t) * ldy + o0, acc[t]);
}

// packed_tile_q6k over two neighbouring groups at once (see packed_tile2_q4k): the same bits.
// The two high bits of block c sit at bits 2c, 2c + 1 of each H byte; one 16-bit shift puts them
// at bits 4, 5 (bits shifted in from the neighbouring byte fall outside the 0x30 mask).
template <int T>
void packed_tile2_q6k(const uint8_t* group, int64_t group_bytes, const QuantizedRows& xq,
                      int64_t in, int64_t r0, float* y, int64_t ldy, int64_t o0, int64_t ahead) {
  const int64_t supers = in / 256, blocks = in / 32, stride = packed_stride(Q6_K);
  const int64_t lane_bytes = 4 * kRows;
  typename Vec::F acc[2][T];
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < T; ++t) acc[h][t] = Vec::fzero();
  const typename Vec::I high_mask = Vec::set1(0x30303030);
  for (int64_t sb = 0; sb < supers; ++sb) {
    const uint8_t* blk[2] = {group + sb * stride, group + group_bytes + sb * stride};
    for (int n = 0; n < 2; ++n) {
      for (int c = 0; c < 4; ++c) {
        if (ahead) {
          prefetch_part(blk[0], stride, ahead, 4 * n + c, 8);
          prefetch_part(blk[1], stride, ahead, 4 * n + c, 8);
        }
        const int64_t b = 8 * sb + 4 * n + c;  // the activation block
        for (int half = 0; half < 2; ++half) {  // weights 16 half .. 16 half + 15: one scale
          typename Vec::F scale[2];
          for (int h = 0; h < 2; ++h)
            scale[h] = Vec::mul(Vec::halves(blk[h]),
                                Vec::s8s(reinterpret_cast<const int8_t*>(blk[h] + 2 * kRows) +
                                         (8 * n + 2 * c + half) * kRows));
          typename Vec::I dot[2][T];
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) {
            const int32_t* halves = xq.half_sums.data() + 2 * ((r0 + t) * blocks + b);
            dot[0][t] = Vec::set1(-32 * halves[half]);
            dot[1][t] = dot[0][t];
          }
          for (int k = 4 * half; k < 4 * half + 4; ++k) {
            typename Vec::I w[2];
            for (int h = 0; h < 2; ++h) {
              const uint8_t* A = blk[h] + 18 * kRows + n * 96 * kRows;
              const typename Vec::I low = Vec::load(A + (c % 2) * 8 * lane_bytes + lane_bytes * k);
              const typename Vec::I nib = c < 2 ? Vec::low_nibbles(low) : Vec::high_nibbles(low);
              const typename Vec::I hb = Vec::load(A + 16 * lane_bytes + lane_bytes * k);
              const typename Vec::I moved =
                  c == 0 ? Vec::shl4(hb) : c == 1 ? Vec::shl2(hb) : c == 2 ? hb : Vec::shr(hb, 2);
              w[h] = Vec::or_(nib, Vec::and_(moved, high_mask));
            }
            pair_dots<T>(w, xq, in, r0, b, k, dot);
          }
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t) {
            const typename Vec::F dx = Vec::fset1(xq.scale[(r0 + t) * blocks + b]);
            for (int h = 0; h < 2; ++h)
              acc[h][t] = Vec::fma(Vec::to_float(dot[h][t]), Vec::mul(scale[h], dx), acc[h][t]);
          }
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    Vec::store(y + (r0 + t) * ldy + o0, acc[0][t]);
    Vec::store(y + (r0 + t) * ldy + o0 + kRows, acc[1][t]);
  }
}

// Q5_0, packed: half d[R], uint32 qh[R], uint8 q[4][4R] laid out as Q4_0's. Group g (weights
// 4g..4g+3) of lane r is its nibbles plus bits 4g..4g+3 of qh_r, each moved to bit 4 of its byte
// (t * 0x00204081 spreads 4 bits to the low bit of 4 bytes, no carries); q - 16 in integers.
template <int T>
void packed_tile_q5(const uint8_t* group, const QuantizedRows& xq, int64_t in, int64_t r0,
                    float* y, int64_t ldy, int64_t o0, int64_t ahead) {
  const int64_t blocks = in / 32, stride = packed_stride(Q5_0), lane_bytes = 4 * kRows;
  typename Vec::F acc[T];
  for (int t = 0; t < T; ++t) acc[t] = Vec::fzero();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = group + b * stride;
    if (ahead) prefetch_block(blk, stride, ahead);
    const typename Vec::F dw = Vec::halves(blk);
    const typename Vec::I qh = Vec::load(blk + 2 * kRows);
    const uint8_t* q = blk + 6 * kRows;
    typename Vec::I w[8];
    for (int k = 0; k < 4; ++k) {
      const typename Vec::I p = Vec::load(q + lane_bytes * k);
      w[k] = Vec::low_nibbles(p);
      w[k + 4] = Vec::high_nibbles(p);
    }
    for (int g = 0; g < 8; ++g) {
      const typename Vec::I bits = Vec::and_(Vec::shr32(qh, 4 * g), Vec::set1(0xF));
      const typename Vec::I spread =
          Vec::and_(Vec::mullo(bits, Vec::set1(0x00204081)), Vec::set1(0x01010101));
      w[g] = Vec::or_(w[g], Vec::shl4(spread));
    }
#pragma GCC unroll 16  // acc[t] in registers, not on the stack
    for (int t = 0; t < T; ++t) {
      const int64_t r = r0 + t;
      const int8_t* xb = xq.q.data() + r * in + 32 * b;
      const int32_t* halves = xq.half_sums.data() + 2 * (r * blocks + b);
      const typename Vec::I dot =
          Vec::sub(block_dot<false, 5>(w, xb), Vec::set1(16 * (halves[0] + halves[1])));
      acc[t] = Vec::fma(Vec::to_float(dot), Vec::mul(dw, Vec::fset1(xq.scale[r * blocks + b])),
                        acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) Vec::store(y + (r0 + t) * ldy + o0, acc[t]);
}


}  // namespace
