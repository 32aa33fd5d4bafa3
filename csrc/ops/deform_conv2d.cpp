// Schemas of the modulated deformable convolution kernels (cpu/ and cuda/deform_conv2d_kernel.*),
// torchvision's semantics: x (N, C, H, W), offset (N, 2*G*Kh*Kw, Ho, Wo), mask (N, G*Kh*Kw, Ho, Wo)
// or None, weight (C_out, C / weight_groups, Kh, Kw), bias (C_out) or None. The backward returns
// grad_mask as an empty tensor when mask is None; the bias gradient is left to the caller.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(stt, m) {
  m.def(
      "_deform_conv2d_forward(Tensor x, Tensor offset, Tensor? mask, Tensor weight, Tensor? bias, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int offset_groups, int weight_groups) -> Tensor");
  m.def(
      "_deform_conv2d_backward(Tensor grad_out, Tensor x, Tensor offset, Tensor? mask, Tensor weight, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int offset_groups, int weight_groups) -> (Tensor grad_x, Tensor grad_offset, Tensor grad_mask, "
      "Tensor grad_weight)");
}
