// Attention for each (row, head) over exactly the keys the row may see, in position order:
// key scores (one query, a few, or many per key load) and the weighted sums of values.
#pragma once

namespace {

constexpr int64_t kKeysAhead = 32;
template <typename KV>
inline void prefetch_rows(const KV* base, const int64_t* slots, int64_t from, int64_t to,
                          int64_t d) {
  for (int64_t j = from; j < to; ++j)
    for (int64_t at = 0; at < d * static_cast<int64_t>(sizeof(KV)); at += 64)
      _mm_prefetch(reinterpret_cast<const char*>(base + slots[j] * d) + at, _MM_HINT_T0);
}

// scores[j] = scale * (q . K[slots[j]]) for j < count, eight keys at a time: one vector
// accumulator per key over the head's 8-value chunks in order, then one transposing add tree
// that gives every key ((x0+x1)+(x2+x3))+((x4+x5)+(x6+x7)) of its accumulator's lanes. Keys
// past ``count`` are a zero row, so every key, wherever it falls in a block, is summed alike.
template <typename KV>
void key_scores(const float* q, const KV* K, const int64_t* slots, int64_t count, int64_t d,
                float scale, float* scores, const KV* zero_row) {
  for (int64_t j0 = 0; j0 < count; j0 += 8) {
    prefetch_rows(K, slots, std::min(j0 + kKeysAhead, count),
                  std::min(j0 + kKeysAhead + 8, count), d);
    const KV* rows[8];
    for (int k = 0; k < 8; ++k) rows[k] = j0 + k < count ? K + slots[j0 + k] * d : zero_row;
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(qv, load8(rows[k] + i), acc[k]);
    }
    const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                      _mm256_permute2f128_ps(h0123, h4567, 0x31));
    _mm256_storeu_ps(scores + j0, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
  }
}

#if defined(__AVX512F__)
// The AVX-512 builds' scores (d % 16 == 0): sixteen keys at a time, one 16-lane accumulator per
// key over the head's 16-value chunks in order, then one transposing add tree that treats
// every key alike: pairs of lanes, then pairs of pairs within each 128-bit quarter, then
// (quarter 0 + quarter 2) + (quarter 1 + quarter 3). Half the instructions of the 8-lane
// version; a build's scores do not depend on where a key falls in a block (keys past ``count``
// are a zero row), so tree rows still get plain decoding's bits.
constexpr int64_t kKeyBlock = 16;

inline __m512 pair_sums(__m512 x, __m512 y) {  // per 128-bit quarter: x0+x1, x2+x3, y0+y1, y2+y3
  return _mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}

