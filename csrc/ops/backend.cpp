#include "backend.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <string>

namespace stt::ops {

namespace {

c10::DispatchKey device_key(const at::Tensor& like) {
  return like.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU;
}

}  // namespace

std::optional<c10::OperatorHandle> python_implementation(const char* op, const at::Tensor& like) {
  const std::string name = std::string("stt::_") + op + "_python";
  auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  if (handle.has_value() && handle->hasKernelForDispatchKey(device_key(like))) {
    return handle;
  }
  return std::nullopt;
}

std::string_view compiled_backend(std::string_view backend, const at::Tensor& like, const char* op,
                                  const char* kernels) {
  const std::string_view own = like.is_cuda() ? "cuda" : "cpu";
  TORCH_CHECK(like.is_cpu() || like.is_cuda(), "stt::", op, " runs on CPU and CUDA tensors; got ", like.device().type(),
              " tensors");
  const std::string_view other = like.is_cuda() ? "cpu" : "cuda";
  TORCH_CHECK(backend != other, "stt::", op, ": backend '", backend, "' cannot run on ", own,
              " tensors; use 'auto' or '", own, "'");
  TORCH_CHECK(backend == "auto" || backend == own, "stt::", op, ": backend '", backend, "' on ", own,
              " tensors needs Python (`import stt_kernels`): without it only the compiled '", own,
              "' kernels run here (backend 'auto' or '", own, "')");
  const auto forward = c10::Dispatcher::singleton().findSchema({std::string("stt::_") + kernels + "_forward", ""});
  TORCH_CHECK(forward.has_value() && forward->hasKernelForDispatchKey(device_key(like)), "stt::", op,
              ": this build of the stt kernels has no '", own, "' kernel",
              like.is_cuda() ? " (it was built without CUDA)" : "");
  return own;
}

void check_deterministic_backward(std::string_view backend, const char* op) {
  if (backend == "cuda" && at::globalContext().deterministicAlgorithms()) {
    // The same sentence as Python's check_deterministic_backward (stt_kernels/backend.py).
    at::globalContext().alertNotDeterministic(std::string("stt::") + op + " backward on the 'cuda' backend (atomic "
                                              "accumulation; the 'cpu' and 'reference' backends are deterministic)");
  }
}

}  // namespace stt::ops
