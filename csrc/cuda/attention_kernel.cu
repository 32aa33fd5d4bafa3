// CUDA (and, hipified, ROCm) kernels of stt::_attention_forward / _attention_backward
// (schemas in ../attention.cpp). The fallback GPU path where Triton is missing: simple, exact
// and O(N) in memory rather than peak-fast.
//
// Work is split into warp tasks (32 lanes; on 64-wide AMD wavefronts two tasks share one),
// each with its own shared-memory tiles, so no block-wide barrier is needed and the last
// block may hold idle warps. A key tile is 32 keys, one per lane:
//   forward   task = (sequence, kRows query rows); lane j scores key j of the tile, the warp
//             reduces max/sum with shuffles, and each lane accumulates d/32 output columns
//             with the online softmax of stt/online_softmax.h. Short sequences (N <= 32, the
//             temporal case) take one task per sequence: the whole T x T problem is one tile
//             loaded once, and the grid is just the batch of sequences.
//   backward  task = (sequence, key tile); dK, dV of the tile accumulate in shared memory,
//             P is recomputed from the saved lse, and dQ rows gather the tiles' contributions
//             with atomicAdd into a float accumulator (grad_q itself when it is float32/64).
// The grid is one-dimensional (axis x holds up to 2^31 - 1 blocks; y and z cap at 65,535).
// Accumulation is float32 (float64 for float64 inputs); head dims up to 128.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/DeviceUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "stt/attention_checks.h"
#include "stt/online_softmax.h"

namespace stt {
namespace {

constexpr int kLanes = 32;           // threads of a warp task = keys of a tile
constexpr int kRows = 8;             // query rows a forward task carries in registers
constexpr int kChunks = 4;           // output columns per lane: d <= kChunks * kLanes = 128
constexpr int kMaxWarps = 4;         // warp tasks per block
constexpr size_t kDefaultSmem = 48 * 1024;

struct Geometry {
  int64_t B, Z, N, H, D;
};

// Strides of a (B, Z, N, heads, d) view; base() is the first element of sequence s.
struct Strides5 {
  int64_t b, z, n, h, d;

  __host__ __device__ int64_t base(int64_t s, const Geometry& g) const {
    const int64_t head = s % g.H, bz = s / g.H;
    return (bz / g.Z) * b + (bz % g.Z) * z + head * h;
  }
};

// Strides of a (B, Z, heads, N) row table (lse, delta).
struct Strides4 {
  int64_t b, z, h, n;

  __host__ __device__ int64_t base(int64_t s, const Geometry& g) const {
    const int64_t head = s % g.H, bz = s / g.H;
    return (bz / g.Z) * b + (bz % g.Z) * z + head * h;
  }
};

Strides5 strides5(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

Strides4 strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) x = max(x, WARP_SHFL_XOR(x, offset, kLanes));
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) x += WARP_SHFL_XOR(x, offset, kLanes);
  return x;
}

