// Model: every decoder layer of a Llama/Qwen2/Gemma-3 model over T new rows in one call, and the
// same over several sequences' rows (forward_batch).
#pragma once

namespace {

class Model {
 public:
  // attn_scale: the attention scores' factor (0: 1 / sqrt(head_dim)); gelu: the gate is
  // tanh-GELU (Gemma), not SiLU
  Model(std::vector<Layer> layers, torch::Tensor norm, double eps, int64_t heads,
        int64_t kv_heads, int64_t head_dim, bool int8, int64_t prefetch_bytes,
        int64_t amx_min_rows, double attn_scale, bool gelu)
      : layers_(std::move(layers)), norm_(norm.contiguous()), eps_(static_cast<float>(eps)),
        heads_(heads), kv_heads_(kv_heads), d_(head_dim), int8_(int8), gelu_(gelu),
        scale_(attn_scale > 0 ? static_cast<float>(attn_scale)
                              : 1.0f / std::sqrt(static_cast<float>(head_dim))),
        tuning_{prefetch_bytes, amx_min_rows} {
    TORCH_CHECK(prefetch_bytes >= 0 && amx_min_rows >= 1,
                "prefetch_bytes must be >= 0 and amx_min_rows >= 1");
    TORCH_CHECK(head_dim % 8 == 0, "head_dim must be a multiple of 8");
    for (const Layer& layer : layers_) {
      TORCH_CHECK(layer.reach >= 0, "a layer's reach must be >= 0");
      TORCH_CHECK(reach_ == 0 || layer.reach == 0 || layer.reach == reach_,
                  "the sliding layers must share one reach");
      reach_ = std::max(reach_, layer.reach);
      TORCH_CHECK(layer.q_norm.numel() == 0 || (layer.q_norm.numel() == head_dim &&
                                                layer.k_norm.numel() == head_dim),
                  "query and key norms must be [head_dim]");
    }
  }

  // x: [T, hidden] input rows (embeddings); keys/values: [layers, kv, S, d] caches (both float16
  // or both float32), rows start..start+T-1 written here; cos/sin: [T, d] at the rows'
  // positions (local_cos/local_sin: the sliding layers', empty where there are none); tree:
  // [T, T] uint8, tree[r][j] = row r may see row j (itself and its ancestors). Returns the
  // final-normed hidden states [T, hidden].
  torch::Tensor forward(torch::Tensor x, torch::Tensor keys, torch::Tensor values, int64_t start,
                        torch::Tensor cos, torch::Tensor sin, torch::Tensor local_cos,
                        torch::Tensor local_sin, torch::Tensor tree, bool prefill) {
    TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "caches must be contiguous");
    check_caches(keys, values);
    tree = tree.to(torch::kUInt8).contiguous();
    const int64_t T = x.size(0), S = keys.size(2);
    TORCH_CHECK(keys.size(0) == static_cast<int64_t>(layers_.size()) && start + T <= S,
                "cache shape does not match");
    TORCH_CHECK(tree.size(0) == T && tree.size(1) == T, "tree must be [T, T]");
    Rows rows(T, keys.size(1) * S * d_, S, keys.element_size());
    // the cache slots each row may see, in position order: the same for every head and layer
    const uint8_t* tp = tree.data_ptr<uint8_t>();
    bool causal = true;  // a prompt: every row sees the rows before it and itself
    for (int64_t r = 0; r < T; ++r)
      for (int64_t j = 0; j < T; ++j) causal = causal && tp[r * T + j] == (j <= r);
    for (int64_t r = 0; r < T; ++r) {
      rows.kbase[r] = static_cast<char*>(keys.data_ptr());
      rows.vbase[r] = static_cast<char*>(values.data_ptr());
      rows.write[r] = start + r;
      rows.visible[r].resize(start);
      std::iota(rows.visible[r].begin(), rows.visible[r].end(), int64_t{0});
      for (int64_t j = 0; j < T; ++j)
        if (tp[r * T + j]) rows.visible[r].push_back(start + j);
    }
    return run(x, rows, {cos, sin, local_cos, local_sin}, prefill && T >= 32, prefill && causal);
  }

