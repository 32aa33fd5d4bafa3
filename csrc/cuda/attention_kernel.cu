// CUDA (and, hipified, ROCm) kernels of stt::_attention_forward / _attention_backward
// (schemas in ../attention.cpp). The fallback GPU path where Triton is missing: simple, exact,
// deterministic and O(N) in memory rather than peak-fast.
//
// Work is split into warp tasks (32 lanes; on 64-wide AMD wavefronts two tasks share one),
// each with its own shared-memory tiles, so no block-wide barrier is needed and the last
// block may hold idle warps. A key tile is up to 32 keys, one per lane: 32 unless the device's
// shared memory cannot hold such tiles (choose_tiling below).
//   forward   task = (sequence, a group of query rows); lane j scores key j of the tile, the
//             warp reduces max/sum with shuffles, and each lane accumulates d/32 output columns
//             with the online softmax of stt/online_softmax.h. A group is 8 rows of up to 4
//             chunks of 32 columns (d <= 128) or 4 rows of up to 8 chunks (d <= 256): the same
//             32 accumulators per lane, so the two instances need the same registers. Short
//             sequences (N <= one key tile, the temporal case) take one task per sequence: the
//             whole T x T problem is one tile loaded once, and the grid is just the batch of
//             sequences.
//   dQ        task = (sequence, a group of query rows), the forward's shape: it owns its rows
//             of dQ and loops over the key tiles, recomputing P from the saved lse and
//             dP = dO V^T (FlashAttention-2's split), so dQ needs no atomics.
//   dK, dV    task = (sequence, key tile, column block); the tile's dK, dV accumulate in shared
//             memory over the query rows in order. Column blocks narrower than d (P and dS
//             recomputed per block) only where full-width tiles do not fit the device.
// Every sum of the backward thus runs in one fixed order: it is deterministic, run to run.
// The grid is one-dimensional (axis x holds up to 2^31 - 1 blocks; y and z cap at 65,535).
// Accumulation and the saved lse are float32 (float64 for float64 inputs); head dims up to 256.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/DeviceUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "stt/attention_checks.h"
#include "stt/online_softmax.h"

namespace stt {
namespace {

constexpr int kLanes = 32;         // threads of a warp task = the most keys of a tile
constexpr int kAccumulators = 32;  // output (or dQ) accumulators per lane: rows x chunks of a row group
constexpr int kMaxChunks = 8;      // columns per lane and row: d <= kMaxChunks * kLanes = 256
constexpr int kMaxWarps = 4;       // warp tasks per block
// The kernels' __launch_bounds__(kMaxWarps * kLanes, 1): one resident block is enough, so
// ptxas may use the registers the accumulators need. Without the 1, CUDA 13's ptxas capped the
// float32 forward and dQ kernels at 128 registers and spilled 48-124 bytes
// (tests/test_cuda_resources.py fails on any spill).

struct Geometry {
  int64_t B, Z, N, H, D;
};

// Columns per lane (chunks of 32) of the forward and dQ instance that takes head dim d, and the
// query rows of its row group: 4 x 8 or 8 x 4, kAccumulators either way.
__host__ __device__ constexpr int chunks_for(int64_t d) { return d <= 4 * kLanes ? 4 : kMaxChunks; }
__host__ __device__ constexpr int rows_for(int chunks) { return kAccumulators / chunks; }

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

Strides5 strides5(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)}; }

Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Which warp task of the launch this warp runs, and its lane.
struct WarpTask {
  int warp, lane;
  int64_t task;
};

__device__ __forceinline__ WarpTask warp_task() {
  const int warp = threadIdx.x / kLanes;
  return {warp, static_cast<int>(threadIdx.x % kLanes),
          static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + warp};
}

// The query rows [begin, end) of sequence s a forward or dQ task owns, and the key tiles it
// walks for them.
struct QueryRows {
  int64_t s, begin, end, k_tiles;
};

__device__ __forceinline__ QueryRows query_rows(int64_t task, const Geometry& g, int keys, int64_t rows_per_task,
                                                int64_t tasks_per_seq) {
  const int64_t begin = (task % tasks_per_seq) * rows_per_task;
  return {task / tasks_per_seq, begin, min64(g.N, begin + rows_per_task), (g.N + keys - 1) / keys};
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

// A row group (`rows` query rows) of q (pre-scaled, so that scores come out of the dot product
// ready) or of dO at row r0, of which nr exist; absent rows are zeros.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row_group(const scalar_t* src, int64_t s_row, int64_t s_col, int nr, int rows,
                                               int d, acc_t* dst, int lane, acc_t factor) {
  load_rows(src, s_row, s_col, nr, d, dst, d, lane, factor);
  for (int e = nr * d + lane; e < rows * d; e += kLanes) dst[e] = acc_t(0);
}