// Loads rows [0, rows) x [0, d) of a strided matrix into shared memory with row pitch ld,
// lanes along d so that unit-stride rows read coalesced.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_rows(const scalar_t* src, int64_t s_row, int64_t s_col, int rows, int d,
                                          acc_t* dst, int ld, int lane, acc_t factor = acc_t(1)) {
  for (int e = lane; e < rows * d; e += kLanes) {
    const int r = e / d, c = e - r * d;
    dst[r * ld + c] = static_cast<acc_t>(src[r * s_row + c * s_col]) * factor;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t* a, const acc_t* b, int d) {
  acc_t s = 0;
  for (int c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}

// Row pitch of a tile in shared memory: lane i reads row i, so an odd pitch (in acc_t words)
// puts the 32 lanes' words in 32 different banks; d + 1 would be even, 8-way conflicts at d = 7.
__host__ __device__ inline int padded_pitch(int64_t d) { return static_cast<int>(d | 1); }

// Shared memory of one warp task, in units of acc_t.
__host__ __device__ inline int64_t forward_smem_per_warp(int64_t d) {
  return kLanes * padded_pitch(d) + kLanes * d + kRows * d;  // K tile (padded rows), V tile, q rows
}

__host__ __device__ inline int64_t backward_smem_per_warp(int64_t d) {
  return 4 * kLanes * padded_pitch(d) + 2 * d;  // K, V, dK, dV tiles (padded rows), one q and dO row
}

// ---------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxWarps* kLanes)
    attention_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                             const scalar_t* __restrict__ v, scalar_t* __restrict__ out, float* __restrict__ lse,
                             Strides5 sq, Strides5 sk, Strides5 sv, Strides5 so, Strides4 sl, Geometry g,
                             int64_t rows_per_task, int64_t tasks_per_seq, int64_t tasks, acc_t scale) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem_bytes[];
  const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + warp;
  if (task >= tasks) return;  // whole warps only: nothing below waits on other warps

  const int d = static_cast<int>(g.D), ldk = padded_pitch(d);
  acc_t* ks = reinterpret_cast<acc_t*>(smem_bytes) + warp * forward_smem_per_warp(d);
  acc_t* vs = ks + kLanes * ldk;
  acc_t* qs = vs + kLanes * d;

  const int64_t s = task / tasks_per_seq;
  const int64_t row_begin = (task % tasks_per_seq) * rows_per_task;
  const int64_t row_end = min64(g.N, row_begin + rows_per_task);
  const scalar_t* qb = q + sq.base(s, g);
  const scalar_t* kb = k + sk.base(s, g);
  const scalar_t* vb = v + sv.base(s, g);
  const int64_t k_tiles = (g.N + kLanes - 1) / kLanes;

  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRows) {
    const int nr = static_cast<int>(min64(kRows, row_end - r0));
    WARP_SYNC();
    // q pre-scaled, so scores come out of the dot product ready; absent rows are zeros.
    load_rows(qb + r0 * sq.n, sq.n, sq.d, nr, d, qs, d, lane, scale);
    for (int e = nr * d + lane; e < kRows * d; e += kLanes) qs[e] = acc_t(0);

    OnlineSoftmaxRow<acc_t> row[kRows];
    acc_t o[kRows][kChunks];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row[r] = online_softmax_init<acc_t>();
#pragma unroll
      for (int t = 0; t < kChunks; ++t) o[r][t] = acc_t(0);
    }

    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      const int64_t k0 = kt * kLanes;
      const int nk = static_cast<int>(min64(kLanes, g.N - k0));
      if (k_tiles > 1 || r0 == row_begin) {  // a single tile stays loaded for all row groups
        WARP_SYNC();
        load_rows(kb + k0 * sk.n, sk.n, sk.d, nk, d, ks, ldk, lane);
        load_rows(vb + k0 * sv.n, sv.n, sv.d, nk, d, vs, d, lane);
      }
      WARP_SYNC();
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const acc_t score = lane < nk ? dot(qs + r * d, ks + lane * ldk, d)
                                      : -std::numeric_limits<acc_t>::infinity();
        const acc_t new_max = online_softmax_new_max(row[r], warp_max(score));
        const acc_t p = lane < nk ? softmax_exp<acc_t>(score - new_max) : acc_t(0);
        const acc_t alpha = online_softmax_update(row[r], new_max, warp_sum(p));