  // Several sequences' rows in one pass. keys/values: [B, layers, kv, W, d], one region per
  // sequence; row r belongs to sequence seq[r], is written at slot write[r] of its region and
  // sees the slots 0..prefix[r]-1 of that region (its committed tokens), then
  // extra[offsets[r]:offsets[r+1]] (its tree ancestors and itself, in position order). Each
  // row is computed alone, as in forward(): a row's result does not depend on which other rows
  // share the pass.
  torch::Tensor forward_batch(torch::Tensor x, torch::Tensor keys, torch::Tensor values,
                              torch::Tensor seq, torch::Tensor write, torch::Tensor prefix,
                              torch::Tensor offsets, torch::Tensor extra, torch::Tensor cos,
                              torch::Tensor sin, torch::Tensor local_cos,
                              torch::Tensor local_sin) {
    TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.dim() == 5,
                "caches must be contiguous [B, layers, kv, W, d]");
    TORCH_CHECK(keys.size(1) == static_cast<int64_t>(layers_.size()), "cache has other layers");
    check_caches(keys, values);
    const int64_t T = x.size(0), B = keys.size(0), W = keys.size(3);
    seq = seq.to(torch::kInt64).contiguous();
    write = write.to(torch::kInt64).contiguous();
    prefix = prefix.to(torch::kInt64).contiguous();
    offsets = offsets.to(torch::kInt64).contiguous();
    extra = extra.to(torch::kInt64).contiguous();
    TORCH_CHECK(seq.numel() == T && write.numel() == T && prefix.numel() == T &&
                    offsets.numel() == T + 1,
                "seq, write, prefix: [T]; offsets: [T + 1]");
    const int64_t region = keys.size(1) * keys.size(2) * W * d_;
    Rows rows(T, keys.size(2) * W * d_, W, keys.element_size());
    const int64_t *sp = seq.data_ptr<int64_t>(), *wp = write.data_ptr<int64_t>();
    const int64_t *pp = prefix.data_ptr<int64_t>(), *op = offsets.data_ptr<int64_t>();
    const int64_t* ep = extra.data_ptr<int64_t>();
    TORCH_CHECK(op[0] == 0 && op[T] == extra.numel(), "offsets do not match extra");
    for (int64_t r = 0; r < T; ++r) {
      TORCH_CHECK(sp[r] >= 0 && sp[r] < B && wp[r] >= 0 && wp[r] < W, "row outside the cache");
      TORCH_CHECK(pp[r] >= 0 && pp[r] <= W && op[r] <= op[r + 1], "bad prefix or offsets");
      rows.kbase[r] = static_cast<char*>(keys.data_ptr()) + sp[r] * region * rows.bytes;
      rows.vbase[r] = static_cast<char*>(values.data_ptr()) + sp[r] * region * rows.bytes;
      rows.write[r] = wp[r];
      std::vector<int64_t>& seen = rows.visible[r];
      seen.resize(pp[r]);
      std::iota(seen.begin(), seen.end(), int64_t{0});
      for (int64_t i = op[r]; i < op[r + 1]; ++i) {
        TORCH_CHECK(ep[i] >= 0 && ep[i] < W, "slot outside the cache");
        seen.push_back(ep[i]);
      }
    }
    return run(x, rows, {cos, sin, local_cos, local_sin}, false, false);
  }

 private:
  // where each row's keys/values live and which of them it sees
  struct Rows {
    Rows(int64_t T, int64_t layer_stride_, int64_t S_, int64_t bytes_)
        : kbase(T), vbase(T), write(T), visible(T), layer_stride(layer_stride_), S(S_),
          bytes(bytes_) {}
    std::vector<char*> kbase, vbase;  // layer 0 of the row's cache, [layers, kv, S, d]
    std::vector<int64_t> write;        // the slot the row's key/value is written to
    std::vector<std::vector<int64_t>> visible;
    int64_t layer_stride, S;
    int64_t bytes;  // of one cached value: 2 (float16) or 4 (float32)
  };

  static void check_caches(const torch::Tensor& keys, const torch::Tensor& values) {
    TORCH_CHECK(keys.scalar_type() == values.scalar_type() &&
                    (keys.scalar_type() == torch::kFloat16 ||
                     keys.scalar_type() == torch::kFloat32),
                "the caches must both be float16 or both float32");
  }

  // consecutive rows on one cache (a tree: all its rows; a batch: each sequence's), and how many
  // slots, from the first, every one of them sees
  struct Span {
    int64_t begin, end, shared;
  };

  static std::vector<Span> spans(const Rows& rows, const std::vector<std::vector<int64_t>>& visible,
                                 int64_t most) {
    std::vector<Span> out;
    const int64_t T = static_cast<int64_t>(rows.kbase.size());
    for (int64_t begin = 0; begin < T;) {
      int64_t end = begin + 1;
      while (end < T && end - begin < most && rows.kbase[end] == rows.kbase[begin]) ++end;
      const std::vector<int64_t>& first = visible[begin];
      int64_t shared = static_cast<int64_t>(first.size());
      for (int64_t r = begin + 1; r < end; ++r) {
        const std::vector<int64_t>& other = visible[r];
        const int64_t most = std::min<int64_t>(shared, other.size());
        shared = std::mismatch(first.begin(), first.begin() + most, other.begin()).first -
                 first.begin();
      }
      out.push_back({begin, end, shared});
      begin = end;
    }
    return out;
  }

  // the rotary tables at the rows' positions: the full layers', the sliding layers' (empty
  // where there are none)
  struct Rotary {
    torch::Tensor cos, sin, local_cos, local_sin;
  };

  // every decoder layer over the rows, then the final norm
  torch::Tensor run(torch::Tensor x, const Rows& rows, Rotary rotary, bool batched, bool prompt) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [T, hidden]");
    x = x.contiguous().clone();
    const int64_t T = x.size(0), hidden = x.size(1), d = d_, S = rows.S;
    for (torch::Tensor* table : {&rotary.cos, &rotary.sin, &rotary.local_cos, &rotary.local_sin})
      *table = table->contiguous();
    TORCH_CHECK(rotary.cos.size(0) == T && rotary.sin.size(0) == T, "cos/sin must be [T, d]");
    TORCH_CHECK(reach_ == 0 || (rotary.local_cos.size(0) == T && rotary.local_sin.size(0) == T),
                "local_cos/local_sin must be [T, d] for the sliding layers");
    float* xp = x.data_ptr<float>();
    std::vector<float> normed(T * hidden), tmp(T * hidden), attn(T * heads_ * d);
    const int64_t qkv_width = (heads_ + 2 * kv_heads_) * d;
    std::vector<float> qkv(T * qkv_width), gu, act;
    std::vector<const char*> K(T), V(T);
    const Attention full = arrange(rows, rows.visible, prompt);
    // A sliding layer's row sees the last reach of its keys: a row's keys are its sequence's
    // committed prefix (slot i holds position i) then its tree ancestors and itself, one per
    // position, so the k-th key it sees is at position k.
    std::vector<std::vector<int64_t>> local_visible;
    Attention local;
    if (reach_ > 0) {
      local_visible.resize(T);
      for (int64_t r = 0; r < T; ++r) {
        const std::vector<int64_t>& all = rows.visible[r];
        const int64_t from = std::max<int64_t>(0, static_cast<int64_t>(all.size()) - reach_);
        local_visible[r].assign(all.begin() + from, all.end());
      }
      local = arrange(rows, local_visible, prompt);
    }
    std::vector<float> major;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      const bool sliding = layer.reach > 0;
      const Attention& at = sliding ? local : full;
      const float* cos = (sliding ? rotary.local_cos : rotary.cos).data_ptr<float>();
      const float* sin = (sliding ? rotary.local_sin : rotary.sin).data_ptr<float>();
      const bool head_norms = layer.q_norm.numel() > 0;
      rms_norm(xp, T, hidden, layer.attn_norm.data_ptr<float>(), eps_, normed.data());
      TORCH_CHECK(width(layer.qkv) == qkv_width, "qkv width does not match the heads");
      apply(layer.qkv, normed.data(), T, qkv.data(), qkv_width, int8_, tuning_, batched);
