// at::vec::Vectorized for the CPU kernels, with the SIMD width the compiler targets.
//
// at::vec picks its implementation from CPU_CAPABILITY_* macros that torch's own build sets
// per source file; an extension that includes it bare gets the scalar fallback (exp_u20
// becomes a lane-by-lane std::exp). Set them from what the compiler targets: setup.py builds
// the CPU kernels once per capability, each into its own library with its own flags
// (stt_kernels/_isa.py: -mavx2 -mfma -mf16c, -mavx512f ...), and loads the one the CPU runs.
// CPU_CAPABILITY is the inline namespace of the vec types: naming it per capability keeps
// code built with different flags from sharing (ODR-clashing) definitions. Include this
// before any other ATen header in a kernel source.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY stt_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY stt_avx2
#else
#define CPU_CAPABILITY stt_default
#endif
#endif

#include <ATen/cpu/vec/vec.h>