// The key tile [k0, k0 + nk) of one sequence (kb, vb its first elements): K into ks with row
// pitch ldk, V into vs with row pitch ldv.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_key_tile(const scalar_t* kb, const Strides5& sk, const scalar_t* vb,
                                              const Strides5& sv, int64_t k0, int nk, int d, acc_t* ks, int ldk,
                                              acc_t* vs, int ldv, int lane) {
  load_rows(kb + k0 * sk.n, sk.n, sk.d, nk, d, ks, ldk, lane);
  load_rows(vb + k0 * sv.n, sv.n, sv.d, nk, d, vs, ldv, lane);
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

// Shared memory of one warp task, in units of acc_t, for key tiles of `keys` keys.
__host__ __device__ inline int64_t forward_smem_per_warp(int64_t d, int keys) {
  // K tile (padded rows), V tile, the row group of q
  return keys * padded_pitch(d) + keys * d + rows_for(chunks_for(d)) * d;
}

__host__ __device__ inline int64_t dq_smem_per_warp(int64_t d, int keys) {
  // K, V tiles (padded rows), the row groups of q and dO
  return 2 * keys * padded_pitch(d) + 2 * rows_for(chunks_for(d)) * d;
}

// cols: the width of the task's column block of dK and dV.
__host__ __device__ inline int64_t dkdv_smem_per_warp(int64_t d, int keys, int cols) {
  return 2 * keys * padded_pitch(d) + 2 * keys * padded_pitch(cols) + 2 * d;  // K, V, dK, dV tiles; q, dO rows
}

// ---------------------------------------------------------------------------------------
// Forward.

// kChunks: chunks_for(d), which the launch picks; the row group is rows_for(kChunks) rows.
template <typename scalar_t, typename acc_t, int kChunks>
__global__ void __launch_bounds__(kMaxWarps* kLanes, 1)
    attention_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                             const scalar_t* __restrict__ v, scalar_t* __restrict__ out, acc_t* __restrict__ lse,
                             Strides5 sq, Strides5 sk, Strides5 sv, Strides5 so, Strides4 sl, Geometry g, int keys,
                             int64_t rows_per_task, int64_t tasks_per_seq, int64_t tasks, acc_t scale) {
  constexpr int kRows = rows_for(kChunks);
  extern __shared__ __align__(sizeof(double)) unsigned char smem_bytes[];
  const WarpTask w = warp_task();
  const int lane = w.lane;
  if (w.task >= tasks) return;  // whole warps only: nothing below waits on other warps

  const int d = static_cast<int>(g.D), ldk = padded_pitch(d);
  acc_t* ks = reinterpret_cast<acc_t*>(smem_bytes) + w.warp * forward_smem_per_warp(d, keys);
  acc_t* vs = ks + keys * ldk;
  acc_t* qs = vs + keys * d;

  const QueryRows rows = query_rows(w.task, g, keys, rows_per_task, tasks_per_seq);
  const int64_t s = rows.s;
  const scalar_t* qb = q + sq.base(s, g);
  const scalar_t* kb = k + sk.base(s, g);
  const scalar_t* vb = v + sv.base(s, g);

  for (int64_t r0 = rows.begin; r0 < rows.end; r0 += kRows) {
    const int nr = static_cast<int>(min64(kRows, rows.end - r0));
    WARP_SYNC();
    load_row_group(qb + r0 * sq.n, sq.n, sq.d, nr, kRows, d, qs, lane, scale);

    OnlineSoftmaxRow<acc_t> row[kRows];
    acc_t o[kRows][kChunks];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row[r] = online_softmax_init<acc_t>();
#pragma unroll
      for (int t = 0; t < kChunks; ++t) o[r][t] = acc_t(0);
    }

    for (int64_t kt = 0; kt < rows.k_tiles; ++kt) {
      const int64_t k0 = kt * keys;
      const int nk = static_cast<int>(min64(keys, g.N - k0));
      if (rows.k_tiles > 1 || r0 == rows.begin) {  // a single tile stays loaded for all row groups
        WARP_SYNC();
        load_key_tile(kb, sk, vb, sv, k0, nk, d, ks, ldk, vs, d, lane);
      }
      WARP_SYNC();
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const acc_t score = lane < nk ? dot(qs + r * d, ks + lane * ldk, d) : -std::numeric_limits<acc_t>::infinity();
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
        if (lane == 0) lse[sl.base(s, g) + i * sl.n] = online_softmax_lse(row[r]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward: dQ.

template <typename scalar_t, typename acc_t, int kChunks>
__global__ void __launch_bounds__(kMaxWarps* kLanes, 1)
    attention_backward_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                 const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_out,
                                 const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                                 scalar_t* __restrict__ grad_q, Strides5 sq, Strides5 sk, Strides5 sv, Strides5 sdo,
                                 Strides4 sl, Strides4 sdelta, Strides5 sdq, Geometry g, int keys,
                                 int64_t rows_per_task, int64_t tasks_per_seq, int64_t tasks, acc_t scale) {
  constexpr int kRows = rows_for(kChunks);
  extern __shared__ __align__(sizeof(double)) unsigned char smem_bytes[];
  const WarpTask w = warp_task();
  const int lane = w.lane;
  if (w.task >= tasks) return;

  const int d = static_cast<int>(g.D), ld = padded_pitch(d);
  acc_t* ks = reinterpret_cast<acc_t*>(smem_bytes) + w.warp * dq_smem_per_warp(d, keys);
  acc_t* vs = ks + keys * ld;
  acc_t* qs = vs + keys * ld;
  acc_t* dos = qs + kRows * d;

  const QueryRows rows = query_rows(w.task, g, keys, rows_per_task, tasks_per_seq);
  const int64_t s = rows.s;
  const scalar_t* kb = k + sk.base(s, g);
  const scalar_t* vb = v + sv.base(s, g);
  const acc_t* lb = lse + sl.base(s, g);
  const acc_t* deltab = delta + sdelta.base(s, g);

  for (int64_t r0 = rows.begin; r0 < rows.end; r0 += kRows) {
    const int nr = static_cast<int>(min64(kRows, rows.end - r0));
    WARP_SYNC();
    load_row_group(q + sq.base(s, g) + r0 * sq.n, sq.n, sq.d, nr, kRows, d, qs, lane, scale);
    load_row_group(grad_out + sdo.base(s, g) + r0 * sdo.n, sdo.n, sdo.d, nr, kRows, d, dos, lane, acc_t(1));

    acc_t lse_r[kRows], delta_r[kRows], dq[kRows][kChunks];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      lse_r[r] = r < nr ? lb[(r0 + r) * sl.n] : acc_t(0);
      delta_r[r] = r < nr ? deltab[(r0 + r) * sdelta.n] : acc_t(0);
#pragma unroll
      for (int t = 0; t < kChunks; ++t) dq[r][t] = acc_t(0);
    }

    for (int64_t kt = 0; kt < rows.k_tiles; ++kt) {
      const int64_t k0 = kt * keys;
      const int nk = static_cast<int>(min64(keys, g.N - k0));
      if (rows.k_tiles > 1 || r0 == rows.begin) {
        WARP_SYNC();
        load_key_tile(kb, sk, vb, sv, k0, nk, d, ks, ld, vs, ld, lane);
      }
      WARP_SYNC();
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < nr) {  // the same for the whole warp: the shuffles below see every lane
          // Lane j: dS_rj = P_rj (dP_rj - D_r), P recomputed from the saved lse.
          acc_t ds = 0;
          if (lane < nk) {
            const acc_t p = softmax_prob_from_lse<acc_t>(dot(qs + r * d, ks + lane * ld, d), lse_r[r]);
            ds = softmax_grad<acc_t>(p, dot(dos + r * d, vs + lane * ld, d), delta_r[r]);
          }
          // dQ_r += dS_r K: lanes own columns, dS_rj travels by shuffle, keys in order.
          for (int j = 0; j < nk; ++j) {
            const acc_t dsj = WARP_SHFL(ds, j, kLanes);
#pragma unroll
            for (int t = 0; t < kChunks; ++t) {
              const int c = lane + t * kLanes;
              if (c < d) dq[r][t] += dsj * ks[j * ld + c];
            }
          }
        }
      }
    }

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < nr) {
        scalar_t* dqrow = grad_q + sdq.base(s, g) + (r0 + r) * sdq.n;
#pragma unroll
        for (int t = 0; t < kChunks; ++t) {
          const int c = lane + t * kLanes;
          if (c < d) dqrow[c * sdq.d] = static_cast<scalar_t>(scale * dq[r][t]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward: dK, dV.

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxWarps* kLanes, 1)
    attention_backward_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                   const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_out,
                                   const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                                   scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v, Strides5 sq,
                                   Strides5 sk, Strides5 sv, Strides5 sdo, Strides4 sl, Strides4 sdelta, Strides5 sdk,
                                   Strides5 sdv, Geometry g, int keys, int cols, int64_t k_tiles, int64_t col_blocks,
                                   int64_t tasks, acc_t scale) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem_bytes[];
  const WarpTask w = warp_task();
  const int lane = w.lane;
  if (w.task >= tasks) return;

  const int d = static_cast<int>(g.D), ld = padded_pitch(d), ldc = padded_pitch(cols);
  acc_t* ks = reinterpret_cast<acc_t*>(smem_bytes) + w.warp * dkdv_smem_per_warp(d, keys, cols);
  acc_t* vs = ks + keys * ld;
  acc_t* dks = vs + keys * ld;
  acc_t* dvs = dks + keys * ldc;
  acc_t* qrow = dvs + keys * ldc;
  acc_t* dorow = qrow + d;

  // The column blocks of one key tile are neighbours in launch order: they share K, V in L2.
  const int64_t s = w.task / (k_tiles * col_blocks);
  const int64_t tile = w.task % (k_tiles * col_blocks);
  const int64_t k0 = (tile / col_blocks) * keys;
  const int c0 = static_cast<int>(tile % col_blocks) * cols;
  const int nk = static_cast<int>(min64(keys, g.N - k0));
  const int nc = min(cols, d - c0);
  const scalar_t* qb = q + sq.base(s, g);
  const scalar_t* dob = grad_out + sdo.base(s, g);
  const acc_t* lb = lse + sl.base(s, g);
  const acc_t* deltab = delta + sdelta.base(s, g);

  load_key_tile(k + sk.base(s, g), sk, v + sv.base(s, g), sv, k0, nk, d, ks, ld, vs, ld, lane);
  for (int e = lane; e < keys * ldc; e += kLanes) {
    dks[e] = acc_t(0);
    dvs[e] = acc_t(0);
  }

  for (int64_t i = 0; i < g.N; ++i) {
    WARP_SYNC();  // the previous row is no longer read
    // q pre-scaled: its dot with K is the score, and dS q_scaled is dK's scale * dS q.
    load_rows(qb + i * sq.n, sq.n, sq.d, 1, d, qrow, d, lane, scale);
    load_rows(dob + i * sdo.n, sdo.n, sdo.d, 1, d, dorow, d, lane);
    WARP_SYNC();

    // Lane j owns key j: its P, dS and its rows of the dK, dV block.
    if (lane < nk) {
      const acc_t p = softmax_prob_from_lse<acc_t>(dot(qrow, ks + lane * ld, d), lb[i * sl.n]);
      const acc_t ds = softmax_grad<acc_t>(p, dot(dorow, vs + lane * ld, d), deltab[i * sdelta.n]);
      acc_t* dv_row = dvs + lane * ldc;
      acc_t* dk_row = dks + lane * ldc;
      for (int c = 0; c < nc; ++c) {
        dv_row[c] += p * dorow[c0 + c];
        dk_row[c] += ds * qrow[c0 + c];
      }
    }
  }

  WARP_SYNC();
  scalar_t* dkb = grad_k + sdk.base(s, g) + k0 * sdk.n + c0 * sdk.d;
  scalar_t* dvb = grad_v + sdv.base(s, g) + k0 * sdv.n + c0 * sdv.d;
  for (int e = lane; e < nk * nc; e += kLanes) {
    const int j = e / nc, c = e - j * nc;
    dkb[j * sdk.n + c * sdk.d] = static_cast<scalar_t>(dks[j * ldc + c]);
    dvb[j * sdv.n + c * sdv.d] = static_cast<scalar_t>(dvs[j * ldc + c]);
  }
}