#pragma omp parallel for schedule(static) if (T >= kThreadedLoops)
      for (int64_t r = 0; r < T; ++r) {  // (each row writes its own cache slots)
        char* Kr = rows.kbase[r] + l * rows.layer_stride * rows.bytes;
        char* Vr = rows.vbase[r] + l * rows.layer_stride * rows.bytes;
        K[r] = Kr;
        V[r] = Vr;
        float* row = qkv.data() + r * qkv_width;
        if (head_norms) {  // each head's query and key vector normed alone
          rms_norm(row, heads_, d, layer.q_norm.data_ptr<float>(), eps_, row);
          rms_norm(row + heads_ * d, kv_heads_, d, layer.k_norm.data_ptr<float>(), eps_,
                   row + heads_ * d);
        }
        for (int64_t h = 0; h < heads_ + kv_heads_; ++h) rotate(row + h * d, cos + r * d,
                                                                sin + r * d, d);
        for (int64_t h = 0; h < kv_heads_; ++h) {
          const int64_t at = (h * S + rows.write[r]) * d;
          const float *k = row + (heads_ + h) * d, *v = row + (heads_ + kv_heads_ + h) * d;
          if (rows.bytes == 2) {
            store_row(reinterpret_cast<uint16_t*>(Kr) + at, k, d);
            store_row(reinterpret_cast<uint16_t*>(Vr) + at, v, d);
          } else {
            store_row(reinterpret_cast<float*>(Kr) + at, k, d);
            store_row(reinterpret_cast<float*>(Vr) + at, v, d);
          }
        }
      }
      if (rows.bytes == 2) {
        attend<uint16_t>(qkv.data(), qkv_width, K, V, S, *at.visible, at.runs, at.work,
                         at.major_blocks, major, attn.data());
      } else {
        attend<float>(qkv.data(), qkv_width, K, V, S, *at.visible, at.runs, at.work,
                      at.major_blocks, major, attn.data());
      }
      apply(layer.out, attn.data(), T, tmp.data(), hidden, int8_, tuning_, batched);
      if (layer.post_attn_norm.numel())
        rms_norm(tmp.data(), T, hidden, layer.post_attn_norm.data_ptr<float>(), eps_, tmp.data());
      add_rows(xp, tmp.data(), T, hidden);
      rms_norm(xp, T, hidden, layer.mlp_norm.data_ptr<float>(), eps_, normed.data());
      const int64_t inter = layer.down[0].in, gu_width = width(layer.gate_up);
      TORCH_CHECK(gu_width == 2 * inter, "gate/up width does not match down's input");
      TORCH_CHECK(!gelu_ || inter % 8 == 0, "a GELU MLP's width must be a multiple of 8");
      gu.resize(T * gu_width);
      act.resize(T * inter);
      apply(layer.gate_up, normed.data(), T, gu.data(), gu_width, int8_, tuning_, batched);