template <typename KV>
void key_scores_16(const float* q, const KV* K, const int64_t* slots, int64_t count,
                   int64_t d, float scale, float* scores, const KV* zero_row) {
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    prefetch_rows(K, slots, std::min(j0 + kKeysAhead, count),
                  std::min(j0 + kKeysAhead + 16, count), d);
    const KV* rows[16];
    for (int k = 0; k < 16; ++k) rows[k] = j0 + k < count ? K + slots[j0 + k] * d : zero_row;
    __m512 acc[16];
    for (int k = 0; k < 16; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 qv = _mm512_loadu_ps(q + i);
      for (int k = 0; k < 16; ++k) acc[k] = _mm512_fmadd_ps(qv, load16(rows[k] + i), acc[k]);
    }
    __m512 h[8], g[4];
    for (int k = 0; k < 8; ++k) h[k] = pair_sums(acc[2 * k], acc[2 * k + 1]);
    for (int k = 0; k < 4; ++k) g[k] = pair_sums(h[2 * k], h[2 * k + 1]);  // keys 4k..4k+3
    // g[k], quarter c: keys 4k..4k+3 summed over lanes 4c..4c+3
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(g[0], g[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(g[0], g[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(g[2], g[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(g[2], g[3], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(scores + j0, _mm512_mul_ps(sums, _mm512_set1_ps(scale)));
  }
}


// key_scores_16's scores of keys [begin, end) for Q queries (Q <= 3) that see the same keys,
// eight keys at a time: each key's 16-value chunk is loaded and widened once for all Q queries
// rather than once per query. Per key and query: the same fused multiply-adds over the head's
// chunks in order and the same add tree (pairs of lanes, pairs of pairs within each quarter,
// then (quarter 0 + quarter 2) + (quarter 1 + quarter 3)), so key_scores_16's bits.
// (end - begin) % 8 == 0.
template <int Q, typename KV>
void key_scores_group(const float* const* q, const KV* K, const int64_t* slots, int64_t begin,
                      int64_t end, int64_t d, float scale, float* const* scores) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j0 = begin; j0 < end; j0 += 8) {
    prefetch_rows(K, slots, std::min(j0 + kKeysAhead, end), std::min(j0 + kKeysAhead + 8, end),
                  d);
    const KV* rows[8];
    for (int k = 0; k < 8; ++k) rows[k] = K + slots[j0 + k] * d;
    __m512 acc[Q][8];
    for (int i = 0; i < Q; ++i)
      for (int k = 0; k < 8; ++k) acc[i][k] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16)
      for (int k = 0; k < 8; ++k) {
        const __m512 kv = load16(rows[k] + c);
        for (int i = 0; i < Q; ++i)
          acc[i][k] = _mm512_fmadd_ps(_mm512_loadu_ps(q[i] + c), kv, acc[i][k]);
      }
    for (int i = 0; i < Q; ++i) {
      __m512 h[4];
      for (int k = 0; k < 4; ++k) h[k] = pair_sums(acc[i][2 * k], acc[i][2 * k + 1]);
      const __m512 g0 = pair_sums(h[0], h[1]), g1 = pair_sums(h[2], h[3]);  // keys 0-3, 4-7
      const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(g0, g1, _MM_SHUFFLE(1, 0, 1, 0)),
                                       _mm512_shuffle_f32x4(g0, g1, _MM_SHUFFLE(3, 2, 3, 2)));
      const __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s01, _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_f32x4(s01, s01, _MM_SHUFFLE(3, 1, 3, 1)));
      _mm256_storeu_ps(scores[i] + j0, _mm512_castps512_ps256(_mm512_mul_ps(sums, s)));
    }
  }
}

// key_scores_group for any number of queries, three at a time
template <typename KV>
void key_scores_few(const float* const* q, int64_t m, const KV* K, const int64_t* slots,
                    int64_t begin, int64_t end, int64_t d, float scale, float* const* scores) {
  int64_t i = 0;
  for (; i + 3 <= m; i += 3)
    key_scores_group<3>(q + i, K, slots, begin, end, d, scale, scores + i);
  if (m - i == 2) key_scores_group<2>(q + i, K, slots, begin, end, d, scale, scores + i);
  if (m - i == 1) key_scores_group<1>(q + i, K, slots, begin, end, d, scale, scores + i);
}

// 16 rows of 16 floats -> r[j] = lane j of every row (row k in lane k)
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: rows 2i, 2i+1 interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + e], lane L: element 4L + e of rows 4i..4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), e = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, e));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, e));
  }
  for (int e = 0; e < 4; ++e) {  // element 4L + e of all rows: lane L of u[e], u[4+e], ...
    const __m512 v_lo = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44);
    const __m512 v_hi = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
    const __m512 w_lo = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44);
    const __m512 w_hi = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_f32x4(v_lo, w_lo, 0x88);
    r[4 + e] = _mm512_shuffle_f32x4(v_lo, w_lo, 0xDD);
    r[8 + e] = _mm512_shuffle_f32x4(v_hi, w_hi, 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(v_hi, w_hi, 0xDD);
  }
}

