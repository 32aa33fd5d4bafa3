// The attention ops: the public stt::spatial_attention / stt::temporal_attention and their
// backward ops (what traced and exported graphs call), the kernels they run
// (stt::_attention_forward/_backward, implemented in cpu/ and cuda/attention_kernel.*), and the
// Python hand-off (backend.h).
//
// Public ops: q, k, v are (B, T, H, W, heads, d) with any strides; they return (out, lse) with
// out contiguous (B, T, H, W, heads, d) and lse contiguous float32 (float64 for float64 q)
// (B, Z, heads, N), and the backward ops contiguous (grad_q, grad_k, grad_v). `backend` is a
// backend name or 'auto'.
//
// Kernels: all tensors are 5-d strided views (B, Z, N, heads, d), attention over N for each
// (b, z, head): spatial is Z = T, N = H*W; temporal is Z = H*W, N = T, views of the 6-d tensors
// made without copies. The kernels write into the given out/lse (and dq/dk/dv) tensors, which
// may themselves be strided views; lse is the natural-log log-sum-exp of the scaled scores of
// each query row.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "backend.h"

namespace stt::ops {

namespace {

struct Spatial {
  static constexpr const char* name = "spatial_attention";
  static at::Tensor view(const at::Tensor& x) { return x.flatten(2, 3); }
};

struct Temporal {
  static constexpr const char* name = "temporal_attention";
  static at::Tensor view(const at::Tensor& x) { return x.flatten(2, 3).transpose(1, 2); }
};

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            double, c10::string_view);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&, double,
                                                                         c10::string_view);

template <class Layout>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                           c10::string_view backend) {
  if (auto python = python_implementation(Layout::name, q)) {
    return python->template typed<ForwardSignature>().call(q, k, v, scale, backend);
  }
  compiled_backend(backend, q, Layout::name, "attention");
  static const auto kernel = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("stt::_attention_forward", "")
                                 .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, double)>();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const at::Tensor view = Layout::view(q);
  // The kernels' accumulation type: a float32 lse would cap float64 gradients at ~1e-7 |lse|.
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({view.size(0), view.size(1), view.size(3), view.size(2)}, q.options().dtype(lse_dtype));
  kernel.call(view, Layout::view(k), Layout::view(v), Layout::view(out), lse, scale);
  return {out, lse};
}

template <class Layout>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        const at::Tensor& grad_out, double scale,
                                                        c10::string_view backend) {
  const std::string op = std::string(Layout::name) + "_backward";
  if (auto python = python_implementation(op.c_str(), q)) {
    return python->template typed<BackwardSignature>().call(q, k, v, out, lse, grad_out, scale, backend);
  }
  // Every compiled attention backward sums in a fixed order (the CUDA one too): nothing to refuse
  // under deterministic mode.
  compiled_backend(backend, q, Layout::name, "attention");
  static const auto kernel =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("stt::_attention_backward", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, double, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  kernel.call(Layout::view(q), Layout::view(k), Layout::view(v), Layout::view(out), Layout::view(grad_out), lse, scale,
              Layout::view(grad_q), Layout::view(grad_k), Layout::view(grad_v));
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stt, m) {
  m.def("_attention_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, float scale) -> ()");
  m.def(
      "_attention_backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor grad_out, Tensor lse, float scale, "
      "Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor(c!) grad_v) -> ()");
  // The fake kernels of the public ops are Python's (register_fake in this module).
  m.set_python_module("stt_kernels.ops.attention");
  for (const char* name : {"spatial_attention", "temporal_attention"}) {
    const std::string forward_args = "(Tensor q, Tensor k, Tensor v, float scale, str backend) -> (Tensor, Tensor)";
    const std::string backward_args =
        "(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor grad_out, float scale, str backend) -> "
        "(Tensor, Tensor, Tensor)";
    m.def((name + forward_args).c_str(), {at::Tag::pt2_compliant_tag});
    m.def((std::string(name) + "_backward" + backward_args).c_str(), {at::Tag::pt2_compliant_tag});
    m.def(("_" + std::string(name) + "_python" + forward_args).c_str());
    m.def(("_" + std::string(name) + "_backward_python" + backward_args).c_str());
  }
}

TORCH_LIBRARY_IMPL(stt, CPU, m) {
  m.impl("spatial_attention", &forward<Spatial>);
  m.impl("spatial_attention_backward", &backward<Spatial>);
  m.impl("temporal_attention", &forward<Temporal>);
  m.impl("temporal_attention_backward", &backward<Temporal>);
}

TORCH_LIBRARY_IMPL(stt, CUDA, m) {
  m.impl("spatial_attention", &forward<Spatial>);
  m.impl("spatial_attention_backward", &backward<Spatial>);
  m.impl("temporal_attention", &forward<Temporal>);
  m.impl("temporal_attention_backward", &backward<Temporal>);
}

}  // namespace stt::ops
