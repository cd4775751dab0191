// Matrix products on GGUF block-quantized weights, for the quant backend (backends/quant.py).
//
// y[r, o] = sum_i x[r, i] * w[o, i] with x in float32 and w stored as the GGUF stores it: each
// output row o is a run of blocks (32 weights for Q4_0/Q4_1/Q8_0, 256 for Q4_K/Q6_K) holding
// small integers and float16 scales. A block is decoded to float32 exactly as ggml dequantizes
// it, once per call, and used for every activation row.
//
// One accumulation order for every row count: each output is four float32 vector accumulators
// (8 lanes each) taking the 8-weight chunks of the row in turn (chunk c into accumulator c % 4),
// summed at the end in a fixed order. The row count, the thread count and which path runs (one
// row: decode into registers; several: decode into a buffer and stream the rows past it) change
// nothing in that order, so a row's result is bit-identical whether it is verified alone or in a
// tree of 64 rows.
//
// Built once per machine with -mavx2 -mfma plus the widest extension the CPU has (AVX-VNNI,
// AVX-512 VNNI, AMX tiles: quant.kernel_isa; torch.utils.cpp_extension, cached); the Python
// side checks the CPU has AVX2 and FMA before loading it.

#include <torch/extension.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>
#include <numeric>
#include <cmath>
#include <memory>

#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "blocks.h"
#include "products_f32.h"
#include "reference.h"
#include "products_q8.h"
#include "simd.h"
#include "products_packed.h"
#include "amx.h"
#include "matmul.h"
#include "repack.h"
#include "arena.h"
#include "limits.h"

// ---- The decoder layers in one call, row by row -----------------------------------------------
//
// Model::forward runs every layer of a Llama/Qwen2 decoder over T new rows: RMSNorm, the QKV
// products (+ bias), rotary, the KV-cache write, attention, the output product, the residual,
// RMSNorm, gate/up, SiLU * up, down, the residual, and the final RMSNorm (Gemma 3 adds per-head
// query and key norms, norms of both outputs before their residuals, a tanh-GELU gate, and
// sliding layers whose rows see only the keys of their last positions). Everything a row
// computes depends only on that row and on the keys and values it may see, never on the other
// rows of the call or on the thread count:
// - the matrix products are the kernels above (row-independent by construction);
// - norms, rotary and SiLU are per-row loops of one fixed shape;
// - attention is computed for each (row, head) alone, over exactly the keys the row may see, in
//   position order: the committed prefix, then the row's tree ancestors and itself, with one fixed
//   order of exponentials, sums and the weighted sum of values.
// A tree node at depth k therefore gets bit for bit the values plain decoding gets at that
// position with the same tokens before it: verification is exact at no extra cost, whatever the
// activations are rounded to. A prompt is no exception: its rows go through the same attention
// (in runs of kPromptRun rows, each run's shared keys scored key-major for all its queries), so a
// prompt prefilled at once leaves the cache and logits that prefilling a part and decoding the
// rest token by token leaves — a cached prefix can be reused exactly. Only a float32-path
// product (activations="float32", or a type the packed kernels do not take) of a prefill of 32
// rows or more goes through torch's batched kernel on weights decoded for the call.


#include "exp.h"
#include "decoder_ops.h"
#include "attention.h"
#include "decoder.h"
#include "topk.h"


// The passes and products run without the GIL: they touch no Python object, and a server's
// HTTP thread can then answer its clients during a pass instead of stopping the scheduler's
// thread between passes (tensors in and out are converted while it is held).
constexpr auto kFree = pybind11::call_guard<pybind11::gil_scoped_release>();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Linear>(m, "Linear").def(pybind11::init(&make_linear));
  pybind11::class_<Layer>(m, "Layer").def(pybind11::init(&make_layer));
  pybind11::class_<Model>(m, "Model")
      .def(pybind11::init<std::vector<Layer>, torch::Tensor, double, int64_t, int64_t, int64_t,
                          bool, int64_t, int64_t, double, bool>(),
           pybind11::arg("layers"), pybind11::arg("norm"), pybind11::arg("eps"),
           pybind11::arg("heads"), pybind11::arg("kv_heads"), pybind11::arg("head_dim"),
           pybind11::arg("int8"), pybind11::arg("prefetch_bytes") = Tuning{}.prefetch_bytes,
           pybind11::arg("amx_min_rows") = Tuning{}.amx_min_rows,
           pybind11::arg("attn_scale") = 0.0, pybind11::arg("gelu") = false)
      .def("forward", &Model::forward, "every decoder layer over T rows (see Model)", kFree)
      .def("forward_batch", &Model::forward_batch, "rows of several sequences in one pass",
           kFree);
  m.def("qmatmul", &qmatmul, "x @ dequantize(weight).T on GGUF blocks", kFree);
  m.def("dequantize_rows", &dequantize_rows, "rows of a GGUF-quantized matrix as float32");
  m.def("dequantize_reference", &dequantize_reference,
        "a GGUF-layout matrix as float32, by the plain scalar reference of its block type");
  m.def("pack_rows", &pack_rows, "GGUF Q4_0/Q4_1/Q8_0 blocks regrouped R rows at a time");
  m.def("weight_arena", &weight_arena, "uint8 [bytes], 2 MiB aligned, huge pages requested");
  m.def("rows_per_pack", &rows_per_pack, "R, the output rows packed together by pack_rows");
  m.def("qmatmul_q8", &qmatmul_q8, "x rounded to 8 bits per block @ dequantize(weight).T",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("type"), pybind11::arg("in"),
        pybind11::arg("amx_min_rows") = Tuning{}.amx_min_rows, kFree);
  m.def("read_bandwidth", &read_bandwidth, "bytes per second the threads read from memory",
        pybind11::arg("bytes"), pybind11::arg("repeats") = 3, kFree);
  m.def("int8_peak", &int8_peak, "8-bit multiply-adds per second of the products' dot product",
        pybind11::arg("iterations") = 100000000, kFree);
  m.def("top_k_rows", &top_k_rows, "every row's k largest values and their indices",
        pybind11::arg("x"), pybind11::arg("k"), kFree);
  m.def("softmax_top_k_rows", &softmax_top_k_rows,
        "every row's k likeliest softmax probabilities and their indices",
        pybind11::arg("x"), pybind11::arg("k"), kFree);
  m.def("argmax_margin_rows", &argmax_margin_rows,
        "every row's argmax and its lead over the largest other value (float64)",
        pybind11::arg("x"), kFree);
  m.def("amx_usable", [] { return kAmxBuild && amx_granted(); },
        "whether products of many rows can go through AMX tiles here (CPU, build, permission)");
}
