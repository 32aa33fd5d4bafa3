// Autograd of stt::deform_conv2d, registered for the Autograd key: the backward op gives the
// gradients of x, offset, mask and weight; the bias gradient is the sum of grad_out over N, H, W.
// Sizes stay SymInts, so a graph traced with dynamic shapes is not specialised here.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>

namespace stt::ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DeformConv2d : public torch::autograd::Function<DeformConv2d> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& offset,
                               const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
                               c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, c10::SymInt offset_groups,
                               c10::string_view backend) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("stt::deform_conv2d", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, c10::SymIntArrayRef,
                                                 c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymInt,
                                                 c10::string_view)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op.call(x, offset, mask, weight, bias, stride, padding, dilation, offset_groups, backend);
    // An undefined tensor stands for a mask of None among the saved variables.
    ctx->save_for_backward({x, offset, mask.value_or(at::Tensor()), weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["offset_groups"] = offset_groups;
    ctx->saved_data["backend"] = std::string(backend);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("stt::deform_conv2d_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymInt,
                c10::string_view)>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_out = grads[0];
    const std::optional<at::Tensor> mask = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    auto& data = ctx->saved_data;
    auto [grad_x, grad_offset, grad_mask, grad_weight] =
        op.call(grad_out, saved[0], saved[1], mask, saved[3], data["stride"].toSymIntVector(),
                data["padding"].toSymIntVector(), data["dilation"].toSymIntVector(), data["offset_groups"].toSymInt(),
                data["backend"].toStringRef());
    const at::Tensor grad_bias = data["has_bias"].toBool() ? grad_out.sum({0, 2, 3}) : at::Tensor();
    return {grad_x,      grad_offset,  mask.has_value() ? grad_mask : at::Tensor(),
            grad_weight, grad_bias,    at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor autograd(const at::Tensor& x, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
                    c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, c10::SymInt offset_groups,
                    c10::string_view backend) {
  return DeformConv2d::apply(x, offset, mask, weight, bias, stride, padding, dilation, std::move(offset_groups),
                             backend)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(stt, Autograd, m) {
  m.impl("deform_conv2d", &autograd);
  // No double backward: differentiating the backward op raises torch's "not implemented" error.
  m.impl("deform_conv2d_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace stt::ops
