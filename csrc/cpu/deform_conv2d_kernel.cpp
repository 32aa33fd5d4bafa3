// Modulated deformable convolution on the CPU as an implicit GEMM (schemas in ../deform_conv2d.cpp).
//
// The C*K x Ho*Wo column matrix of im2col never exists: the output pixels are cut into tiles of
// P pixels, a thread samples one tile's C*K x P columns into a buffer small enough to stay in
// cache and multiplies it by the weight straight into the output. The forward samples a
// channels-last copy of x into pixel-major columns (see sample_tile); the backward's column rows
// are ordered c * K + k, the order of weight.view(C_out, C / weight_groups * K).
//
// Backward work items are (image, offset group): the item owns its slice of grad_x, grad_offset
// and grad_mask, so the scatter needs no atomics and the sums run in a fixed order. The weight
// gradient is summed per chunk of items, one chunk per thread, and the chunks are added in order:
// the result depends on the thread count, never on scheduling.
//
// float16 and bfloat16 inputs are read as they are and computed in float32 (at::opmath_type):
// sampling points, bilinear weights and columns are float32, the GEMMs are float32 products
// with float32 sums, and each output and gradient is rounded to the input's dtype once, at the
// end. Columns in bfloat16 would halve the buffers but round every sample before the GEMM, and
// at these sizes the GEMM is not where the time goes (the sampling is).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "stt/deform_conv2d.h"

namespace stt {
namespace {

using Geometry = DeformGeometry;

// x as the kernels read it: its own strides when dense (NCHW or channels-last: no copy),
// a contiguous copy otherwise.
at::Tensor dense_input(const at::Tensor& x) {
  at::Tensor dense = x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
  // The point tables hold corner offsets within a channel plane as 32-bit integers.
  TORCH_CHECK((dense.size(2) - 1) * dense.stride(2) + (dense.size(3) - 1) * dense.stride(3) <
                  std::numeric_limits<int32_t>::max(),
              "deform_conv2d on the CPU: the input planes are too large (more than 2**31 elements)");
  return dense;
}

// Pixels per tile: the tile's column buffer (rows x P) is kept near 512 KiB, within L2 (1 MiB
// on Zen 4). Wider tiles make wider GEMMs: at 32 channels, 3 x 3, 128 KiB (112 pixels) measured
// a few per cent slower than 448 pixels, near the noise of a shared Zen 4 core.
int64_t tile_pixels(int64_t rows, int64_t pixels, int64_t element_size) {
  const int64_t budget = (int64_t{512} << 10) / element_size;
  const int64_t p = std::max<int64_t>(64, budget / std::max<int64_t>(rows, 1) / 16 * 16);
  return std::min(p, pixels);
}

// C (m x n, row stride ldc) = beta * C + op(A) @ op(B), with op(A) m x k and op(B) k x n given by a
// pointer and row stride of the stored matrix (transposed when ta / tb). Goes to the BLAS through
// addmm on views: no copies, and no dispatcher since at::cpu:: calls the CPU kernel directly.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
          double beta, T* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* data, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
    return transposed ? at::from_blob(const_cast<T*>(data), {rows, cols}, {1, ld}, options)
                      : at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::cpu::addmm_out(out, out, view(a, m, k, lda, ta), view(b, k, n, ldb, tb), beta, 1.0);
}

// T: the inputs' dtype; A: the dtype computed in (float for float16 and bfloat16), that of the
// weight as the GEMMs read it.
template <typename T, typename A>
struct Inputs {
  const T* x;
  int64_t sx_n, sx_c, sx_h, sx_w;
  const T* offset;  // contiguous (N, 2 * G * K, Ho * Wo)
  const T* mask;    // contiguous (N, G * K, Ho * Wo), or null
  const A* weight;  // contiguous (C_out, C / weight_groups * K)
};

template <typename T, typename A>
Inputs<T, A> inputs(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& weight) {
  return {x.const_data_ptr<T>(),
          x.stride(0),
          x.stride(1),
          x.stride(2),
          x.stride(3),
          offset.const_data_ptr<T>(),
          mask.defined() ? mask.const_data_ptr<T>() : nullptr,
          weight.const_data_ptr<A>()};
}

// The backward's sampling points of one tile of one offset group, resolved once for all the group's
// channels, indexed t = k * np + j: the same order as one channel's rows of the column tile,
// so the per-channel loops below walk the table and the columns in step, every stream sequential.
// valid[t] has bit i set when corner i is inside the plane: the others read as zero.
template <typename A>
struct PointTable {
  std::vector<int32_t> offset[4];
  std::vector<A> weight[4], weight_dy[4], weight_dx[4], mask;
  std::vector<uint8_t> valid;