#pragma unroll
        for (int t = 0; t < kChunks; ++t) o[r][t] *= alpha;
        for (int j = 0; j < nk; ++j) {
          const acc_t pj = WARP_SHFL(p, j, kLanes);
#pragma unroll
          for (int t = 0; t < kChunks; ++t) {
            const int c = lane + t * kLanes;
            if (c < d) o[r][t] += pj * vs[j * d + c];
          }
        }
      }
    }

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < nr) {
        const int64_t i = r0 + r;
        const acc_t inv = online_softmax_inv_sum(row[r]);
        scalar_t* orow = out + so.base(s, g) + i * so.n;
#pragma unroll
        for (int t = 0; t < kChunks; ++t) {
          const int c = lane + t * kLanes;
          if (c < d) orow[c * so.d] = static_cast<scalar_t>(o[r][t] * inv);
        }
        if (lane == 0) lse[sl.base(s, g) + i * sl.n] = static_cast<float>(online_softmax_lse(row[r]));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward.

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxWarps* kLanes)
    attention_backward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                              const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_out,
                              const float* __restrict__ lse, const acc_t* __restrict__ delta, acc_t* dq_acc,
                              scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v, Strides5 sq,
                              Strides5 sk, Strides5 sv, Strides5 sdo, Strides4 sl, Strides4 sdelta, Strides5 sdq,
                              Strides5 sdk, Strides5 sdv, Geometry g, int64_t k_tiles, int64_t tasks, acc_t scale) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem_bytes[];
  const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + warp;
  if (task >= tasks) return;

  const int d = static_cast<int>(g.D), ld = padded_pitch(d);
  acc_t* ks = reinterpret_cast<acc_t*>(smem_bytes) + warp * backward_smem_per_warp(d);
  acc_t* vs = ks + kLanes * ld;
  acc_t* dks = vs + kLanes * ld;
  acc_t* dvs = dks + kLanes * ld;
  acc_t* qrow = dvs + kLanes * ld;
  acc_t* dorow = qrow + d;

  const int64_t s = task / k_tiles;
  const int64_t k0 = (task % k_tiles) * kLanes;
  const int nk = static_cast<int>(min64(kLanes, g.N - k0));
  const scalar_t* qb = q + sq.base(s, g);
  const scalar_t* dob = grad_out + sdo.base(s, g);
  const float* lb = lse + sl.base(s, g);
  const acc_t* deltab = delta + sdelta.base(s, g);
  acc_t* dqb = dq_acc + sdq.base(s, g);

  load_rows(k + sk.base(s, g) + k0 * sk.n, sk.n, sk.d, nk, d, ks, ld, lane);
  load_rows(v + sv.base(s, g) + k0 * sv.n, sv.n, sv.d, nk, d, vs, ld, lane);
  for (int e = lane; e < kLanes * ld; e += kLanes) {
    dks[e] = acc_t(0);
    dvs[e] = acc_t(0);
  }

  for (int64_t i = 0; i < g.N; ++i) {
    WARP_SYNC();  // the previous row is no longer read
    load_rows(qb + i * sq.n, sq.n, sq.d, 1, d, qrow, d, lane);
    load_rows(dob + i * sdo.n, sdo.n, sdo.d, 1, d, dorow, d, lane);
    WARP_SYNC();
    const acc_t lse_i = static_cast<acc_t>(lb[i * sl.n]);
    const acc_t delta_i = deltab[i * sdelta.n];

    // Lane j owns key j: its P, dS and its rows of dK, dV.
    acc_t ds = 0;
    if (lane < nk) {
      const acc_t p = softmax_prob_from_lse<acc_t>(scale * dot(qrow, ks + lane * ld, d), lse_i);
      ds = softmax_grad<acc_t>(p, dot(dorow, vs + lane * ld, d), delta_i);
      acc_t* dv_row = dvs + lane * ld;
      acc_t* dk_row = dks + lane * ld;
      const acc_t sds = scale * ds;
      for (int c = 0; c < d; ++c) {
        dv_row[c] += p * dorow[c];
        dk_row[c] += sds * qrow[c];
      }
    }

    // dQ_i = scale * sum_j dS_j K_j: lanes own columns, dS_j travels by shuffle.
    acc_t dq[kChunks];
#pragma unroll
    for (int t = 0; t < kChunks; ++t) dq[t] = acc_t(0);
    for (int j = 0; j < nk; ++j) {
      const acc_t dsj = WARP_SHFL(ds, j, kLanes);
#pragma unroll
      for (int t = 0; t < kChunks; ++t) {
        const int c = lane + t * kLanes;
        if (c < d) dq[t] += dsj * ks[j * ld + c];
      }
    }
#pragma unroll
    for (int t = 0; t < kChunks; ++t) {
      const int c = lane + t * kLanes;
      if (c < d) atomicAdd(dqb + i * sdq.n + c * sdq.d, scale * dq[t]);
    }
  }

  WARP_SYNC();
  scalar_t* dkb = grad_k + sdk.base(s, g) + k0 * sdk.n;
  scalar_t* dvb = grad_v + sdv.base(s, g) + k0 * sdv.n;
  for (int e = lane; e < nk * d; e += kLanes) {
    const int j = e / d, c = e - j * d;
    dkb[j * sdk.n + c * sdk.d] = static_cast<scalar_t>(dks[j * ld + c]);
    dvb[j * sdv.n + c * sdv.d] = static_cast<scalar_t>(dvs[j * ld + c]);
  }
}

// ---------------------------------------------------------------------------------------
// Launch helpers.

struct LaunchConfig {
  int warps;
  size_t smem;
  int64_t blocks;
};

