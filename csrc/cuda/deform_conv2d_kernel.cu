// Modulated deformable convolution on CUDA (schemas in ../deform_conv2d.cpp; hipified for ROCm).
//
// A sampling kernel fills the columns of one chunk of the batch (row c * K + k, column
// b * np + j for image n0 + b and pixel p0 + j) and cuBLAS multiplies them by the weight. A chunk
// is a run of whole images, or pixel tiles of one image when an image alone exceeds the budget,
// so the full C*K x N*Ho*Wo column matrix never exists. Backward: grad columns = W^T grad_out,
// then one kernel turns them into grad_offset and grad_mask (the sampling derivative, summed over
// the group's channels by one thread) and scatters grad_x with atomics; it also rewrites the
// sampled columns, from which cuBLAS forms the weight gradient. Arithmetic in at::opmath_type
// (float for half/bfloat16, float32 atomics into a float buffer).
// Determinism: grad_offset and grad_mask are each written by one thread, and grad_weight is
// the sum of one cuBLAS product per chunk added in chunk order (fixed-order sums); grad_x's
// scatter by atomics is the one run-dependent sum, so under
// torch.use_deterministic_algorithms(True) the backward raises (stt_kernels/backend.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "stt/deform_conv2d.h"

namespace stt {
namespace {

constexpr int kThreads = 256;
// Elements of one chunk's column buffer (the backward holds two, plus grad_out's chunk).
constexpr int64_t kColumnBudget = int64_t{1} << 24;

template <typename T>
struct ChunkInputs {
  const T* x;
  int64_t sx_n, sx_c, sx_h, sx_w;
  const T* offset;         // contiguous (N, 2 * G * K, Ho * Wo)
  const T* mask;           // contiguous (N, G * K, Ho * Wo), or null
  int64_t n0, p0, nb, np;  // images [n0, n0 + nb), pixels [p0, p0 + np)
};

unsigned int blocks_for(int64_t work) {
  // Grid-stride loops below: the grid is capped well inside grid.x's limit.
  return static_cast<unsigned int>(std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// One thread per (offset group, tap, column): the point is resolved once for the group's channels.
template <typename T>
__global__ void sample_columns_kernel(DeformGeometry g, ChunkInputs<T> in, T* __restrict__ cols) {
  using A = at::opmath_type<T>;
  const int64_t ncols = in.nb * in.np;
  const int64_t work = g.groups * g.taps * ncols;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < work;
       index += int64_t{blockDim.x} * gridDim.x) {
    const int64_t q = index % ncols, k = (index / ncols) % g.taps, grp = index / (ncols * g.taps);
    const int64_t n = in.n0 + q / in.np, p = in.p0 + q % in.np;
    const DeformTap<A> t = deform_tap<A>(g, in.offset, in.mask, in.sx_h, in.sx_w, n, grp, k, p);
    const T* plane = in.x + n * in.sx_n + grp * g.c_per_group * in.sx_c;
    T* dst = cols + (grp * g.c_per_group * g.taps + k) * ncols + q;
    for (int64_t c = 0; c < g.c_per_group; ++c, plane += in.sx_c, dst += g.taps * ncols) {
      *dst = static_cast<T>(t.mask * bilinear_value(plane, t.point));
    }
  }
}

// One thread per (offset group, tap, column), over the group's channels: grad_offset and
// grad_mask of its tap, atomics into grad_x (type A, x's strides), and the masked samples
// rewritten into cols for the weight gradient.
template <typename T>
__global__ void backward_columns_kernel(DeformGeometry g, ChunkInputs<T> in, const T* __restrict__ grad_cols,
                                        T* __restrict__ cols, at::opmath_type<T>* __restrict__ grad_x,
                                        T* __restrict__ grad_offset, T* __restrict__ grad_mask) {
  using A = at::opmath_type<T>;
  const int64_t ncols = in.nb * in.np;
  const int64_t work = g.groups * g.taps * ncols;
  for (int64_t index = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; index < work;
       index += int64_t{blockDim.x} * gridDim.x) {
    const int64_t q = index % ncols, k = (index / ncols) % g.taps, grp = index / (ncols * g.taps);
    const int64_t n = in.n0 + q / in.np, p = in.p0 + q % in.np;
    const DeformTap<A> t = deform_tap<A>(g, in.offset, in.mask, in.sx_h, in.sx_w, n, grp, k, p);
    const int64_t plane0 = n * in.sx_n + grp * g.c_per_group * in.sx_c;
    const int64_t row0 = (grp * g.c_per_group * g.taps + k) * ncols + q;
    A d_value = 0, d_y = 0, d_x = 0;
    for (int64_t c = 0; c < g.c_per_group; ++c) {
      const int64_t plane = plane0 + c * in.sx_c, row = row0 + c * g.taps * ncols;
      const BilinearSample<A> s = bilinear_sample(in.x + plane, t.point);
      const A gc = static_cast<A>(grad_cols[row]);
      d_value += gc * s.value;
      d_y += gc * s.dy;
      d_x += gc * s.dx;
      cols[row] = static_cast<T>(t.mask * s.value);
      const A scaled = gc * t.mask;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (t.point.valid[i]) gpuAtomicAdd(grad_x + plane + t.point.offset[i], scaled * t.point.weight[i]);
      }
    }
    const int64_t channel = grp * g.taps + k;
    T* go = grad_offset + (n * 2 * g.groups * g.taps + 2 * channel) * g.pixels() + p;
    go[0] = static_cast<T>(d_y * t.mask);
    go[g.pixels()] = static_cast<T>(d_x * t.mask);
    if (grad_mask) grad_mask[(n * g.groups * g.taps + channel) * g.pixels() + p] = static_cast<T>(d_value);
  }
}

// The kernels read x with its own strides when it is dense (NCHW or channels-last).
at::Tensor dense_input(const at::Tensor& x) {
  return x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
}

void check_inputs(const at::Tensor& x, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                  const at::Tensor& weight) {
  TORCH_CHECK(x.is_cuda() && offset.is_cuda() && weight.is_cuda() && (!mask.has_value() || mask->is_cuda()),
              "deform_conv2d (cuda): every tensor must be on the GPU");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "deform_conv2d (cuda) supports float32, float16, bfloat16 and float64; got ", dtype);
  TORCH_CHECK(offset.scalar_type() == dtype && weight.scalar_type() == dtype &&
                  (!mask.has_value() || mask->scalar_type() == dtype),
              "deform_conv2d (cuda): x, offset, mask and weight must have the same dtype");
}

// The chunks of the batch: whole images while they fit the column budget, else pixel tiles.
template <typename F>
void for_each_chunk(const DeformGeometry& g, F&& body) {
  const int64_t rows = g.c * g.taps, pixels = g.pixels();
  if (rows * pixels <= kColumnBudget) {
    const int64_t nb = std::max<int64_t>(1, kColumnBudget / (rows * pixels));
    for (int64_t n0 = 0; n0 < g.n; n0 += nb) body(n0, std::min<int64_t>(nb, g.n - n0), int64_t{0}, pixels);
  } else {
    const int64_t np = std::max<int64_t>(1, kColumnBudget / rows);
    for (int64_t n0 = 0; n0 < g.n; ++n0) {
      for (int64_t p0 = 0; p0 < pixels; p0 += np) body(n0, int64_t{1}, p0, std::min<int64_t>(np, pixels - p0));
    }
  }
}

// grad_out or out of one chunk and weight group, as (out_per_wgroup, nb, np): a strided view.
at::Tensor chunk_view(const at::Tensor& t, const DeformGeometry& g, int64_t wg, int64_t n0, int64_t nb, int64_t p0,
                      int64_t np) {
  return t.view({g.n, g.c_out, g.pixels()})
      .narrow(0, n0, nb)
      .narrow(1, wg * g.out_per_wgroup, g.out_per_wgroup)
      .narrow(2, p0, np)
      .permute({1, 0, 2});
}

template <typename T>
ChunkInputs<T> chunk_inputs(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& mask, int64_t n0,
                            int64_t nb, int64_t p0, int64_t np) {
  return {x.const_data_ptr<T>(),
          x.stride(0),
          x.stride(1),
          x.stride(2),
          x.stride(3),
          offset.const_data_ptr<T>(),
          mask.defined() ? mask.const_data_ptr<T>() : nullptr,
          n0,
          p0,
          nb,
          np};
}

at::Tensor deform_conv2d_forward_cuda(const at::Tensor& x_in, const at::Tensor& offset_in,
                                      const std::optional<at::Tensor>& mask_in, const at::Tensor& weight_in,
                                      const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w,
                                      int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t offset_groups,
                                      int64_t weight_groups) {
  check_inputs(x_in, offset_in, mask_in, weight_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const DeformGeometry g = deform_geometry(x_in, offset_in, weight_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                           offset_groups, weight_groups);
  const at::Tensor x = dense_input(x_in), offset = offset_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const at::Tensor weight = weight_in.contiguous().view({g.weight_groups, g.out_per_wgroup, g.wcols()});
  at::Tensor out = at::empty({g.n, g.c_out, g.ho, g.wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor buffer;
  for_each_chunk(g, [&](int64_t n0, int64_t nb, int64_t p0, int64_t np) {
    const int64_t ncols = nb * np;
    if (!buffer.defined()) buffer = at::empty({g.c * g.taps * ncols}, x.options());
    at::Tensor cols = buffer.narrow(0, 0, g.c * g.taps * ncols).view({g.weight_groups, g.wcols(), ncols});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "deform_conv2d_forward_cuda", [&] {
      sample_columns_kernel<scalar_t><<<blocks_for(g.groups * g.taps * ncols), kThreads, 0, stream>>>(
          g, chunk_inputs<scalar_t>(x, offset, mask, n0, nb, p0, np), cols.mutable_data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t wg = 0; wg < g.weight_groups; ++wg) {
      chunk_view(out, g, wg, n0, nb, p0, np).copy_(at::mm(weight[wg], cols[wg]).view({g.out_per_wgroup, nb, np}));
    }
  });
  if (bias.has_value()) out.add_(bias->view({1, g.c_out, 1, 1}));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& offset_in,
    const std::optional<at::Tensor>& mask_in, const at::Tensor& weight_in, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t offset_groups, int64_t weight_groups) {
  check_inputs(x_in, offset_in, mask_in, weight_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const DeformGeometry g = deform_geometry(x_in, offset_in, weight_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                           offset_groups, weight_groups);
  const at::Tensor x = dense_input(x_in), offset = offset_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const at::Tensor weight = weight_in.contiguous().view({g.weight_groups, g.out_per_wgroup, g.wcols()});
  const at::Tensor grad_out = grad_out_in.contiguous();
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.n, g.c_out, g.ho, g.wo}),
              "deform_conv2d backward: grad_out has the wrong shape");
  const auto acc_type = at::toOpMathType(x.scalar_type());
  // x's strides (preserved by zeros_like on a dense tensor), so one corner offset serves both.
  at::Tensor grad_x_acc = at::zeros_like(x, x.options().dtype(acc_type));
  TORCH_INTERNAL_ASSERT(grad_x_acc.strides() == x.strides());
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = mask.defined() ? at::empty_like(mask) : at::empty({0}, x.options());
  at::Tensor grad_weight_acc = at::zeros({g.weight_groups, g.out_per_wgroup, g.wcols()}, x.options().dtype(acc_type));
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor cols_buffer, grad_cols_buffer;
  for_each_chunk(g, [&](int64_t n0, int64_t nb, int64_t p0, int64_t np) {
    const int64_t ncols = nb * np;
    if (!cols_buffer.defined()) {
      cols_buffer = at::empty({g.c * g.taps * ncols}, x.options());
      grad_cols_buffer = at::empty({g.c * g.taps * ncols}, x.options());
    }
    at::Tensor cols = cols_buffer.narrow(0, 0, g.c * g.taps * ncols).view({g.weight_groups, g.wcols(), ncols});
    at::Tensor grad_cols =
        grad_cols_buffer.narrow(0, 0, g.c * g.taps * ncols).view({g.weight_groups, g.wcols(), ncols});
    std::vector<at::Tensor> grad_out_chunks;
    for (int64_t wg = 0; wg < g.weight_groups; ++wg) {
      grad_out_chunks.push_back(chunk_view(grad_out, g, wg, n0, nb, p0, np).reshape({g.out_per_wgroup, ncols}));
      at::Tensor grad_cols_wg = grad_cols[wg];
      at::mm_out(grad_cols_wg, weight[wg].t(), grad_out_chunks.back());
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "deform_conv2d_backward_cuda", [&] {
      backward_columns_kernel<scalar_t><<<blocks_for(g.groups * g.taps * ncols), kThreads, 0, stream>>>(
          g, chunk_inputs<scalar_t>(x, offset, mask, n0, nb, p0, np), grad_cols.const_data_ptr<scalar_t>(),
          cols.mutable_data_ptr<scalar_t>(), grad_x_acc.mutable_data_ptr<at::opmath_type<scalar_t>>(),
          grad_offset.mutable_data_ptr<scalar_t>(), mask.defined() ? grad_mask.mutable_data_ptr<scalar_t>() : nullptr);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t wg = 0; wg < g.weight_groups; ++wg) {
      grad_weight_acc[wg].add_(at::mm(grad_out_chunks[wg], cols[wg].t()));
    }
  });
  at::Tensor grad_x = grad_x_acc.to(x.scalar_type());
  at::Tensor grad_weight = grad_weight_acc.to(x.scalar_type()).view(weight_in.sizes());
  return {grad_x, grad_offset, grad_mask, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(stt, CUDA, m) {
  m.impl("_deform_conv2d_forward", &deform_conv2d_forward_cuda);
  m.impl("_deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace stt