  template <typename T>
  void fill(const Geometry& g, const Inputs<T, A>& in, int64_t n, int64_t grp, int64_t p0, int64_t np) {
    const int64_t size = g.taps * np;
    for (int i = 0; i < 4; ++i) {
      offset[i].resize(size);
      weight[i].resize(size), weight_dy[i].resize(size), weight_dx[i].resize(size);
    }
    mask.resize(size);
    valid.resize(size);
    for (int64_t k = 0; k < g.taps; ++k) {
      for (int64_t j = 0; j < np; ++j) {
        const int64_t t = k * np + j;
        const DeformTap<A> s = deform_tap<A, T>(g, in.offset, in.mask, in.sx_h, in.sx_w, n, grp, k, p0 + j);
        mask[t] = s.mask;
        valid[t] = 0;
        for (int i = 0; i < 4; ++i) {
          valid[t] |= s.point.valid[i] << i;
          offset[i][t] = static_cast<int32_t>(s.point.offset[i]);
          weight[i][t] = s.point.weight[i];
          weight_dy[i][t] = s.point.weight_dy[i], weight_dx[i][t] = s.point.weight_dx[i];
        }
      }
    }
  }
};

// The backward's channels go through its per-point loops B at a time, so that each table entry
// is loaded once for B channels: the loops are bound by loads, and their indexed reads stay
// scalar (compilers tuned for AMD Zen do not emit gathers).
constexpr int64_t kChannelBlock = 4;
constexpr uint8_t kAllCorners = 0xF;

// Corner `bit` of a point read from plane p at offset o: outside the plane it is zero, never the
// pixel at its safe address, so that a NaN there stays out of the points that do not sample it.
template <typename A, typename T>
inline A corner(const T* p, int32_t o, uint8_t valid, int bit) {
  return valid >> bit & 1 ? static_cast<A>(p[o]) : A(0);
}

// The backward of B channel planes over the table: scatters into their grad planes, writes the
// masked samples (for the weight gradient) into col and adds the channels' share of the mask
// and sampling-point gradients into the accumulators.
template <int B, typename T, typename A>
void backward_channels(int64_t count, const T* __restrict plane, A* __restrict grad_plane, int64_t plane_stride,
                       const A* __restrict grad_col, A* __restrict col, const PointTable<A>& table,
                       A* __restrict acc_value, A* __restrict acc_y, A* __restrict acc_x) {
  for (int64_t t = 0; t < count; ++t) {
    int32_t offset[4];
    A weight[4], weight_dy[4], weight_dx[4];
    for (int j = 0; j < 4; ++j) {
      offset[j] = table.offset[j][t];
      weight[j] = table.weight[j][t];
      weight_dy[j] = table.weight_dy[j][t];
      weight_dx[j] = table.weight_dx[j][t];
    }
    const A mask = table.mask[t];
    const uint8_t valid = table.valid[t];
    A sum_value = 0, sum_y = 0, sum_x = 0;
    for (int i = 0; i < B; ++i) {
      const T* p = plane + i * plane_stride;
      A value = 0, dy = 0, dx = 0;
      for (int j = 0; j < 4; ++j) {
        const A v = corner<A>(p, offset[j], valid, j);
        value += weight[j] * v;
        dy += weight_dy[j] * v;
        dx += weight_dx[j] * v;
      }
      const A gc = grad_col[i * count + t];
      sum_value += gc * value;
      sum_y += gc * dy;
      sum_x += gc * dx;
      col[i * count + t] = mask * value;
      const A scaled = gc * mask;
      A* gp = grad_plane + i * plane_stride;
      for (int j = 0; j < 4; ++j) {
        // Corners outside the image (offset 0 is only a safe address) and a NaN point's, which
        // reads no pixel, take no gradient; the others do even at weight 0, as autograd gives
        // them scaled * 0 (NaN when scaled is).
        if (valid >> j & 1) gp[offset[j]] += scaled * weight[j];
      }
    }
    acc_value[t] += sum_value;
    acc_y[t] += sum_y;
    acc_x[t] += sum_x;
  }
}

// The forward samples a channels-last x: the four corners of a point are runs of contiguous
// channels, so a point's samples of all its group's channels are vector loads and FMAs over c
// with the point's weights broadcast, rather than four scalar reads per channel.
//
// cols (np x C * K) = the masked samples of pixels [p0, p0 + np) of image n, row j the pixel,
// column wg * K * Cw + k * Cw + c' for channel c = wg * Cw + c' of weight group wg (Cw channels):
// each weight group's columns are one block, in the order of its weight reordered to
// (C_out, K, Cw). x is channels-last (sx_c == 1).
template <typename T, typename A>
void sample_tile(const Geometry& g, const Inputs<T, A>& in, int64_t n, int64_t p0, int64_t np, const A* zeros,
                 A* cols) {
  const int64_t rows = g.c * g.taps;
  const T* image = in.x + n * in.sx_n;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const int64_t c_begin = grp * g.c_per_group, c_end = c_begin + g.c_per_group;
    for (int64_t j = 0; j < np; ++j) {
      A* row = cols + j * rows;
      for (int64_t k = 0; k < g.taps; ++k) {
        // Each point is used right away by all its group's channels: no table to write and read back.
        const DeformTap<A> s = deform_tap<A, T>(g, in.offset, in.mask, in.sx_h, in.sx_w, n, grp, k, p0 + j);
        const BilinearPoint<A>& q = s.point;
        const A wa = q.weight[0] * s.mask, wb = q.weight[1] * s.mask, wc = q.weight[2] * s.mask,
                wd = q.weight[3] * s.mask;
        // A corner outside the plane reads zeros (weight 0, or NaN for a NaN point: NaN * 0 keeps
        // the point NaN), never a pixel, so a NaN there stays out of the points not sampling it.
        const bool oa = q.valid[0], ob = q.valid[1], oc = q.valid[2], od = q.valid[3];
        const bool all = oa && ob && oc && od;
        const T* pa = image + q.offset[0];
        const T* pb = image + q.offset[1];
        const T* pc = image + q.offset[2];
        const T* pd = image + q.offset[3];
        // The group's channels, split where a weight group ends: each piece is contiguous in x and in cols.
        for (int64_t lo = c_begin; lo < c_end;) {
          const int64_t wg = lo / g.c_per_wgroup;
          const int64_t hi = std::min(c_end, (wg + 1) * g.c_per_wgroup);
          A* __restrict dst = row + wg * g.wcols() + k * g.c_per_wgroup + (lo - wg * g.c_per_wgroup);
          const int64_t len = hi - lo;
          if (all) {
            const T* __restrict a = pa + lo, * __restrict b = pb + lo, * __restrict c = pc + lo, * __restrict d = pd + lo;
            for (int64_t i = 0; i < len; ++i) {
              dst[i] = wa * static_cast<A>(a[i]) + wb * static_cast<A>(b[i]) + wc * static_cast<A>(c[i]) +
                       wd * static_cast<A>(d[i]);
            }
          } else {
            for (int64_t i = 0; i < len; ++i) {
              const A va = oa ? static_cast<A>(pa[lo + i]) : zeros[i], vb = ob ? static_cast<A>(pb[lo + i]) : zeros[i];
              const A vc = oc ? static_cast<A>(pc[lo + i]) : zeros[i], vd = od ? static_cast<A>(pd[lo + i]) : zeros[i];
              dst[i] = wa * va + wb * vb + wc * vc + wd * vd;
            }
          }
          lo = hi;
        }
      }
    }
  }
}

