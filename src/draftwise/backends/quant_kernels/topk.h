// The k largest entries of every row of a float32 matrix, largest first, for the drafters that
// learn from the top few of each verified row (sampling.top_k_rows). One pass per row: 8 values
// at a time are compared with the k-th largest so far, and only those above it are inserted into
// the k held in order, which after the first few hundred values is a rare event.
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

}  // namespace

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
