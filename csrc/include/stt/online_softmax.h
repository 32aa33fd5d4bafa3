// Online-softmax arithmetic of the flash-style attention kernels, shared by the CPU and the
// CUDA/HIP code so that both normalise, rescale and report log-sum-exp the same way.
//
// A query row keeps a running maximum m and a running sum l = sum_j exp(s_j - m) over the
// key blocks seen so far; its output accumulator is kept scaled by exp(-m). After all keys,
// out = acc / l and lse = m + log(l), which is what the backward needs to recompute
// P = exp(s - lse) without a second pass over the keys.
#pragma once

#include <cmath>
#include <limits>

#include "stt/macros.h"

namespace stt {

template <typename T>
STT_HOST_DEVICE T softmax_exp(T x) {
  using std::exp;
  return exp(x);
}

#if defined(__CUDACC__) || defined(__HIPCC__)
// __expf is one SFU instruction; its relative error (~2 ulp near 0, where all probabilities
// land after max subtraction) is far below what float32 accumulation adds anyway.
template <>
STT_HOST_DEVICE float softmax_exp<float>(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}
#endif

template <typename T>
STT_HOST_DEVICE T softmax_log(T x) {
  using std::log;
  return log(x);
}

template <typename T>
struct OnlineSoftmaxRow {
  T max;  // running maximum of the scaled scores seen so far (-inf before any)
  T sum;  // sum of exp(score - max) over them
};

template <typename T>
STT_HOST_DEVICE OnlineSoftmaxRow<T> online_softmax_init() {
  return {-std::numeric_limits<T>::infinity(), T(0)};
}

// exp(old_max - new_max): the factor that moves the sum and the output accumulator of a row
// onto a new maximum. The first block (old_max = -inf, nothing accumulated yet) gives 0
// without calling exp: short sequences are a single block, where that call per row would
// be pure overhead.
template <typename T>
STT_HOST_DEVICE T online_softmax_rescale(T old_max, T new_max) {
  if (old_max == new_max) return T(1);
  if (old_max == -std::numeric_limits<T>::infinity()) return T(0);
  return softmax_exp<T>(old_max - new_max);
}

// The maximum a row moves to when a block whose largest score is block_max arrives.
template <typename T>
STT_HOST_DEVICE T online_softmax_new_max(const OnlineSoftmaxRow<T>& row, T block_max) {
  return row.max > block_max ? row.max : block_max;
}

// Folds in a block: block_sum = sum_j exp(s_j - new_max) over its scores. Returns the factor
// by which the caller must rescale the row's output accumulator.
template <typename T>
STT_HOST_DEVICE T online_softmax_update(OnlineSoftmaxRow<T>& row, T new_max, T block_sum) {
  const T alpha = online_softmax_rescale<T>(row.max, new_max);
  row.sum = row.sum * alpha + block_sum;
  row.max = new_max;
  return alpha;
}

// The factor that turns the accumulator into the softmax-weighted output.
template <typename T>
STT_HOST_DEVICE T online_softmax_inv_sum(const OnlineSoftmaxRow<T>& row) {
  return T(1) / row.sum;
}

// Natural-log log-sum-exp of the row's scaled scores.
template <typename T>
STT_HOST_DEVICE T online_softmax_lse(const OnlineSoftmaxRow<T>& row) {
  return row.max + softmax_log<T>(row.sum);
}

// Softmax probability of a score recomputed in the backward from the saved lse.
template <typename T>
STT_HOST_DEVICE T softmax_prob_from_lse(T score, T lse) {
  return softmax_exp<T>(score - lse);
}

// dS = P * (dP - D), with D = rowsum(dO * O): the softmax backward of one score.
template <typename T>
STT_HOST_DEVICE T softmax_grad(T p, T dp, T delta) {
  return p * (dp - delta);
}

}  // namespace stt