// out is T; for T != A each weight group's output tile is computed in A in a buffer first.
// in: x channels-last, weight reordered to (C_out, K, C / weight_groups).
template <typename T, typename A>
void forward_kernel(const Geometry& g, const Inputs<T, A>& in, const A* bias, T* out) {
  constexpr bool kDirect = std::is_same_v<T, A>;
  const int64_t pixels = g.pixels();
  const int64_t rows = g.c * g.taps;
  const int64_t tile = tile_pixels(rows, pixels, sizeof(A));
  const int64_t tiles = (pixels + tile - 1) / tile;
  // Small problems stay on one thread: waking the pool costs more than they do.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (rows * tile));
  at::parallel_for(0, g.n * tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> cols(rows * tile), result(kDirect ? 0 : g.out_per_wgroup * tile), zeros(g.c, A(0));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, p0 = (item % tiles) * tile, np = std::min(tile, pixels - p0);
      sample_tile(g, in, n, p0, np, zeros.data(), cols.data());
      for (int64_t wg = 0; wg < g.weight_groups; ++wg) {
        T* dst = out + (n * g.c_out + wg * g.out_per_wgroup) * pixels + p0;
        A* acc;
        int64_t ld;
        if constexpr (kDirect) {
          acc = dst, ld = pixels;
        } else {
          acc = result.data(), ld = np;
        }
        if (bias) {
          for (int64_t o = 0; o < g.out_per_wgroup; ++o) {
            std::fill_n(acc + o * ld, np, bias[wg * g.out_per_wgroup + o]);
          }
        }
        gemm<A>(false, true, g.out_per_wgroup, np, g.wcols(), in.weight + wg * g.out_per_wgroup * g.wcols(), g.wcols(),
                cols.data() + wg * g.wcols(), rows, bias ? 1.0 : 0.0, acc, ld);
        if constexpr (!kDirect) {
          for (int64_t o = 0; o < g.out_per_wgroup; ++o) {
            std::transform(acc + o * ld, acc + o * ld + np, dst + o * pixels, [](A v) { return static_cast<T>(v); });
          }
        }
      }
    }
  });
}

