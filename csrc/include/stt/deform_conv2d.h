// Shapes and sampling points of the deformable convolution, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "stt/bilinear.h"

namespace stt {

// Trivially copyable: passed by value to the CUDA kernels.
struct DeformGeometry {
  int64_t n, c, h, w, c_out, ho, wo, kh, kw, taps;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups, weight_groups;
  int64_t c_per_group, c_per_wgroup, out_per_wgroup;
  STT_HOST_DEVICE int64_t pixels() const { return ho * wo; }
  STT_HOST_DEVICE int64_t wcols() const { return c_per_wgroup * taps; }  // columns of one weight group's matrix
};

inline DeformGeometry deform_geometry(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& weight,
                                      int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                      int64_t dil_w, int64_t offset_groups, int64_t weight_groups) {
  TORCH_CHECK(x.dim() == 4 && offset.dim() == 4 && weight.dim() == 4,
              "deform_conv2d: x, offset and weight must be 4-d");
  TORCH_CHECK(offset_groups >= 1 && weight_groups >= 1, "deform_conv2d: groups must be positive");
  DeformGeometry g;
  g.n = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.c_out = weight.size(0), g.kh = weight.size(2), g.kw = weight.size(3), g.taps = g.kh * g.kw;
  g.ho = offset.size(2), g.wo = offset.size(3);
  g.stride_h = stride_h, g.stride_w = stride_w, g.pad_h = pad_h, g.pad_w = pad_w, g.dil_h = dil_h, g.dil_w = dil_w;
  g.groups = offset_groups, g.weight_groups = weight_groups;
  TORCH_CHECK(g.c % offset_groups == 0 && g.c % weight_groups == 0 && g.c_out % weight_groups == 0,
              "deform_conv2d: the groups must divide the channels");
  g.c_per_group = g.c / offset_groups, g.c_per_wgroup = g.c / weight_groups;
  g.out_per_wgroup = g.c_out / weight_groups;
  TORCH_CHECK(weight.size(1) == g.c_per_wgroup, "deform_conv2d: weight.size(1) must be C / weight_groups");
  TORCH_CHECK(offset.size(0) == g.n && offset.size(1) == 2 * offset_groups * g.taps,
              "deform_conv2d: offset must be (N, 2 * G * Kh * Kw, Ho, Wo)");
  return g;
}

template <typename A>
struct DeformTap {
  BilinearPoint<A> point;
  A mask;
};

// Tap k of output pixel p (flat index) of image n in offset group grp: its sampling point, read
// from the contiguous offset (N, 2 * G * K, Ho * Wo), and its mask (1 when mask is null), in the
// accumulation type A. sx_h, sx_w: the strides of x's rows and columns.
template <typename A, typename T>
STT_HOST_DEVICE DeformTap<A> deform_tap(const DeformGeometry& g, const T* offset, const T* mask, int64_t sx_h,
                                        int64_t sx_w, int64_t n, int64_t grp, int64_t k, int64_t p) {
  const int64_t oy = p / g.wo, ox = p % g.wo;
  const int64_t channel = grp * g.taps + k;
  const T* off = offset + (n * 2 * g.groups * g.taps + 2 * channel) * g.pixels() + p;
  const A y = A(oy * g.stride_h - g.pad_h + (k / g.kw) * g.dil_h) + static_cast<A>(off[0]);
  const A x = A(ox * g.stride_w - g.pad_w + (k % g.kw) * g.dil_w) + static_cast<A>(off[g.pixels()]);
  const A m = mask ? static_cast<A>(mask[(n * g.groups * g.taps + channel) * g.pixels() + p]) : A(1);
  return {bilinear_point<A>(y, x, g.h, g.w, sx_h, sx_w), m};
}

}  // namespace stt
