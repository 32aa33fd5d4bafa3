// Bilinear sampling with torchvision's zero rule, and its derivatives, shared by the CPU and
// CUDA deformable-convolution kernels so that the CPU tests exercise the GPU's arithmetic.
//
// A point (y, x) of an H x W plane takes the value of its four neighbours (y0, x0), (y0, x0 + 1),
// (y0 + 1, x0), (y0 + 1, x0 + 1), y0 = floor(y), x0 = floor(x), weighted bilinearly; a neighbour
// outside the plane counts as zero (it is never read, so a NaN in the plane reaches only the
// points whose in-plane corners it is), so a point with y <= -1, y >= H, x <= -1 or x >= W, or an
// infinite coordinate, samples zero. A point with a NaN coordinate reads no corner and samples NaN,
// and so do its derivatives: every weight is NaN. The derivatives follow the same corners, as
// torchvision's do: at y == -1 exactly (the top taps of a padded convolution with zero offsets)
// the sample is zero but its derivative in y is the row below. Corner order everywhere: 00, 01,
// 10, 11 (row, column). The rule is stt_kernels/reference/deform_conv2d.py's.
#pragma once

#include <cmath>
#include <cstdint>

#include "stt/macros.h"

namespace stt {

STT_HOST_DEVICE float floor_of(float v) { return floorf(v); }
STT_HOST_DEVICE double floor_of(double v) { return floor(v); }

// One sampling point, resolved once and then applied to every channel of its offset group.
// A corner outside the plane has offset 0 (a safe address, never read for its value), every
// weight 0 (NaN for a NaN point) and valid[i] false: reads take it as zero and scatters skip it.
template <typename T>
struct BilinearPoint {
  int64_t offset[4];  // element offsets of the corners within the plane: row * stride_y + col * stride_x
  T weight[4];        // d(sample)/d(corner value): the bilinear weights
  T weight_dy[4];     // d(weight)/dy, so that d(sample)/dy = sum_i weight_dy[i] * corner[i]
  T weight_dx[4];     // d(weight)/dx
  bool valid[4];
};

template <typename T>
STT_HOST_DEVICE BilinearPoint<T> bilinear_point(T y, T x, int64_t height, int64_t width, int64_t stride_y,
                                                int64_t stride_x) {
  BilinearPoint<T> p;
  // Beyond one pixel past the border every corner is outside: return before floor() can
  // overflow the integers. Written as a negation so that NaN coordinates take this branch too;
  // y + x is then NaN, and as every weight it makes the sample and its derivatives NaN.
  if (!(y > T(-2) && y < T(height + 1) && x > T(-2) && x < T(width + 1))) {
    const bool undefined = y != y || x != x;
    const T w = undefined ? y + x : T(0);
    for (int i = 0; i < 4; ++i) {
      p.offset[i] = 0;
      p.weight[i] = p.weight_dy[i] = p.weight_dx[i] = w;
      p.valid[i] = false;
    }
    return p;
  }
  const T y0f = floor_of(y), x0f = floor_of(x);
  const int64_t y0 = static_cast<int64_t>(y0f), x0 = static_cast<int64_t>(x0f);
  const T fy = y - y0f, fx = x - x0f;
  const T gy = T(1) - fy, gx = T(1) - fx;
  const bool row_ok[2] = {y0 >= 0 && y0 < height, y0 + 1 >= 0 && y0 + 1 < height};
  const bool col_ok[2] = {x0 >= 0 && x0 < width, x0 + 1 >= 0 && x0 + 1 < width};
  const T wy[2] = {gy, fy}, wx[2] = {gx, fx};
  const T dwy[2] = {T(-1), T(1)};
  for (int r = 0; r < 2; ++r) {
    for (int c = 0; c < 2; ++c) {
      const int i = 2 * r + c;
      const bool ok = row_ok[r] && col_ok[c];
      p.valid[i] = ok;
      p.offset[i] = ok ? (y0 + r) * stride_y + (x0 + c) * stride_x : 0;
      p.weight[i] = ok ? wy[r] * wx[c] : T(0);
      p.weight_dy[i] = ok ? dwy[r] * wx[c] : T(0);
      p.weight_dx[i] = ok ? wy[r] * dwy[c] : T(0);
    }
  }
  return p;
}

// The sample of one plane, and its derivatives with respect to the point, in the accumulation
// type A (float for half/bfloat16 inputs).
template <typename A>
struct BilinearSample {
  A value, dy, dx;
};

// Corner i of the point in the plane: its value, or zero outside the plane.
template <typename A, typename T>
STT_HOST_DEVICE A bilinear_corner(const T* plane, const BilinearPoint<A>& p, int i) {
  return p.valid[i] ? static_cast<A>(plane[p.offset[i]]) : A(0);
}

template <typename A, typename T>
STT_HOST_DEVICE A bilinear_value(const T* plane, const BilinearPoint<A>& p) {
  A v = A(0);
  for (int i = 0; i < 4; ++i) v += p.weight[i] * bilinear_corner(plane, p, i);
  return v;
}

template <typename A, typename T>
STT_HOST_DEVICE BilinearSample<A> bilinear_sample(const T* plane, const BilinearPoint<A>& p) {
  BilinearSample<A> s{A(0), A(0), A(0)};
  for (int i = 0; i < 4; ++i) {
    const A corner = bilinear_corner(plane, p, i);
    s.value += p.weight[i] * corner;
    s.dy += p.weight_dy[i] * corner;
    s.dx += p.weight_dx[i] * corner;
  }
  return s;
}

}  // namespace stt
