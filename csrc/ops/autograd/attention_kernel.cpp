// Autograd of stt::spatial_attention and stt::temporal_attention: flash style, the backward op
// recomputes the probabilities from the saved log-sum-exp. Registered for the Autograd key, so
// a traced or exported model trains and differentiates in LibTorch as in Python.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>

namespace stt::ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <class Name>
class Attention : public torch::autograd::Function<Attention<Name>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double scale, c10::string_view backend) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(Name::forward, "")
                               .template typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, double, c10::string_view)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(q, k, v, scale, backend);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["backend"] = std::string(backend);
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow(Name::backward, "")
            .template typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, double, c10::string_view)>();
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_q, grad_k, grad_v] = op.call(saved[0], saved[1], saved[2], saved[3], saved[4], grads[0],
                                            ctx->saved_data["scale"].toDouble(),
                                            ctx->saved_data["backend"].toStringRef());
    return {grad_q, grad_k, grad_v, at::Tensor(), at::Tensor()};
  }
};

struct SpatialNames {
  static constexpr const char* forward = "stt::spatial_attention";
  static constexpr const char* backward = "stt::spatial_attention_backward";
};

struct TemporalNames {
  static constexpr const char* forward = "stt::temporal_attention";
  static constexpr const char* backward = "stt::temporal_attention_backward";
};

template <class Name>
std::tuple<at::Tensor, at::Tensor> autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            double scale, c10::string_view backend) {
  const variable_list result = Attention<Name>::apply(q, k, v, scale, backend);
  return {result[0], result[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(stt, Autograd, m) {
  m.impl("spatial_attention", &autograd<SpatialNames>);
  m.impl("temporal_attention", &autograd<TemporalNames>);
  // No double backward: differentiating a backward op raises torch's "not implemented" error.
  m.impl("spatial_attention_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("temporal_attention_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace stt::ops