// Keys in key-major order: kt[c * 16 + k] = dimension c of key slots[k], for the 16 keys of a
// block, widened to float32 (d x 16 floats, one vector per head dimension over the keys).
template <typename KV>
void transpose_keys(const KV* K, const int64_t* slots, int64_t d, float* kt) {
  for (int64_t c = 0; c < d; c += 16) {
    __m512 r[16];
    for (int k = 0; k < 16; ++k) r[k] = load16(K + slots[k] * d + c);
    transpose16(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_ps(kt + (c + j) * 16, r[j]);
  }
}

// key_scores_16's scores of one 16-key block (kt, key-major) for m queries, into
// scores[i][0..16): every query sums its lanes' products in vertical registers. Lane j of
// key_scores_16's accumulator is part[j] here — the same fused multiply-adds over the head's
// 16-value chunks in order — and its transposing add tree, ((S0 + S2) + (S1 + S3)) with
// S_Q = (a_4Q + a_4Q+1) + (a_4Q+2 + a_4Q+3), is the same sum of parts, so every score has
// key_scores_16's bits, without its per-key shuffles.
// Q queries at a time: each key-major vector loaded once for all Q, one quarter of the parts
// (four lanes' worth) at a time so that the Q x 4 accumulators stay in registers.
template <int Q>
inline void block_scores_of(const float* const* q, const float* kt, int64_t d, __m512 s,
                            float* const* scores, int64_t j0) {
  __m512 quarter[Q][4];
  for (int G = 0; G < 4; ++G) {
    __m512 part[Q][4];
    for (int i = 0; i < Q; ++i)
      for (int j = 0; j < 4; ++j) part[i][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16)
      for (int j = 0; j < 4; ++j) {
        const __m512 k = _mm512_loadu_ps(kt + (c + 4 * G + j) * 16);
        for (int i = 0; i < Q; ++i)
          part[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(q[i][c + 4 * G + j]), k, part[i][j]);
      }
    for (int i = 0; i < Q; ++i)
      quarter[i][G] = _mm512_add_ps(_mm512_add_ps(part[i][0], part[i][1]),
                                    _mm512_add_ps(part[i][2], part[i][3]));
  }
  for (int i = 0; i < Q; ++i) {
    const __m512 sums = _mm512_add_ps(_mm512_add_ps(quarter[i][0], quarter[i][2]),
                                      _mm512_add_ps(quarter[i][1], quarter[i][3]));
    _mm512_storeu_ps(scores[i] + j0, _mm512_mul_ps(sums, s));
  }
}

inline void block_scores(const float* const* q, int64_t m, const float* kt, int64_t d,
                         float scale, float* const* scores, int64_t j0) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) block_scores_of<4>(q + i, kt, d, s, scores + i, j0);
  for (; i < m; ++i) block_scores_of<1>(q + i, kt, d, s, scores + i, j0);
}

// key_scores_16's scores for m queries over the same keys (count % 16 == 0), key-major: each
// 16-key block is widened and transposed once into kt for all m queries — or, given
// ``transposed`` (the blocks already in key-major order, d x 16 floats each), not at all.
template <typename KV>
void key_scores_many(const float* const* q, int64_t m, const KV* K, const int64_t* slots,
                     int64_t count, int64_t d, float scale, float* const* scores, float* kt,
                     const float* transposed) {
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    if (transposed != nullptr) {
      block_scores(q, m, transposed + j0 * d, d, scale, scores, j0);
      continue;
    }
    prefetch_rows(K, slots, std::min(j0 + kKeysAhead, count),
                  std::min(j0 + kKeysAhead + 16, count), d);
    transpose_keys(K, slots + j0, d, kt);
    block_scores(q, m, kt, d, scale, scores, j0);
  }
}
constexpr bool kGroupedScores = true;  // key_scores_few
#else
constexpr int64_t kKeyBlock = 8;
constexpr bool kGroupedScores = false;

