// Portability macros shared by the CPU, CUDA and HIP builds of the same math headers.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define STT_HOST_DEVICE inline
#endif