#pragma omp parallel for schedule(static) if (T >= kThreadedRows)
      for (int64_t r = 0; r < T; ++r) {
        if (gelu_) {
          gelu_mul(gu.data() + r * gu_width, inter, act.data() + r * inter);
        } else {
          silu_mul(gu.data() + r * gu_width, inter, act.data() + r * inter);
        }
      }
      apply(layer.down, act.data(), T, tmp.data(), hidden, int8_, tuning_, batched);
      if (layer.post_mlp_norm.numel())
        rms_norm(tmp.data(), T, hidden, layer.post_mlp_norm.data_ptr<float>(), eps_, tmp.data());
      add_rows(xp, tmp.data(), T, hidden);
    }
    auto out = torch::empty({T, hidden}, torch::kFloat32);
    rms_norm(xp, T, hidden, norm_.data_ptr<float>(), eps_, out.data_ptr<float>());
    return out;
  }

  // x += y over T rows of n values (the residual)
  static void add_rows(float* x, const float* y, int64_t T, int64_t n) {
#pragma omp parallel for schedule(static) if (T >= kThreadedLoops)
    for (int64_t r = 0; r < T; ++r)
      for (int64_t i = r * n; i < (r + 1) * n; ++i) x[i] += y[i];
  }

  // silu(gate) * up for one row: gate = g[0..n), up = g[n..2n)
  static void silu_mul(const float* g, int64_t n, float* out) {
    const float* up = g + n;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {  // (each lane: the 8-lane loop's operations)
      const __m512 gate = _mm512_loadu_ps(g + i);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate));
      const __m512 silu = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
      _mm512_storeu_ps(out + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
    }
