// Argument checks of the attention kernels (schemas in csrc/attention.cpp), shared by the CPU
// and CUDA implementations. The Python front end validates q, k, v; these guard what the
// kernels additionally rely on when they are called directly through torch.ops.stt.
#pragma once

#include <ATen/ATen.h>

namespace stt {

inline void check_attention_operand(const char* name, const at::Tensor& t, const at::Tensor& q,
                                    c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device && t.device() == q.device(), "stt::_attention: ", name,
              " must be on the device of q (", q.device(), "); got ", t.device());
  TORCH_CHECK(t.sizes() == q.sizes(), "stt::_attention: ", name, " must have the shape of q ", q.sizes(),
              " (B, Z, N, heads, d); got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "stt::_attention: ", name, " must have the dtype of q (",
              q.scalar_type(), "); got ", t.scalar_type());
}

inline void check_attention_q(const at::Tensor& q, c10::DeviceType device) {
  TORCH_CHECK(q.dim() == 5, "stt::_attention: q must be a 5-d view (B, Z, N, heads, d); got shape ", q.sizes());
  TORCH_CHECK(q.device().type() == device, "stt::_attention: q must be a ", device, " tensor; got ", q.device());
  TORCH_CHECK(q.size(4) >= 1, "stt::_attention: the head dim d of q must be >= 1; got ", q.size(4));
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "stt::_attention: q must be floating; got ", q.scalar_type());
}

inline void check_attention_lse(const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.device() == q.device(), "stt::_attention: lse must be on the device of q (", q.device(), "); got ",
              lse.device());
  // The accumulation type: a float32 lse would cap float64 gradients at ~1e-7 |lse| relative.
  const auto expected = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == expected, "stt::_attention: lse must be ",
              expected == at::kDouble ? "float64 for float64 q" : "float32 (float64 only for float64 q)", "; got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(3) &&
                  lse.size(3) == q.size(2),
              "stt::_attention: lse must have shape (B, Z, heads, N) = (", q.size(0), ", ", q.size(1), ", ", q.size(3),
              ", ", q.size(2), "); got ", lse.sizes());
}

inline void check_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& out, const at::Tensor& lse, double scale,
                                    c10::DeviceType device) {
  check_attention_q(q, device);
  check_attention_operand("k", k, q, device);
  check_attention_operand("v", v, q, device);
  check_attention_operand("out", out, q, device);
  check_attention_lse(lse, q);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "stt::_attention: scale must be positive and finite; got ", scale);
}

inline void check_attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& out, const at::Tensor& grad_out, const at::Tensor& lse,
                                     double scale, const at::Tensor& grad_q, const at::Tensor& grad_k,
                                     const at::Tensor& grad_v, c10::DeviceType device) {
  check_attention_forward(q, k, v, out, lse, scale, device);
  check_attention_operand("grad_out", grad_out, q, device);
  check_attention_operand("grad_q", grad_q, q, device);
  check_attention_operand("grad_k", grad_k, q, device);
  check_attention_operand("grad_v", grad_v, q, device);
}

}  // namespace stt
