// The modulated deformable convolution ops: the public stt::deform_conv2d and its backward op
// (what traced and exported graphs call), the kernels they run (stt::_deform_conv2d_forward /
// _backward, implemented in cpu/ and cuda/deform_conv2d_kernel.*), and the Python hand-off
// (backend.h).
//
// torchvision's semantics: x (N, C, H, W), offset (N, 2*G*Kh*Kw, Ho, Wo), mask (N, G*Kh*Kw, Ho, Wo)
// or None, weight (C_out, C / weight_groups, Kh, Kw), bias (C_out) or None. The public ops return
// contiguous tensors whatever the inputs' strides (the fake kernels promise the same); the
// backward op returns grad_mask empty when mask is None and leaves the bias gradient (a sum over
// grad_out) to the autograd formula. The kernels take the weight groups explicitly, C / weight's
// second size.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "backend.h"

namespace stt::ops {

namespace {

constexpr const char* kName = "deform_conv2d";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contiguous(
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads) {
  auto& [grad_x, grad_offset, grad_mask, grad_weight] = grads;
  return {grad_x.contiguous(), grad_offset.contiguous(), grad_mask.contiguous(), grad_weight.contiguous()};
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                   const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t offset_groups, c10::string_view backend) {
  if (auto python = python_implementation(kName, x)) {
    return python
        ->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const std::optional<at::Tensor>&, c10::SymIntArrayRef, c10::SymIntArrayRef,
                           c10::SymIntArrayRef, c10::SymInt, c10::string_view)>()
        .call(x, offset, mask, weight, bias, c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(padding),
              c10::fromIntArrayRefSlow(dilation), c10::SymInt(offset_groups), backend);
  }
  compiled_backend(backend, x, kName, kName);
  static const auto kernel =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("stt::_deform_conv2d_forward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                            const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t)>();
  return kernel
      .call(x, offset, mask, weight, bias, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            offset_groups, x.size(1) / weight.size(1))
      .contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                    const at::Tensor& offset,
                                                                    const std::optional<at::Tensor>& mask,
                                                                    const at::Tensor& weight, at::IntArrayRef stride,
                                                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                    int64_t offset_groups, c10::string_view backend) {
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymInt, c10::string_view);
  if (auto python = python_implementation("deform_conv2d_backward", x)) {
    return python->typed<Signature>().call(grad_out, x, offset, mask, weight, c10::fromIntArrayRefSlow(stride),
                                           c10::fromIntArrayRefSlow(padding), c10::fromIntArrayRefSlow(dilation),
                                           c10::SymInt(offset_groups), backend);
  }
  check_deterministic_backward(compiled_backend(backend, x, kName, kName), kName);
  static const auto kernel =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("stt::_deform_conv2d_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const at::Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t)>();
  return contiguous(kernel.call(grad_out, x, offset, mask, weight, stride[0], stride[1], padding[0], padding[1],
                                dilation[0], dilation[1], offset_groups, x.size(1) / weight.size(1)));
}

// Under autocast the public op takes its floating tensors but float64 in the autocast dtype: a deformable
// convolution is a convolution, and autocast runs those in the lower precision (conv2d is on its
// lower-precision list). stt_kernels.deform_conv2d casts the same way in Python before its checks;
// this kernel serves graphs and programs that call the op itself. The casts are recorded by
// autograd (this key is above it), so float32 parameters get float32 gradients.
template <c10::DeviceType kDevice, c10::DispatchKey kKey>
at::Tensor autocast_forward(const at::Tensor& x, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
                            c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, c10::SymInt offset_groups,
                            c10::string_view backend) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("stt::deform_conv2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                            const std::optional<at::Tensor>&, c10::SymIntArrayRef, c10::SymIntArrayRef,
                            c10::SymIntArrayRef, c10::SymInt, c10::string_view)>();
  return op.call(cast(x), cast(offset), cast(mask), cast(weight), cast(bias), stride, padding, dilation,
                 std::move(offset_groups), backend);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stt, m) {
  m.def(
      "_deform_conv2d_forward(Tensor x, Tensor offset, Tensor? mask, Tensor weight, Tensor? bias, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int offset_groups, int weight_groups) -> Tensor");
  m.def(
      "_deform_conv2d_backward(Tensor grad_out, Tensor x, Tensor offset, Tensor? mask, Tensor weight, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int offset_groups, int weight_groups) -> (Tensor grad_x, Tensor grad_offset, Tensor grad_mask, "
      "Tensor grad_weight)");
  // The fake kernels of the public ops are Python's (register_fake in this module).
  m.set_python_module("stt_kernels.ops.deform_conv2d");
  const std::string forward_args =
      "(Tensor x, Tensor offset, Tensor? mask, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, "
      "SymInt[] dilation, SymInt offset_groups, str backend) -> Tensor";
  const std::string backward_args =
      "(Tensor grad_out, Tensor x, Tensor offset, Tensor? mask, Tensor weight, SymInt[] stride, SymInt[] padding, "
      "SymInt[] dilation, SymInt offset_groups, str backend) -> (Tensor, Tensor, Tensor, Tensor)";
  m.def(("deform_conv2d" + forward_args).c_str(), {at::Tag::pt2_compliant_tag});
  m.def(("deform_conv2d_backward" + backward_args).c_str(), {at::Tag::pt2_compliant_tag});
  m.def(("_deform_conv2d_python" + forward_args).c_str());
  m.def(("_deform_conv2d_backward_python" + backward_args).c_str());
}

TORCH_LIBRARY_IMPL(stt, CPU, m) {
  m.impl("deform_conv2d", &forward);
  m.impl("deform_conv2d_backward", &backward);
}

TORCH_LIBRARY_IMPL(stt, CUDA, m) {
  m.impl("deform_conv2d", &forward);
  m.impl("deform_conv2d_backward", &backward);
}

TORCH_LIBRARY_IMPL(stt, AutocastCPU, m) {
  m.impl("deform_conv2d", &autocast_forward<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(stt, AutocastCUDA, m) {
  m.impl("deform_conv2d", &autocast_forward<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace stt::ops