#endif
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
      const __m256 gate = _mm256_loadu_ps(g + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate));
      const __m256 silu = _mm256_div_ps(gate, _mm256_add_ps(one, e));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; ++i) out[i] = (g[i] / (1.0f + exp1(-g[i]))) * up[i];
  }

  // gelu_tanh(gate) * up for one row (gate = g[0..n), up = g[n..2n), n % 8 == 0), as
  // x * sigmoid(2 sqrt(2 / pi) (x + 0.044715 x^3)), which is 0.5 x (1 + tanh(...)) without
  // tanh's cancellation near zero; eight lanes everywhere, so every build gives the same bits
  static void gelu_mul(const float* g, int64_t n, float* out) {
    const float* up = g + n;
    const __m256 one = _mm256_set1_ps(1.0f), cubic = _mm256_set1_ps(0.044715f);
    const __m256 minus_twice_root = _mm256_set1_ps(-1.5957691216057308f);  // -2 sqrt(2 / pi)
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(cubic, x), _mm256_mul_ps(x, x), x);
      const __m256 e = exp8(_mm256_mul_ps(minus_twice_root, inner));
      const __m256 gelu = _mm256_div_ps(x, _mm256_add_ps(one, e));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(gelu, _mm256_loadu_ps(up + i)));
    }
  }

  static constexpr int64_t kThreadedRows = 4;  // rows from which the gate's SiLU is threaded
  static constexpr int64_t kPromptRun = 16;  // a prompt's rows per run of shared keys
  static constexpr int64_t kMostQueries = 12;  // queries of one attention work item
  static constexpr int64_t kChunk = 64;        // keys scored for every query of an item in turn
  static constexpr int64_t kKeyMajor = 6;      // queries from which an item scores key-major

  // Attention's work items: queries (row, query head) of one run that share one KV head — for a
  // tree, every row's query heads of that KV head — split into chunks so that every thread gets
  // some — but where the build scores three queries per key load (AVX-512), never below one
  // row's query heads of the KV head: a decoding row's three items of three queries beat nine
  // items of one that each read the keys (faster, and more so the longer the context, though
  // two threads then share three items). An item reads the keys and values its
  // rows all see (the committed prefix) once for all its queries: keys a chunk at a time,
  // scored for every query while in L1 (key-major for six queries or more); values one key at a
  // time for up to four queries at once. Every query's scores, exponentials and sums are the
  // operations it takes alone, in the same order, so the grouping changes no bits. The same for
  // every layer: planned once per forward. A prompt's runs (kPromptRun rows each) see ever
  // more keys: its items are dealt to the threads in turn, not in contiguous shares, so that no
  // thread gets all the long ones.
  struct Work {
    std::vector<std::pair<int64_t, int64_t>> queries;  // (row, query head), item by item
    // item k: queries[bounds[k], bounds[k + 1]) of runs[span[k]]
    std::vector<int64_t> bounds{0}, span;
    bool in_turn = false;
    // several sequences' rows (a server's batch) see caches of different lengths: their items
    // are dealt longest first, each to the thread with the least work so far (keys it reads),
    // and each thread runs its own in item order (which thread computes an item changes nothing
    // in what it computes); empty: contiguous shares
    std::vector<int64_t> longest_first, cost;
  };

  Work plan(const std::vector<Span>& runs, bool prompt) const {
    Work work;
    work.in_turn = prompt;
    const int64_t group = heads_ / kv_heads_;
    const int64_t heads_of_runs = static_cast<int64_t>(runs.size()) * kv_heads_;
    const int64_t pieces = std::max<int64_t>(1, (4 * omp_get_max_threads() + heads_of_runs - 1) /
                                                    heads_of_runs);
    for (size_t u = 0; u < runs.size(); ++u) {
      const int64_t n = (runs[u].end - runs[u].begin) * group;
      const int64_t size = std::clamp<int64_t>((n + pieces - 1) / pieces,
                                               std::min(n, kGroupedScores ? group : 1),
                                               kMostQueries);
      for (int64_t kvh = 0; kvh < kv_heads_; ++kvh) {
        for (int64_t i = 0; i < n; ++i) {
          work.queries.emplace_back(runs[u].begin + i / group, kvh * group + i % group);
          if ((i + 1) % size == 0 || i + 1 == n) {
            work.bounds.push_back(static_cast<int64_t>(work.queries.size()));
            work.span.push_back(static_cast<int64_t>(u));
          }
        }
      }
    }
    return work;
  }

  // which keys each row sees in a layer (held by the caller), and attention's work over them
  struct Attention {
    const std::vector<std::vector<int64_t>>* visible = nullptr;
    std::vector<Span> runs;
    Work work;
    int64_t major_blocks = 0;  // a prompt's keys put in key-major order (see attend)
  };

  Attention arrange(const Rows& rows, const std::vector<std::vector<int64_t>>& visible,
                    bool prompt) const {
    Attention at;
    at.visible = &visible;
    at.runs = spans(rows, visible, prompt ? kPromptRun : static_cast<int64_t>(visible.size()));
    at.work = plan(at.runs, prompt);
    Work& work = at.work;
    if (!prompt && at.runs.size() > 1) {
      const int64_t items = static_cast<int64_t>(work.span.size());
      std::vector<int64_t>& cost = work.cost;
      cost.resize(items);
      for (int64_t k = 0; k < items; ++k)
        cost[k] = (work.bounds[k + 1] - work.bounds[k]) *
                  static_cast<int64_t>(visible[work.queries[work.bounds[k]].first].size());
      if (*std::min_element(cost.begin(), cost.end()) !=
          *std::max_element(cost.begin(), cost.end())) {  // (equal items: contiguous shares)
        work.longest_first.resize(items);
        std::iota(work.longest_first.begin(), work.longest_first.end(), int64_t{0});
        std::stable_sort(work.longest_first.begin(), work.longest_first.end(),
                         [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
      }
    }
    // A prompt's runs all see the keys from slot 0 on (its last row sees them all, in order):
    // each layer's are put in key-major order once for every attention item, instead of once
    // per item (the same floats in the same lanes: no bits change). Not where a sliding
    // layer's last row no longer sees slot 0 (the runs' keys then begin elsewhere).
#if defined(__AVX512F__)
    const std::vector<int64_t>& last = visible.back();
    if (prompt && d_ % 16 == 0 && last.front() == 0)
      at.major_blocks = static_cast<int64_t>(last.size()) / 16;
#endif
    return at;
  }

  // out[r, h*d:(h+1)*d] = softmax(scale q . K_visible) V_visible for each row r, head h (scale:
  // 1 / sqrt(d) unless the model says otherwise)
  // K[r], V[r]: the layer's [kv, S, d] cache of row r's sequence; runs: the rows on one cache.
  // major_blocks > 0 (a prompt): the first major_blocks * 16 keys of the last row's slots, which
  // every run's shared keys begin with, are put in key-major order into ``major`` first.
  template <typename KV>
  void attend(const float* qkv, int64_t ldq, const std::vector<const char*>& K,
              const std::vector<const char*>& V, int64_t S,
              const std::vector<std::vector<int64_t>>& visible, const std::vector<Span>& runs,
              const Work& work, int64_t major_blocks, std::vector<float>& major,
              float* out) const {
    const int64_t d = d_, group = heads_ / kv_heads_;
    if (major_blocks > 0)
      transpose_prompt_keys(reinterpret_cast<const KV*>(K[0]), S, visible.back().data(),
                            major_blocks, major);
    const float* transposed = major_blocks > 0 ? major.data() : nullptr;
    const float scale = scale_;
    const std::vector<std::pair<int64_t, int64_t>>& queries = work.queries;
    const std::vector<int64_t>& bounds = work.bounds;
    const int64_t items = static_cast<int64_t>(work.span.size());
#pragma omp parallel
    {
      std::vector<float> scores, acc, kt;
      std::vector<const float*> qs;
      std::vector<float*> a, score_rows;
      const std::vector<KV> zero_row(d, KV{0});
      auto item = [&](int64_t k) {
        const int64_t first = bounds[k], m = bounds[k + 1] - first;
        const int64_t row0 = queries[first].first, kvh = queries[first].second / group;
        const int64_t shared = runs[work.span[k]].shared;  // slots every row of the run sees first
        const KV* Kh = reinterpret_cast<const KV*>(K[row0]) + kvh * S * d;
        const KV* Vh = reinterpret_cast<const KV*>(V[row0]) + kvh * S * d;
        int64_t longest = 0;
        for (int64_t i = 0; i < m; ++i)
          longest = std::max<int64_t>(longest, visible[queries[first + i].first].size());
        const int64_t stride = (longest + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
        scores.resize(m * stride);
        acc.assign(m * d, 0.0f);
        a.resize(m);
        score_rows.resize(m);
        for (int64_t i = 0; i < m; ++i) {
          score_rows[i] = scores.data() + i * stride;
          a[i] = acc.data() + i * d;
        }
        auto query = [&](int64_t i) {
          return qkv + queries[first + i].first * ldq + queries[first + i].second * d;
        };
        auto slots_of = [&](int64_t i) { return visible[queries[first + i].first].data(); };
        auto count_of = [&](int64_t i) {
          return static_cast<int64_t>(visible[queries[first + i].first].size());
        };
        // scores: the shared keys for every query (key-major for many queries, else a chunk at
        // a time for every query while it is in L1: three queries per key load where the build
        // has AVX-512), then each query's own
        const int64_t blocks = shared / kKeyBlock * kKeyBlock;
        bool scored = false;
#if defined(__AVX512F__)
        if (d % 16 == 0) {
          qs.resize(m);
          for (int64_t i = 0; i < m; ++i) qs[i] = query(i);
          if (m >= kKeyMajor) {
            kt.resize(16 * d);
            key_scores_many(qs.data(), m, Kh, slots_of(0), blocks, d, scale, score_rows.data(),
                            kt.data(),
                            transposed ? transposed + kvh * major_blocks * 16 * d : nullptr);
          } else {
            for (int64_t j0 = 0; j0 < blocks; j0 += kChunk)
              key_scores_few(qs.data(), m, Kh, slots_of(0), j0, std::min(j0 + kChunk, blocks),
                             d, scale, score_rows.data());
          }
          scored = true;
        }
#else
        if (m > 1) {  // several queries per key load (AVX2: key_scores_few, four keys at a time)
          qs.resize(m);
          for (int64_t i = 0; i < m; ++i) qs[i] = query(i);
          for (int64_t j0 = 0; j0 < blocks; j0 += kChunk)
            key_scores_few(qs.data(), m, Kh, slots_of(0), j0, std::min(j0 + kChunk, blocks), d,
                           scale, score_rows.data());
          scored = true;
        }
#endif
        for (int64_t j0 = 0; !scored && j0 < blocks; j0 += kChunk)
          for (int64_t i = 0; i < m; ++i)
            score_keys(query(i), Kh, slots_of(i) + j0, std::min(kChunk, blocks - j0), d, scale,
                       scores.data() + i * stride + j0, zero_row.data());
        for (int64_t i = 0; i < m; ++i)
          if (count_of(i) > blocks)
            score_keys(query(i), Kh, slots_of(i) + blocks, count_of(i) - blocks, d, scale,
                       scores.data() + i * stride + blocks, zero_row.data());
        // softmax numerators in place, and each query's 1 / sum
        float inv[kMostQueries];
        for (int64_t i = 0; i < m; ++i)
          inv[i] = exponentials(scores.data() + i * stride, count_of(i));
        // values: the shared keys for all queries together, then each query's own
        value_sums_any(d, m, score_rows.data(), slots_of(0), 0, shared, Vh, a.data());
        for (int64_t i = 0; i < m; ++i) {
          value_sums_any(d, 1, score_rows.data() + i, slots_of(i), shared, count_of(i), Vh,
                         a.data() + i);
          const auto& [r, h] = queries[first + i];
          float* o = out + r * heads_ * d + h * d;
          const __m256 scale_i = _mm256_set1_ps(inv[i]);
          for (int64_t c = 0; c < d; c += 8)  // (d % 8 == 0)
            _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(a[i] + c), scale_i));
        }
      };
      if (work.in_turn) {
#pragma omp for schedule(static, 1)
        for (int64_t k = 0; k < items; ++k) item(k);
      } else if (!work.longest_first.empty()) {
        const int threads = omp_get_num_threads(), me = omp_get_thread_num();
        std::vector<int64_t> load(threads, 0);
        std::vector<int> owner(items);
        for (const int64_t k : work.longest_first) {  // the same deal on every thread
          const int t = static_cast<int>(std::min_element(load.begin(), load.end()) -
                                         load.begin());
          owner[k] = t;
          load[t] += work.cost[k];
        }
        for (int64_t k = 0; k < items; ++k)
          if (owner[k] == me) item(k);
      } else {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < items; ++k) item(k);
      }
    }
  }

  // major <- the first blocks * 16 keys of slots, block by block in key-major order (d x 16
  // floats each), for every KV head of a layer's cache K ([kv, S, d])
  template <typename KV>
  void transpose_prompt_keys(const KV* K, int64_t S, const int64_t* slots, int64_t blocks,
                             std::vector<float>& major) const {
#if defined(__AVX512F__)
    const int64_t d = d_, per_head = blocks * 16 * d;
    major.resize(kv_heads_ * per_head);
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < kv_heads_ * blocks; ++k) {
      const int64_t h = k / blocks, b = k % blocks;
      transpose_keys(K + h * S * d, slots + b * 16, d, major.data() + h * per_head + b * 16 * d);
    }