// Per-thread buffers of the backward.
template <typename A>
struct Workspace {
  PointTable<A> table;
  std::vector<A> grad_cols, cols, acc_value, acc_y, acc_x;
};

// One (image, offset group) of the backward: grad_x of the group's channels, grad_offset and
// grad_mask of the group, and this item's share of grad_weight added into grad_weight_sum.
// grad_out and every gradient are in A.
template <typename T, typename A>
void backward_item(const Geometry& g, const Inputs<T, A>& in, const A* grad_out, int64_t n, int64_t grp, int64_t tile,
                   A* grad_x, A* grad_offset, A* grad_mask, A* grad_weight_sum, Workspace<A>& ws) {
  const int64_t pixels = g.pixels();
  const int64_t c_begin = grp * g.c_per_group, c_end = c_begin + g.c_per_group;
  ws.grad_cols.resize(g.c_per_group * g.taps * tile);
  ws.cols.resize(g.c_per_group * g.taps * tile);
  // The group's channels may span several weight groups: one GEMM per overlapping piece.
  auto for_each_piece = [&](auto&& body) {
    for (int64_t wg = c_begin / g.c_per_wgroup; wg * g.c_per_wgroup < c_end; ++wg) {
      body(wg, std::max(c_begin, wg * g.c_per_wgroup), std::min(c_end, (wg + 1) * g.c_per_wgroup));
    }
  };
  for (int64_t p0 = 0; p0 < pixels; p0 += tile) {
    const int64_t np = std::min(tile, pixels - p0), count = g.taps * np;
    // grad_cols (the group's C * K x np) = W^T grad_out tile.
    for_each_piece([&](int64_t wg, int64_t lo, int64_t hi) {
      gemm<A>(true, false, (hi - lo) * g.taps, np, g.out_per_wgroup,
              in.weight + wg * g.out_per_wgroup * g.wcols() + (lo - wg * g.c_per_wgroup) * g.taps, g.wcols(),
              grad_out + (n * g.c_out + wg * g.out_per_wgroup) * pixels + p0, pixels, 0.0,
              ws.grad_cols.data() + (lo - c_begin) * count, np);
    });
    ws.table.fill(g, in, n, grp, p0, np);
    ws.acc_value.assign(count, A(0));
    ws.acc_y.assign(count, A(0));
    ws.acc_x.assign(count, A(0));
    for (int64_t c = c_begin; c < c_end;) {
      const int64_t block = c + kChannelBlock <= c_end ? kChannelBlock : 1;
      const int64_t at = n * in.sx_n + c * in.sx_c, row = (c - c_begin) * count;
      (block == kChannelBlock ? backward_channels<kChannelBlock, T, A>
                              : backward_channels<1, T, A>)(count, in.x + at, grad_x + at, in.sx_c,
                                                            ws.grad_cols.data() + row, ws.cols.data() + row, ws.table,
                                                            ws.acc_value.data(), ws.acc_y.data(), ws.acc_x.data());
      c += block;
    }
    for (int64_t k = 0; k < g.taps; ++k) {
      const int64_t channel = grp * g.taps + k;
      A* go = grad_offset + (n * 2 * g.groups * g.taps + 2 * channel) * pixels + p0;
      for (int64_t j = 0; j < np; ++j) {
        const int64_t t = k * np + j;
        go[j] = ws.acc_y[t] * ws.table.mask[t];
        go[pixels + j] = ws.acc_x[t] * ws.table.mask[t];
      }
      if (grad_mask) {
        std::copy_n(ws.acc_value.data() + k * np, np, grad_mask + (n * g.groups * g.taps + channel) * pixels + p0);
      }
    }
    // grad_weight += grad_out tile @ cols^T.
    for_each_piece([&](int64_t wg, int64_t lo, int64_t hi) {
      gemm<A>(false, true, g.out_per_wgroup, (hi - lo) * g.taps, np,
              grad_out + (n * g.c_out + wg * g.out_per_wgroup) * pixels + p0, pixels,
              ws.cols.data() + (lo - c_begin) * count, np, 1.0,
              grad_weight_sum + wg * g.out_per_wgroup * g.wcols() + (lo - wg * g.c_per_wgroup) * g.taps, g.wcols());
    });
  }
}