// As many warps per block as fit the default 48 KiB of shared memory (at least one; a single
// warp over that limit, float64 with a large d, opts in to the device's larger maximum).
template <typename Kernel>
LaunchConfig launch_config(Kernel kernel, int64_t tasks, size_t per_warp_bytes) {
  int warps = kMaxWarps;
  while (warps > 1 && warps * per_warp_bytes > kDefaultSmem) warps /= 2;
  const size_t smem = warps * per_warp_bytes;
  if (smem > kDefaultSmem) {
    const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(smem <= optin, "stt::_attention (cuda): needs ", smem, " bytes of shared memory per block, the GPU ",
                "allows ", optin, "; use a smaller head dim or another dtype");
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const int64_t blocks = (tasks + warps - 1) / warps;
  TORCH_CHECK(blocks <= INT_MAX, "stt::_attention (cuda): ", tasks, " warp tasks exceed one launch grid");
  return {warps, smem, blocks};
}

Geometry geometry(const at::Tensor& q) {
  return {q.size(0), q.size(1), q.size(2), q.size(3), q.size(4)};
}

bool empty_problem(const at::Tensor& q) {
  return q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0 || q.size(3) == 0;
}

void attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& lse, double scale) {
  check_attention_forward(q, k, v, out, lse, scale, c10::DeviceType::CUDA);
  TORCH_CHECK(q.size(4) <= kChunks * kLanes, "stt::_attention (cuda): head dim d must be <= ", kChunks * kLanes,
              "; got ", q.size(4));
  if (empty_problem(q)) return;
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const Geometry g = geometry(q);
  // Short sequences: one task per sequence keeps its single key tile loaded for every row.
  const int64_t rows_per_task = g.N <= kLanes ? g.N : kRows;
  const int64_t tasks_per_seq = (g.N + rows_per_task - 1) / rows_per_task;
  const int64_t tasks = g.B * g.Z * g.H * tasks_per_seq;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "stt_attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = attention_forward_kernel<scalar_t, acc_t>;
    const LaunchConfig cfg = launch_config(kernel, tasks, forward_smem_per_warp(g.D) * sizeof(acc_t));
    kernel<<<static_cast<unsigned int>(cfg.blocks), cfg.warps * kLanes, cfg.smem,
             at::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), strides5(q), strides5(k), strides5(v), strides5(out), strides4(lse), g,
        rows_per_task, tasks_per_seq, tasks, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void attention_backward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& grad_out, const at::Tensor& lse, double scale,
                             const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v) {
  check_attention_backward(q, k, v, out, grad_out, lse, scale, grad_q, grad_k, grad_v, c10::DeviceType::CUDA);
  TORCH_CHECK(q.size(4) <= kChunks * kLanes, "stt::_attention (cuda): head dim d must be <= ", kChunks * kLanes,
              "; got ", q.size(4));
  if (empty_problem(q)) return;
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const Geometry g = geometry(q);
  const auto acc_type = at::toOpMathType(q.scalar_type());
  // D_i = rowsum(dO_i * O_i), (B, Z, N, heads) viewed as (B, Z, heads, N).
  const at::Tensor delta = (out.to(acc_type) * grad_out.to(acc_type)).sum(-1).transpose(2, 3);
  // dQ gathers from every key tile: atomics into an accumulator of the accumulation type.
  const bool in_place = grad_q.scalar_type() == acc_type;
  at::Tensor dq_acc = in_place ? grad_q : at::empty(grad_q.sizes(), grad_q.options().dtype(acc_type));
  dq_acc.zero_();
  const int64_t k_tiles = (g.N + kLanes - 1) / kLanes;
  const int64_t tasks = g.B * g.Z * g.H * k_tiles;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "stt_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = attention_backward_kernel<scalar_t, acc_t>;
    const LaunchConfig cfg = launch_config(kernel, tasks, backward_smem_per_warp(g.D) * sizeof(acc_t));
    kernel<<<static_cast<unsigned int>(cfg.blocks), cfg.warps * kLanes, cfg.smem,
             at::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), delta.data_ptr<acc_t>(), dq_acc.data_ptr<acc_t>(), grad_k.data_ptr<scalar_t>(),
        grad_v.data_ptr<scalar_t>(), strides5(q), strides5(k), strides5(v), strides5(grad_out), strides4(lse),
        strides4(delta), strides5(dq_acc), strides5(grad_k), strides5(grad_v), g, k_tiles, tasks,
        static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!in_place) grad_q.copy_(dq_acc);
}

}  // namespace
}  // namespace stt

TORCH_LIBRARY_IMPL(stt, CUDA, m) {
  m.impl("_attention_forward", &stt::attention_forward_cuda);
  m.impl("_attention_backward", &stt::attention_backward_cuda);
}