// key_scores' scores of keys [begin, end) for Q queries (Q <= 3) that see the same keys, four
// keys at a time: each key's 8-value chunk is loaded and widened once for all Q queries rather
// than once per query (with float16 keys the widening, not the multiply-add, bounds a query's
// scores on AVX2). Q x 4 accumulators and a key stay in AVX2's 16 registers; the queries are
// read from L1 by the multiply-adds. Per key and query: the same fused multiply-adds over the
// head's chunks in order and the same add tree, ((x0+x1)+(x2+x3))+((x4+x5)+(x6+x7)) of the
// accumulator's lanes, then the same product with the scale: key_scores' bits.
// (end - begin) % 4 == 0.
template <int Q, typename KV>
void key_scores_group(const float* const* q, const KV* K, const int64_t* slots, int64_t begin,
                      int64_t end, int64_t d, float scale, float* const* scores) {
  const __m128 s = _mm_set1_ps(scale);
  for (int64_t j0 = begin; j0 < end; j0 += 4) {
    prefetch_rows(K, slots, std::min(j0 + kKeysAhead, end), std::min(j0 + kKeysAhead + 4, end),
                  d);
    const KV* rows[4];
    for (int k = 0; k < 4; ++k) rows[k] = K + slots[j0 + k] * d;
    __m256 acc[Q][4];
    for (int i = 0; i < Q; ++i)
      for (int k = 0; k < 4; ++k) acc[i][k] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8)
      for (int k = 0; k < 4; ++k) {
        const __m256 kv = load8(rows[k] + c);
        for (int i = 0; i < Q; ++i)
          acc[i][k] = _mm256_fmadd_ps(_mm256_loadu_ps(q[i] + c), kv, acc[i][k]);
      }
    for (int i = 0; i < Q; ++i) {
      // lanes: ((x0+x1)+(x2+x3)) of keys 0-3, then ((x4+x5)+(x6+x7)) of keys 0-3
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[i][0], acc[i][1]),
                                      _mm256_hadd_ps(acc[i][2], acc[i][3]));
      const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(scores[i] + j0, _mm_mul_ps(sums, s));
    }
  }
}

// key_scores_group for any number of queries, three at a time
template <typename KV>
void key_scores_few(const float* const* q, int64_t m, const KV* K, const int64_t* slots,
                    int64_t begin, int64_t end, int64_t d, float scale, float* const* scores) {
  int64_t i = 0;
  for (; i + 3 <= m; i += 3)
    key_scores_group<3>(q + i, K, slots, begin, end, d, scale, scores + i);
  if (m - i == 2) key_scores_group<2>(q + i, K, slots, begin, end, d, scale, scores + i);
  if (m - i == 1) key_scores_group<1>(q + i, K, slots, begin, end, d, scale, scores + i);
}
#endif