// grad_out and every gradient (grad_weight too) in A.
template <typename T, typename A>
void backward_kernel(const Geometry& g, const Inputs<T, A>& in, const A* grad_out, A* grad_x, A* grad_offset,
                     A* grad_mask, at::Tensor& grad_weight) {
  // Two buffers of rows x P (gradient and sampled columns) share the cache budget.
  const int64_t tile = tile_pixels(2 * g.c_per_group * g.taps, g.pixels(), sizeof(A));
  const int64_t items = g.n * g.groups;
  const int64_t work = items * g.c_per_group * g.taps * g.pixels();
  const int64_t chunks =
      std::clamp<int64_t>(work / at::internal::GRAIN_SIZE, 1, std::min<int64_t>(items, at::get_num_threads()));
  at::Tensor partial = at::zeros({chunks, g.c_out, g.wcols()}, grad_weight.options());
  A* partial_data = partial.mutable_data_ptr<A>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    Workspace<A> ws;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      A* sum = partial_data + chunk * g.c_out * g.wcols();
      for (int64_t item = chunk * items / chunks; item < (chunk + 1) * items / chunks; ++item) {
        backward_item(g, in, grad_out, item / g.groups, item % g.groups, tile, grad_x, grad_offset, grad_mask, sum, ws);
      }
    }
  });
  at::Tensor sum = partial[0];
  for (int64_t chunk = 1; chunk < chunks; ++chunk) sum.add_(partial[chunk]);
  grad_weight.copy_(sum.view_as(grad_weight));
}

