// Python binding of the depthwise-convolution kernels: input checks, dtype dispatch, output allocation
// on the current CUDA stream. The kernels themselves are in dwconv_kernels.cu.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "dwconv.h"

namespace {

int64_t out_size(int64_t in, int64_t k, int64_t s) { return (in + 2 * (k / 2) - k) / s + 1; }

// `a` is the activation-like tensor (x or dy), `w` the weight.
void check_inputs(const torch::Tensor& a, const torch::Tensor& w, int64_t stride, const char* op) {
  TORCH_CHECK(a.is_cuda(), op, ": expected a CUDA tensor, got one on ", a.device());
  TORCH_CHECK(w.device() == a.device(), op, ": weight is on ", w.device(), " but the input is on ", a.device());
  TORCH_CHECK(a.dim() == 4, op, ": expected a 4-D (N, C, H, W) tensor, got ", a.dim(), "-D");
  TORCH_CHECK(w.scalar_type() == a.scalar_type(), op, ": weight dtype ", w.scalar_type(), " differs from input dtype ",
              a.scalar_type());
  TORCH_CHECK(w.dim() == 4 && w.size(0) == a.size(1) && w.size(1) == 1 && w.size(2) == w.size(3), op,
              ": weight must have shape (C, 1, k, k) with C = ", a.size(1), ", got ", w.sizes());
  TORCH_CHECK(w.size(2) % 2 == 1 && w.size(2) >= 3 && w.size(2) <= 31, op, ": kernel size must be odd, 3..31, got ",
              w.size(2));
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
}

}  // namespace

torch::Tensor dwconv_forward(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> b, int64_t stride) {
  check_inputs(x, w, stride, "dwconv forward");
  const c10::cuda::CUDAGuard guard(x.device());
  x = x.contiguous();
  w = w.contiguous();
  torch::Tensor bias;
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->device() == x.device() && b->numel() == x.size(1), "dwconv forward: bias must have C = ", x.size(1),
                " elements on ", x.device());
    bias = b->to(x.scalar_type()).contiguous();
  }
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = w.size(2);
  auto y = torch::empty({N, C, out_size(H, K, stride), out_size(W, K, stride)}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_forward", [&] {
    fat_dwconv::launch_forward<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                         bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                                         N * C, C, H, W, y.size(2), y.size(3), K, stride, false,
                                         at::cuda::getCurrentCUDAStream());
  });
  return y;
}

torch::Tensor dwconv_input_grad(torch::Tensor dy, torch::Tensor w, int64_t H, int64_t W, int64_t stride) {
  check_inputs(dy, w, stride, "dwconv input_grad");
  const c10::cuda::CUDAGuard guard(dy.device());
  dy = dy.contiguous();
  w = w.contiguous();
  const int64_t N = dy.size(0), C = dy.size(1), Ho = dy.size(2), Wo = dy.size(3), K = w.size(2);
  TORCH_CHECK(out_size(H, K, stride) == Ho && out_size(W, K, stride) == Wo, "dwconv input_grad: grad_output size ",
              dy.sizes(), " does not match an input of ", H, "x", W);
  auto dx = torch::empty({N, C, H, W}, dy.options());
  if (dx.numel() == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "dwconv_input_grad", [&] {
    if (stride == 1)  // a stride-1 correlation with the rotated kernel (output size = input size)
      fat_dwconv::launch_forward<scalar_t>(dy.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), nullptr,
                                           dx.data_ptr<scalar_t>(), N * C, C, Ho, Wo, H, W, K, 1, true, stream);
    else
      fat_dwconv::launch_input_grad_stride2<scalar_t>(dy.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                                      dx.data_ptr<scalar_t>(), N * C, C, H, W, Ho, Wo, K, stream);
  });
  return dx;
}

// Returns (grad_weight (C, 1, K, K), grad_bias (C,)) in the accumulation dtype (fp32; fp64 for fp64).
std::vector<torch::Tensor> dwconv_weight_bias_grad(torch::Tensor dy, torch::Tensor x, int64_t K, int64_t stride) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "dwconv weight_grad: expected a 4-D CUDA input, got ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(K % 2 == 1 && K >= 3 && K <= 31, "dwconv weight_grad: kernel size must be odd, 3..31, got ", K);
  TORCH_CHECK(stride == 1 || stride == 2, "dwconv weight_grad: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(dy.device() == x.device() && dy.scalar_type() == x.scalar_type() && dy.dim() == 4 &&
                  dy.size(0) == x.size(0) && dy.size(1) == x.size(1) && dy.size(2) == out_size(x.size(2), K, stride) &&
                  dy.size(3) == out_size(x.size(3), K, stride),
              "dwconv weight_grad: grad_output ", dy.sizes(), " ", dy.scalar_type(), " does not match input ", x.sizes(),
              " ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  dy = dy.contiguous();
  x = x.contiguous();
  const int N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = dy.size(2), Wo = dy.size(3);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (dy.numel() == 0 || x.numel() == 0)
    return {torch::zeros({C, 1, K, K}, x.options().dtype(acc_type)), torch::zeros({C}, x.options().dtype(acc_type))};
  const int chunks = fat_dwconv::weight_grad_chunks(N, C, Ho, Wo);
  auto partial_w = torch::empty({chunks, C, K * K}, x.options().dtype(acc_type));
  auto partial_b = torch::empty({chunks, C}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fat_dwconv::launch_weight_grad<scalar_t, acc_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                    partial_w.data_ptr<acc_t>(), partial_b.data_ptr<acc_t>(), chunks, N,
                                                    C, H, W, Ho, Wo, K, stride, at::cuda::getCurrentCUDAStream());
  });
  return {partial_w.sum(0).view({C, 1, K, K}), partial_b.sum(0)};
}

#ifndef FAT_DWCONV_SOURCE_HASH
#define FAT_DWCONV_SOURCE_HASH unknown
#endif
#define FAT_DWCONV_STRING(x) FAT_DWCONV_STRING_(x)
#define FAT_DWCONV_STRING_(x) #x

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // toolchain.source_hash() of the sources this module was built from
  m.attr("source_hash") = FAT_DWCONV_STRING(FAT_DWCONV_SOURCE_HASH);
  m.def("forward", &dwconv_forward, "depthwise conv2d forward, padding k // 2 (NCHW)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("stride"));
  m.def("input_grad", &dwconv_input_grad, "gradient w.r.t. the input (NCHW)", py::arg("grad_output"),
        py::arg("weight"), py::arg("height"), py::arg("width"), py::arg("stride"));
  m.def("weight_bias_grad", &dwconv_weight_bias_grad, "gradients w.r.t. weight and bias, fp32 (NCHW)",
        py::arg("grad_output"), py::arg("x"), py::arg("kernel_size"), py::arg("stride"));
}