#endif
  }

  // scores[j] = scale * (q . K[slots[j]]) for j < count, written up to count rounded up to a
  // key block (this build's key_scores)
  template <typename KV>
  static void score_keys(const float* q, const KV* K, const int64_t* slots, int64_t count,
                         int64_t d, float scale, float* scores, const KV* zero_row) {
#if defined(__AVX512F__)
    if (d % 16 == 0) return key_scores_16(q, K, slots, count, d, scale, scores, zero_row);
#endif
    key_scores(q, K, slots, count, d, scale, scores, zero_row);
  }

  // scores[j] <- exp(scores[j] - max) for j < count, 0 up to the next multiple of 8; returns
  // 1 / the sum (eight lanes in key order, then one horizontal sum)
  static float exponentials(float* scores, int64_t count) {
    float top = -INFINITY;  // (a maximum is exact in any order: eight lanes, then across)
    int64_t j = 0;
    if (count >= 8) {
      __m256 most = _mm256_loadu_ps(scores);
      for (j = 8; j + 8 <= count; j += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(scores + j));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, most);
      for (float lane : lanes) top = std::max(top, lane);
    }
    for (; j < count; ++j) top = std::max(top, scores[j]);
    __m256 total = _mm256_setzero_ps();
    const __m256 top8 = _mm256_set1_ps(top);
    j = 0;