// ---------------------------------------------------------------------------------------
// Launch helpers.

enum class Pass { kForward, kDq, kDkDv };

const char* pass_name(Pass pass) {
  return pass == Pass::kForward ? "forward" : pass == Pass::kDq ? "dQ backward" : "dK/dV backward";
}

// Tile sizes of one launch: keys per key tile (at most one per lane) and the width of the
// dK/dV column block (d in the forward and dQ passes).
struct Tiling {
  int keys, cols;
  size_t per_warp_bytes;
};

size_t per_warp_bytes(Pass pass, int64_t d, int keys, int cols, size_t word) {
  const int64_t words = pass == Pass::kForward ? forward_smem_per_warp(d, keys)
                        : pass == Pass::kDq    ? dq_smem_per_warp(d, keys)
                                               : dkdv_smem_per_warp(d, keys, cols);
  return static_cast<size_t>(words) * word;
}

// The largest tiles whose one warp task fits `limit` bytes of shared memory: full 32-key tiles
// and full-width dK/dV blocks where they fit (every CUDA GPU since sm_70 up to d = 128 in
// float32); narrower column blocks first (they repeat the two dot products per score, 1.5x the
// work at half width), then fewer keys per tile (idle lanes, 2x the work at half the keys).
// Zero keys when nothing fits.
Tiling choose_tiling(Pass pass, int64_t d, size_t word, size_t limit) {
  const int width = static_cast<int>(d);
  for (int keys = kLanes; keys >= 8; keys /= 2) {
    for (int split = 1; split <= (pass == Pass::kDkDv ? 4 : 1); split *= 2) {
      const int cols = (width + split - 1) / split;
      const size_t bytes = per_warp_bytes(pass, d, keys, cols, word);
      if (bytes <= limit) return {keys, cols, bytes};
    }
  }
  return {0, 0, 0};
}

