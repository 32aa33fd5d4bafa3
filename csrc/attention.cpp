// Schemas of the attention kernels (implemented in cpu/ and cuda/attention_kernel.*).
//
// All tensors are 5-d strided views (B, Z, N, heads, d): attention runs over N for each
// (b, z, head). The Python front end builds them from (B, T, H, W, heads, d) without copies:
// spatial is Z = T, N = H*W; temporal is Z = H*W, N = T. The kernels write into the given
// out/lse (and dq/dk/dv) tensors, which may themselves be strided views; lse is float32
// (float64 for float64 q) (B, Z, heads, N), the natural-log log-sum-exp of the scaled scores of each query row.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(stt, m) {
  m.def("_attention_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, float scale) -> ()");
  m.def(
      "_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor grad_out, Tensor lse, float scale, "
      "Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor(c!) grad_v) -> ()");
}