void check_dtype(const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "deform_conv2d on the CPU supports float32, float64, float16 and bfloat16; got ", x.scalar_type());
}

// t in the dtype computed in (float for float16/bfloat16 t), contiguous.
at::Tensor computed(const at::Tensor& t) { return t.to(at::toOpMathType(t.scalar_type())).contiguous(); }

at::Tensor deform_conv2d_forward_cpu(const at::Tensor& x_in, const at::Tensor& offset_in,
                                     const std::optional<at::Tensor>& mask_in, const at::Tensor& weight_in,
                                     const std::optional<at::Tensor>& bias_in, int64_t stride_h, int64_t stride_w,
                                     int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t offset_groups,
                                     int64_t weight_groups) {
  check_dtype(x_in);
  const Geometry g = deform_geometry(x_in, offset_in, weight_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                     offset_groups, weight_groups);
  // The forward reads x channels-last (a copy the size of x unless it is already) and the weight
  // as (C_out, K, C / weight_groups), the column order of sample_tile.
  const at::Tensor x = dense_input(x_in.contiguous(at::MemoryFormat::ChannelsLast)), offset = offset_in.contiguous();
  const at::Tensor weight = computed(weight_in.flatten(2).transpose(1, 2));
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const at::Tensor bias = bias_in.has_value() ? computed(*bias_in) : at::Tensor();
  at::Tensor out = at::empty({g.n, g.c_out, g.ho, g.wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "deform_conv2d_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(g, inputs<scalar_t, acc_t>(x, offset, mask, weight),
                                    bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                                    out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& offset_in,
    const std::optional<at::Tensor>& mask_in, const at::Tensor& weight_in, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t offset_groups, int64_t weight_groups) {
  check_dtype(x_in);
  const Geometry g = deform_geometry(x_in, offset_in, weight_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                     offset_groups, weight_groups);
  const at::Tensor x = dense_input(x_in), offset = offset_in.contiguous(), weight = computed(weight_in);
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({g.n, g.c_out, g.ho, g.wo}),
              "deform_conv2d backward: grad_out has the wrong shape");
  const at::Tensor grad_out = computed(grad_out_in);
  // Summed in the dtype computed in, rounded to x's once at the end. grad_x has the same
  // strides as x (both dense), so one set of corner offsets serves both.
  const auto acc = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor grad_x = at::zeros_like(x, acc);
  TORCH_INTERNAL_ASSERT(grad_x.strides() == x.strides());
  at::Tensor grad_offset = at::empty_like(offset, acc);
  at::Tensor grad_mask = mask.defined() ? at::empty_like(mask, acc) : at::empty({0}, acc);
  at::Tensor grad_weight = at::zeros_like(weight);
  if (g.n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "deform_conv2d_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(g, inputs<scalar_t, acc_t>(x, offset, mask, weight),
                                       grad_out.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<acc_t>(),
                                       grad_offset.mutable_data_ptr<acc_t>(),
                                       mask.defined() ? grad_mask.mutable_data_ptr<acc_t>() : nullptr, grad_weight);
    });
  }
  const auto dtype = x.scalar_type();
  return {grad_x.to(dtype), grad_offset.to(dtype), grad_mask.to(dtype), grad_weight.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(stt, CPU, m) {
  m.impl("_deform_conv2d_forward", &deform_conv2d_forward_cpu);
  m.impl("_deform_conv2d_backward", &deform_conv2d_backward_cpu);
}

}  // namespace stt