// Shared memory a block may use: the opt-in maximum on CUDA (99 KB on sm_86/89, 163 KB on
// sm_80, 227 KB on sm_90); on ROCm the 64 KB of LDS per workgroup, which has no opt-in beyond
// the default.
size_t shared_memory_limit() {
  const auto* props = at::cuda::getCurrentDeviceProperties();
#if defined(USE_ROCM)
  return props->sharedMemPerBlock;
#else
  return std::max(props->sharedMemPerBlockOptin, props->sharedMemPerBlock);
#endif
}

struct LaunchConfig {
  Tiling tiling;
  int warps;
  size_t smem;
};

// The tiles for this device, and as many warp tasks per block (up to kMaxWarps) as its shared
// memory holds; opts the kernel in to more than the default per-block amount where needed.
template <typename Kernel>
LaunchConfig launch_config(Kernel kernel, Pass pass, int64_t d, size_t word, at::ScalarType dtype) {
  const size_t limit = shared_memory_limit();
  const Tiling tiling = choose_tiling(pass, d, word, limit);
  if (tiling.keys == 0) {
    int64_t fits = d;
    while (fits > 1 && choose_tiling(pass, fits, word, limit).keys == 0) --fits;
    TORCH_CHECK(false, "stt::_attention (cuda): the ", pass_name(pass), " pass needs ",
                per_warp_bytes(pass, d, 8, static_cast<int>((d + 3) / 4), word),
                " bytes of shared memory per block for head dim ", d, " in ", dtype, ", even with its smallest tiles; ",
                "this GPU allows ", limit, ", enough for head dims up to ", fits);
  }
  const int warps = static_cast<int>(std::min<size_t>(kMaxWarps, limit / tiling.per_warp_bytes));
  const size_t smem = warps * tiling.per_warp_bytes;
  if (smem > at::cuda::getCurrentDeviceProperties()->sharedMemPerBlock) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  return {tiling, warps, smem};
}

