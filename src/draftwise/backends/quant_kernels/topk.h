// Statistics of rows of logits that each decoding step needs from the target's vocabulary-wide
// rows: greedy verification's argmax and its lead over the runner-up (argmax_margin_rows), the k
// largest entries for the drafters that learn from the top few of each verified row
// (top_k_rows), and those entries' softmax probabilities (softmax_top_k_rows). Done in torch or
// NumPy, each is a few passes and an allocation per call, which shows next to a small model's
// step; here each is one or two passes over a row that stays in cache.
//
// top_k_rows: one pass per row, 8 values at a time compared with the k-th largest so far; only
// those above it are inserted into the k held in order, which after the first few hundred values
// is a rare event.
#pragma once

namespace {

// row x[0..n), k <= n: vals/idx[0..k) largest first; among equal values the lower index first
void top_k_row(const float* x, int64_t n, int64_t k, float* vals, int64_t* idx) {
  auto insert = [&](float v, int64_t i, int64_t held) {  // into the held values, in order
    int64_t p = held < k ? held : k - 1;                 // full: the smallest one leaves
    while (p > 0 && vals[p - 1] < v) {
      vals[p] = vals[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    vals[p] = v;
    idx[p] = i;
  };
  for (int64_t i = 0; i < k; ++i) insert(x[i], i, i);  // the first k, whatever they are (-inf too)
  int64_t i = k;
  for (; i + 8 <= n; i += 8) {
    int mask = _mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(vals[k - 1]), _CMP_GT_OQ));
    while (mask) {
      const int64_t j = i + __builtin_ctz(mask);
      mask &= mask - 1;
      if (x[j] > vals[k - 1]) insert(x[j], j, k);  // the threshold may have risen meanwhile
    }
  }
  for (; i < n; ++i)
    if (x[i] > vals[k - 1]) insert(x[i], i, k);
}

// the largest of x[lo..hi), -inf when empty; *nan set where the range holds a NaN
float max_range(const float* x, int64_t lo, int64_t hi, bool* nan) {
  __m256 m = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    m = _mm256_max_ps(m, v);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float top = -INFINITY;
  for (float v : lanes) top = std::max(top, v);
  bool any = _mm256_movemask_ps(unordered) != 0;
  for (; i < hi; ++i) {
    top = std::max(top, x[i]);
    any = any || std::isnan(x[i]);
  }
  *nan = *nan || any;
  return top;
}

// NumPy's argmax (the first maximum; the first NaN where there is one) and the maximum's lead over
// the largest other entry in float64, 0 where that entry is not finite (sampling.top2_margins)
void argmax_margin_row(const float* x, int64_t n, int64_t* index, double* margin) {
  bool nan = false;
  const float top = max_range(x, 0, n, &nan);
  if (nan) {
    int64_t at = 0;
    while (!std::isnan(x[at])) ++at;
    *index = at;
    *margin = 0.0;
    return;
  }
  int64_t at = 0;
  for (; at + 8 <= n; at += 8) {
    const int mask = _mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_loadu_ps(x + at), _mm256_set1_ps(top), _CMP_EQ_OQ));
    if (mask) break;
  }
  while (x[at] != top) ++at;  // the row holds top
  const float second = std::max(max_range(x, 0, at, &nan), max_range(x, at + 1, n, &nan));
  *index = at;
  *margin = std::isfinite(second) ? double(top) - double(second) : 0.0;
}

}  // namespace

// (argmax [rows] int64, margin [rows] float64) of a float32 [rows, n] matrix, n >= 1
std::tuple<torch::Tensor, torch::Tensor> argmax_margin_rows(torch::Tensor x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) >= 1,
              "x must be a float32 [rows, n] tensor with n >= 1");
  x = x.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  auto indices = torch::empty({rows}, torch::dtype(torch::kInt64));
  auto margins = torch::empty({rows}, torch::dtype(torch::kFloat64));
  const float* xp = x.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  double* mp = margins.data_ptr<double>();
#pragma omp parallel for schedule(static) if (rows * n >= (int64_t{1} << 18))
  for (int64_t r = 0; r < rows; ++r) argmax_margin_row(xp + r * n, n, ip + r, mp + r);
  return {indices, margins};
}

// (values [rows, k] float32, indices [rows, k] int64) of a float32 [rows, n] matrix, 1 <= k <= n
std::tuple<torch::Tensor, torch::Tensor> top_k_rows(torch::Tensor x, int64_t k) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be a float32 [rows, n] tensor");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "k must be in 1..n");
  x = x.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  auto values = torch::empty({rows, k}, x.options());
  auto indices = torch::empty({rows, k}, torch::dtype(torch::kInt64));
  const float* xp = x.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
#pragma omp parallel for schedule(static) if (rows * n >= (int64_t{1} << 18))
  for (int64_t r = 0; r < rows; ++r) top_k_row(xp + r * n, n, k, vp + r * k, ip + r * k);
  return {values, indices};
}

// (probabilities [rows, k] float32, indices [rows, k] int64): the k likeliest entries of each row's
// softmax, likeliest first: e^(v - max) over the row's sum of e^(x - max) (float32, exp8's
// polynomial), 1 <= k <= n
std::tuple<torch::Tensor, torch::Tensor> softmax_top_k_rows(torch::Tensor x, int64_t k) {
  auto [values, indices] = top_k_rows(x, k);
  x = x.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  const float* xp = x.data_ptr<float>();
  float* vp = values.data_ptr<float>();
#pragma omp parallel for schedule(static) if (rows * n >= (int64_t{1} << 18))
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * n;
    float* top = vp + r * k;
    const float most = top[0];
    const __m256 shift = _mm256_set1_ps(most);
    __m256 sum8 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      sum8 = _mm256_add_ps(sum8, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + i), shift)));
    float sum = hsum_ps(sum8);
    for (; i < n; ++i) sum += exp1(row[i] - most);
    for (int64_t j = 0; j < k; ++j) top[j] = exp1(top[j] - most) / sum;
  }
  return {values, indices};
}