#if defined(__AVX512F__)
    // sixteen at a time, added to the eight-lane total half by half: the same sums in order
    for (const __m512 top16 = _mm512_set1_ps(top); j + 16 <= count; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), top16));
      _mm512_storeu_ps(scores + j, e);
      total = _mm256_add_ps(total, _mm512_castps512_ps256(e));
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1));
      total = _mm256_add_ps(total, high);
    }
#endif
    for (; j < count; j += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top8));
      if (j + 8 > count) {  // lanes past the last key are zero
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, e);
        for (int64_t k = count - j; k < 8; ++k) lanes[k] = 0.0f;
        e = _mm256_load_ps(lanes);
      }
      _mm256_storeu_ps(scores + j, e);
      total = _mm256_add_ps(total, e);
    }
    return 1.0f / hsum_ps(total);
  }

  std::vector<Layer> layers_;
  torch::Tensor norm_;
  float eps_;
  int64_t heads_, kv_heads_, d_;
  bool int8_, gelu_;
  float scale_;
  int64_t reach_ = 0;  // the sliding layers' reach (0: none)
  Tuning tuning_;
};

Linear make_linear(torch::Tensor w, int64_t type, int64_t in, torch::Tensor bias) {
  check_any(w, type, in);
  const int64_t out = rows_of(w, type);
  TORCH_CHECK(bias.numel() == 0 || (bias.dtype() == torch::kFloat32 && bias.numel() == out),
              "bias must be float32 [out] or empty");
  return Linear{w, type, in, out, bias.contiguous()};
}