unsigned int grid_blocks(int64_t tasks, int warps) {
  const int64_t blocks = (tasks + warps - 1) / warps;
  TORCH_CHECK(blocks <= INT_MAX, "stt::_attention (cuda): ", tasks, " warp tasks exceed one launch grid");
  return static_cast<unsigned int>(blocks);
}

Geometry geometry(const at::Tensor& q) { return {q.size(0), q.size(1), q.size(2), q.size(3), q.size(4)}; }

bool empty_problem(const at::Tensor& q) { return q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0 || q.size(3) == 0; }

// Query-row tasks (forward, dQ): short sequences, a single key tile, take one task per
// sequence so that the tile is loaded once for all its rows.
struct RowTasks {
  int64_t rows_per_task, tasks_per_seq, tasks;
};

RowTasks row_tasks(const Geometry& g, int keys) {
  const int64_t rows_per_task = g.N <= keys ? g.N : rows_for(chunks_for(g.D));
  const int64_t tasks_per_seq = (g.N + rows_per_task - 1) / rows_per_task;
  return {rows_per_task, tasks_per_seq, g.B * g.Z * g.H * tasks_per_seq};
}

void check_head_dim(const at::Tensor& q) {
  TORCH_CHECK(q.size(4) <= kMaxChunks * kLanes, "stt::_attention (cuda): head dim d must be <= ", kMaxChunks * kLanes,
              "; got ", q.size(4));
}

