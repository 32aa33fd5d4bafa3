// Which at::vec implementation this kernel library was compiled for ("stt_default",
// "stt_avx2", "stt_avx512": the CPU_CAPABILITY cpu_vec.h derives from the compiler's target).
// The loader (stt_kernels/_isa.py) reports it, and the tests check that it matches the
// library's name, i.e. that the per-library flags took effect.
#include "stt/cpu_vec.h"

#define STT_STRINGIFY_(x) #x
#define STT_STRINGIFY(x) STT_STRINGIFY_(x)

extern "C" __attribute__((visibility("default"))) const char* stt_cpu_kernels_capability() {
  return STT_STRINGIFY(CPU_CAPABILITY);
}
