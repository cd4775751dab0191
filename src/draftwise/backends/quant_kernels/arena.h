// One huge-page arena for a model's weight matrices.
#pragma once

// ``bytes`` of memory for weights, aligned to 2 MiB and marked for transparent huge pages
// (where the kernel allows them on request): a step streams every weight once, and 2 MiB pages
// spare that stream ~25 thousand 4 KiB page walks. Pages still come as they are first written.
torch::Tensor weight_arena(int64_t bytes) {
  constexpr int64_t kHuge = int64_t{2} << 20;
  const int64_t size = std::max<int64_t>(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
  void* p = std::aligned_alloc(kHuge, size);
  TORCH_CHECK(p != nullptr, "could not allocate ", size, " bytes for the weights");
#if defined(MADV_HUGEPAGE)
  madvise(p, size, MADV_HUGEPAGE);  // advice only: without it the arena is ordinary memory
#endif
  return torch::from_blob(p, {bytes}, [](void* q) { std::free(q); }, torch::kUInt8);
}