// Value sums: acc += p[j] V[slots[j]] over keys j in order, each lane its own chain of fused
// multiply-adds (the output is then acc * (1 / sum p)). Several queries that see the same keys
// (the query heads sharing a KV head, the rows of one tree) go through those keys together, each
// key's values loaded once for all of them; each query's lanes take exactly the operations they
// would take alone, so grouping changes no bits.
#if defined(__AVX512F__)
struct Lanes {
  using F = __m512;
  static constexpr int64_t kWidth = 16, kMaxAcc = 16;  // of 32 registers
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  template <typename KV> static F kv(const KV* p) { return load16(p); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#else
struct Lanes {
  using F = __m256;
  static constexpr int64_t kWidth = 8, kMaxAcc = 8;  // of 16 registers
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  template <typename KV> static F kv(const KV* p) { return load8(p); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};
#endif

// acc[q][0..C lane-widths) += p[q][j] V[slots[j]] for j in [begin, end), M queries; V's rows
// are ``stride`` values apart (the head's width; wider than C lane-widths where a head is taken
// a block of columns at a time, V and acc then pointing at the block)
template <typename KV, int C, int M>
void value_sums(const float* const* p, const int64_t* slots, int64_t begin, int64_t end,
                const KV* V, int64_t stride, float* const* acc) {
  constexpr int64_t W = Lanes::kWidth;
  typename Lanes::F a[M][C];
  for (int q = 0; q < M; ++q)
    for (int c = 0; c < C; ++c) a[q][c] = Lanes::load(acc[q] + W * c);
  for (int64_t j = begin; j < end; ++j) {
    if (j + kKeysAhead < end) prefetch_rows(V, slots, j + kKeysAhead, j + kKeysAhead + 1, stride);
    const KV* v = V + slots[j] * stride;
    typename Lanes::F w[M];
    for (int q = 0; q < M; ++q) w[q] = Lanes::set1(p[q][j]);
    for (int c = 0; c < C; ++c) {
      const typename Lanes::F vc = Lanes::kv(v + W * c);
      for (int q = 0; q < M; ++q) a[q][c] = Lanes::fma(w[q], vc, a[q][c]);
    }
  }
  for (int q = 0; q < M; ++q)
    for (int c = 0; c < C; ++c) Lanes::store(acc[q] + W * c, a[q][c]);
}

// up to kMaxAcc / C queries at a time
template <typename KV, int C>
void value_sums_c(int64_t m, const float* const* p, const int64_t* slots, int64_t begin,
                  int64_t end, const KV* V, int64_t stride, float* const* acc) {
  constexpr int64_t most = std::max<int64_t>(1, std::min<int64_t>(4, Lanes::kMaxAcc / C));
  for (int64_t q = 0; q < m; q += most) {
    const float* const* pq = p + q;
    float* const* aq = acc + q;
    switch (std::min(most, m - q)) {
      case 4:
        value_sums<KV, C, std::min<int64_t>(4, most)>(pq, slots, begin, end, V, stride, aq);
        break;
      case 3:
        value_sums<KV, C, std::min<int64_t>(3, most)>(pq, slots, begin, end, V, stride, aq);
        break;
      case 2:
        value_sums<KV, C, std::min<int64_t>(2, most)>(pq, slots, begin, end, V, stride, aq);
        break;
      default: value_sums<KV, C, 1>(pq, slots, begin, end, V, stride, aq); break;
    }
  }
}

// m queries' value sums in column blocks of C lane-widths, each block the sums above over all
// the keys (every value's own chain over the keys in order: the same bits as any other blocking)
template <typename KV, int C>
void value_sums_blocks(int64_t d, int64_t m, const float* const* p, const int64_t* slots,
                       int64_t begin, int64_t end, const KV* V, float* const* acc) {
  constexpr int64_t W = Lanes::kWidth;
  float* block[16];
  for (int64_t q0 = 0; q0 < m; q0 += 16) {
    const int64_t n = std::min<int64_t>(16, m - q0);
    for (int64_t c0 = 0; c0 < d; c0 += C * W) {
      for (int64_t q = 0; q < n; ++q) block[q] = acc[q0 + q] + c0;
      value_sums_c<KV, C>(n, p + q0, slots, begin, end, V + c0, d, block);
    }
  }
}

// m queries' value sums over keys [begin, end) into acc[q][0..d)
template <typename KV>
void value_sums_any(int64_t d, int64_t m, const float* const* p, const int64_t* slots,
                    int64_t begin, int64_t end, const KV* V, float* const* acc) {
  constexpr int64_t W = Lanes::kWidth;
  const int64_t chunks = d / W * (d % W == 0);
  if constexpr (Lanes::kMaxAcc == 8) {
    // AVX2's 16 registers hold 8 accumulators beside a key's values and the weights: several
    // queries (a tree's rows, a KV head's query heads) share each value load in blocks of 4
    // lane-widths, two queries at a time; one query takes blocks of 8
    if (m > 1 && chunks >= 8 && chunks % 4 == 0)
      return value_sums_blocks<KV, 4>(d, m, p, slots, begin, end, V, acc);
    if (chunks > 8 && chunks % 8 == 0)
      return value_sums_blocks<KV, 8>(d, m, p, slots, begin, end, V, acc);
  }
  switch (chunks) {
    case 4: return value_sums_c<KV, 4>(m, p, slots, begin, end, V, d, acc);
    case 8: return value_sums_c<KV, 8>(m, p, slots, begin, end, V, d, acc);
    case 16: return value_sums_c<KV, 16>(m, p, slots, begin, end, V, d, acc);
    default: break;
  }
  if (chunks > 16 && chunks % 8 == 0)
    // wider heads (Gemma 3's 256 values): blocks of 8 lane-widths of columns, without one
    // chain's latency per key
    return value_sums_blocks<KV, 8>(d, m, p, slots, begin, end, V, acc);
  // any other multiple of 8: the same sums, one 8-value chunk at a time
  for (int64_t q = 0; q < m; ++q)
    for (int64_t c = 0; c < d; c += 8) {
      __m256 a = _mm256_loadu_ps(acc[q] + c);
      for (int64_t j = begin; j < end; ++j)
        a = _mm256_fmadd_ps(_mm256_set1_ps(p[q][j]), load8(V + slots[j] * d + c), a);
      _mm256_storeu_ps(acc[q] + c, a);
    }
}


}  // namespace