// Calls f with the chunk count of head dim d as a compile-time constant (the forward and dQ
// kernels' template argument): one instance per register shape, not per d.
template <typename F>
void with_chunks(int64_t d, F&& f) {
  if (chunks_for(d) == 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, kMaxChunks>{});
  }
}

void attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& lse, double scale) {
  check_attention_forward(q, k, v, out, lse, scale, c10::DeviceType::CUDA);
  check_head_dim(q);
  if (empty_problem(q)) return;
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const Geometry g = geometry(q);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "stt_attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_chunks(g.D, [&](auto chunks) {
      auto kernel = attention_forward_kernel<scalar_t, acc_t, decltype(chunks)::value>;
      const LaunchConfig cfg = launch_config(kernel, Pass::kForward, g.D, sizeof(acc_t), q.scalar_type());
      const RowTasks rt = row_tasks(g, cfg.tiling.keys);
      kernel<<<grid_blocks(rt.tasks, cfg.warps), cfg.warps * kLanes, cfg.smem, at::cuda::getCurrentCUDAStream()>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          lse.data_ptr<acc_t>(), strides5(q), strides5(k), strides5(v), strides5(out), strides4(lse), g,
          cfg.tiling.keys, rt.rows_per_task, rt.tasks_per_seq, rt.tasks, static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void attention_backward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& grad_out, const at::Tensor& lse, double scale, const at::Tensor& grad_q,
                             const at::Tensor& grad_k, const at::Tensor& grad_v) {
  check_attention_backward(q, k, v, out, grad_out, lse, scale, grad_q, grad_k, grad_v, c10::DeviceType::CUDA);
  check_head_dim(q);
  if (empty_problem(q)) return;
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const Geometry g = geometry(q);
  const auto acc_type = at::toOpMathType(q.scalar_type());
  // D_i = rowsum(dO_i * O_i), (B, Z, N, heads) viewed as (B, Z, heads, N).
  const at::Tensor delta = (out.to(acc_type) * grad_out.to(acc_type)).sum(-1).transpose(2, 3);
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "stt_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_chunks(g.D, [&](auto chunks) {
      auto dq_kernel = attention_backward_dq_kernel<scalar_t, acc_t, decltype(chunks)::value>;
      const LaunchConfig dq_cfg = launch_config(dq_kernel, Pass::kDq, g.D, sizeof(acc_t), q.scalar_type());
      const RowTasks rt = row_tasks(g, dq_cfg.tiling.keys);
      dq_kernel<<<grid_blocks(rt.tasks, dq_cfg.warps), dq_cfg.warps * kLanes, dq_cfg.smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
          lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), grad_q.data_ptr<scalar_t>(), strides5(q), strides5(k),
          strides5(v), strides5(grad_out), strides4(lse), strides4(delta), strides5(grad_q), g, dq_cfg.tiling.keys,
          rt.rows_per_task, rt.tasks_per_seq, rt.tasks, static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    auto dkdv_kernel = attention_backward_dkdv_kernel<scalar_t, acc_t>;
    const LaunchConfig cfg = launch_config(dkdv_kernel, Pass::kDkDv, g.D, sizeof(acc_t), q.scalar_type());
    const int64_t k_tiles = (g.N + cfg.tiling.keys - 1) / cfg.tiling.keys;
    const int64_t col_blocks = (g.D + cfg.tiling.cols - 1) / cfg.tiling.cols;
    const int64_t tasks = g.B * g.Z * g.H * k_tiles * col_blocks;
    dkdv_kernel<<<grid_blocks(tasks, cfg.warps), cfg.warps * kLanes, cfg.smem, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
        lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(),
        strides5(q), strides5(k), strides5(v), strides5(grad_out), strides4(lse), strides4(delta), strides5(grad_k),
        strides5(grad_v), g, cfg.tiling.keys, cfg.tiling.cols, k_tiles, col_blocks, tasks, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace stt

TORCH_LIBRARY_IMPL(stt, CUDA, m) {
  m.impl("_attention_forward", &stt::attention_forward_cuda);
  m.impl("_attention_backward", &stt::attention_backward_cuda);
}
