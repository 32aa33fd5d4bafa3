// Which implementation runs a public op (stt::spatial_attention, ...), decided in C++.
//
// While Python has imported stt_kernels, it registers the internal op stt::_<op>_python for the
// CPU and CUDA keys, and every call of the public op is handed to it: Python's capability table
// (stt_kernels/backend.py) resolves 'auto', falls back to the reference, runs Triton, and stays
// the one authority. Without Python (a LibTorch program, an AOTInductor package) nothing
// registers it, and the public op runs the compiled kernels itself: 'auto' and the device's own
// backend name ('cpu' on CPU tensors, 'cuda' on CUDA tensors) run stt::_<kernel>_forward /
// _backward through the dispatcher; any other name is refused, saying it needs Python.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace stt::ops {

// stt::_<op>_python, if Python registered a kernel for the dispatch key of `like`'s device.
std::optional<c10::OperatorHandle> python_implementation(const char* op, const at::Tensor& like);

// The compiled backend ('cpu' or 'cuda') that runs `op` on `like`'s device for `backend` without
// Python, with the kernels stt::_<kernels>_forward/_backward; throws, naming the backend and what
// it needs, when there is none.
std::string_view compiled_backend(std::string_view backend, const at::Tensor& like, const char* op,
                                  const char* kernels);

// torch's deterministic-mode error (or warning, with warn_only) for a backward that accumulates
// with atomics: the CUDA deform_conv2d's (the attention kernels and the CPU kernels sum in a
// fixed order).
void check_deterministic_backward(std::string_view backend, const char* op);

}  // namespace stt::ops
