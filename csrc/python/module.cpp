// The Python module stt_kernels._C. Loading it registers the kernels with the dispatcher
// (TORCH_LIBRARY blocks in the other sources); the module itself only reports its build.
#include <torch/extension.h>

#ifndef STT_TORCH_VERSION
#define STT_TORCH_VERSION "unknown"
#endif
#ifndef STT_ARCHS
#define STT_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = STT_TORCH_VERSION;
#if defined(STT_WITH_CUDA)
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
#if defined(STT_WITH_HIP)
  info["with_hip"] = true;
#else
  info["with_hip"] = false;
#endif
  info["archs"] = STT_ARCHS;
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stt-kernels compiled kernels (registered as torch.ops.stt.*)";
  m.def("build_info", &build_info, "What this library was built with: torch version, CUDA/HIP, archs, OpenMP.");
}
