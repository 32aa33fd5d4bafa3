// The Python module stt_kernels._C. Loading it registers the ops (schemas, autograd, the public
// ops' CPU/CUDA kernels: csrc/ops) and the CUDA kernels with the dispatcher (TORCH_LIBRARY
// blocks in the other sources); the CPU kernels live in one library
// per x86 capability (stt_kernels/_isa.py loads one). The module reports its build and the CPU's
// features; it is compiled for the x86-64 baseline, so asking never faults.
#include <torch/extension.h>

#include <algorithm>
#include <string>

#ifndef STT_TORCH_VERSION
#define STT_TORCH_VERSION "unknown"
#endif
#ifndef STT_ARCHS
#define STT_ARCHS ""
#endif
#ifndef STT_CPU_CAPABILITIES
#define STT_CPU_CAPABILITIES ""
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
  pybind11::list capabilities;
  const std::string built = STT_CPU_CAPABILITIES;
  for (size_t start = 0; start < built.size();) {
    const size_t end = std::min(built.find(',', start), built.size());
    capabilities.append(built.substr(start, end - start));
    start = end + 1;
  }
  info["cpu_capabilities"] = capabilities;
#if defined(STT_DEBUG_BUILD)
  info["debug"] = true;
#else
  info["debug"] = false;
#endif
  return info;
}

// The instruction sets the kernel libraries may need, as this CPU and OS offer them: GCC's
// __builtin_cpu_supports also checks that the OS saves the AVX/AVX-512 registers (XCR0).
pybind11::dict cpu_features() {
  pybind11::dict features;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#define STT_FEATURE(name) features[name] = static_cast<bool>(__builtin_cpu_supports(name))
  STT_FEATURE("sse3");
  STT_FEATURE("ssse3");
  STT_FEATURE("sse4.1");
  STT_FEATURE("sse4.2");
  STT_FEATURE("popcnt");
  STT_FEATURE("avx");
  STT_FEATURE("avx2");
  STT_FEATURE("fma");
  STT_FEATURE("f16c");
  STT_FEATURE("bmi");
  STT_FEATURE("bmi2");
  STT_FEATURE("avx512f");
  STT_FEATURE("avx512bw");
  STT_FEATURE("avx512dq");
  STT_FEATURE("avx512vl");
#undef STT_FEATURE
#endif
  return features;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "stt-kernels compiled kernels (registered as torch.ops.stt.*)";
  m.def("build_info", &build_info,
        "What this library was built with: torch version, CUDA/HIP, archs, OpenMP, the CPU kernel libraries.");
  m.def("cpu_features", &cpu_features, "The x86 instruction sets this CPU and OS offer (empty elsewhere).");
}