// q_norm, k_norm, post_attn_norm, post_mlp_norm: Gemma 3's (float32; empty elsewhere); reach:
// a sliding layer's (0: it sees every key)
Layer make_layer(torch::Tensor attn_norm, std::vector<Linear> qkv, Linear out,
                 torch::Tensor mlp_norm, std::vector<Linear> gate_up, Linear down,
                 torch::Tensor q_norm, torch::Tensor k_norm, torch::Tensor post_attn_norm,
                 torch::Tensor post_mlp_norm, int64_t reach) {
  for (const torch::Tensor& norm : {q_norm, k_norm, post_attn_norm, post_mlp_norm})
    TORCH_CHECK(norm.numel() == 0 || norm.dtype() == torch::kFloat32, "norms must be float32");
  TORCH_CHECK(post_attn_norm.numel() == 0 || post_attn_norm.numel() == attn_norm.numel(),
              "the output norms must be [hidden]");
  TORCH_CHECK(post_mlp_norm.numel() == 0 || post_mlp_norm.numel() == attn_norm.numel(),
              "the output norms must be [hidden]");
  return Layer{attn_norm.contiguous(), mlp_norm.contiguous(), std::move(qkv), {std::move(out)},
               std::move(gate_up), {std::move(down)}, q_norm.contiguous(), k_norm.contiguous(),
               post_attn_norm.contiguous(), post_mlp_norm.contiguous(), reach};
}

}  // namespace
