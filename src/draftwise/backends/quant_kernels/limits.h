// The machine's own limits, measured with the instructions the products use, so a cost report
// can put each step next to its floor (draftwise bench --cost): the read bandwidth of the
// threads streaming a buffer larger than any cache (a one-row step reads every weight once),
// and the integer multiply-add rate of the dot product the packed kernels use (each extra tree
// row costs its multiply-adds at best).
#pragma once

namespace {

inline double seconds_now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// Bytes per second of the best of ``repeats`` passes over ``bytes`` of memory, split over the
// threads as the products split a matrix (static, contiguous). Four independent accumulators
// per thread keep more than one line in flight; the sum is returned through a volatile so the
// loads are not dropped.
double read_bandwidth(int64_t bytes, int64_t repeats) {
  constexpr int64_t kStep = 4 * int64_t{sizeof(typename Vec::I)};
  bytes = std::max<int64_t>(kStep, bytes / kStep * kStep);
  std::unique_ptr<uint8_t, decltype(&std::free)> buffer(
      static_cast<uint8_t*>(std::aligned_alloc(64, static_cast<size_t>(bytes))), &std::free);
  TORCH_CHECK(buffer != nullptr, "could not allocate ", bytes, " bytes to measure bandwidth");
  uint8_t* data = buffer.get();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < bytes; i += 4096) data[i] = static_cast<uint8_t>(i);  // pages in
  double best = 1e30;
  for (int64_t rep = 0; rep < repeats; ++rep) {
    const double start = seconds_now();
    int64_t total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t at = 0; at < bytes; at += kStep) {
      const typename Vec::I a = Vec::load(data + at), b = Vec::load(data + at + kStep / 4);
      const typename Vec::I c = Vec::load(data + at + kStep / 2);
      const typename Vec::I d = Vec::load(data + at + 3 * kStep / 4);
      const typename Vec::I s = Vec::add(Vec::add(a, b), Vec::add(c, d));
      int32_t lane;
      std::memcpy(&lane, &s, 4);
      total += lane;
    }
    best = std::min(best, seconds_now() - start);
    volatile int64_t sink = total;
    (void)sink;
  }
  return static_cast<double>(bytes) / best;
}

// Integer multiply-adds per second of the packed products' own dot product on every thread,
// with enough independent chains to cover its latency: VNNI dpbusd, or on AVX2 without VNNI
// what run_dot does for 4-bit weights (maddubs products added as int16, widened by madd once
// per eight), not maddubs + madd per product, which would understate the floor.
double int8_peak(int64_t iterations) {
  constexpr int kChains = 12;
  constexpr int kRun = 8, kWide = 6;  // AVX2 without VNNI: 4-bit weights' int16 run (run_dot)
  constexpr int64_t kPerCall = sizeof(typename Vec::I);  // one u8 x s8 product per byte
  double best = 1e30;
  int threads = 1;
  for (int rep = 0; rep < 3; ++rep) {
    const double start = seconds_now();
#pragma omp parallel
    {
#pragma omp single
      threads = omp_get_num_threads();
      typename Vec::I acc[kChains];
      for (int k = 0; k < kChains; ++k) acc[k] = Vec::set1(k);
      const typename Vec::I w = Vec::set1(0x03030303), x = Vec::set1(0x05050505);
      if constexpr (Vec::kWidenLate) {
        // a product that does not depend on the chain's sum could be computed once and reused:
        // each chain has its own weights, and x is made opaque before every round of products,
        // so every product is computed. Six chains: their sums, weights and x fit in 16
        // registers, and the int16 adds wait on nothing slower than one add.
        typename Vec::I ws[kWide], x_now = x;
        for (int k = 0; k < kWide; ++k) ws[k] = Vec::set1(0x01010101 * (k + 1));
        for (int64_t i = 0; i < iterations / kWide / kRun; ++i) {
          typename Vec::I run[kWide];
          asm volatile("" : "+v"(x_now));
#pragma GCC unroll 6
          for (int k = 0; k < kWide; ++k) run[k] = Vec::products16(ws[k], x_now);
          for (int j = 1; j < kRun; ++j) {
            asm volatile("" : "+v"(x_now));
#pragma GCC unroll 6
            for (int k = 0; k < kWide; ++k)
              run[k] = Vec::add16(run[k], Vec::products16(ws[k], x_now));
          }
#pragma GCC unroll 6
          for (int k = 0; k < kWide; ++k) acc[k] = Vec::add(acc[k], Vec::widen(run[k]));
          for (int k = 0; k < kWide; ++k) asm volatile("" : "+v"(acc[k]));  // kept, not folded
        }
      } else {
        for (int64_t i = 0; i < iterations / kChains; ++i) {
#pragma GCC unroll 12
          for (int k = 0; k < kChains; ++k) acc[k] = Vec::dot_u4(acc[k], w, x);
          for (int k = 0; k < kChains; ++k) asm volatile("" : "+v"(acc[k]));  // kept, not folded
        }
      }
      int32_t lane;
      std::memcpy(&lane, &acc[0], 4);
      volatile int32_t sink = lane;
      (void)sink;
    }
    best = std::min(best, seconds_now() - start);
  }
  const int64_t done = Vec::kWidenLate ? iterations / kWide / kRun * kRun * kWide
                                       : iterations / kChains * kChains;
  return static_cast<double>(done) * threads * kPerCall / best;
}

}  // namespace
