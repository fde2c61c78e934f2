// Depthwise 2-D convolution for FAT's large kernels: forward, input gradient and weight gradient.
//
// y[n,c,oy,ox] = b[c] + sum_{i,j} x[n,c, oy*S - P + i, ox*S - P + j] * w[c,0,i,j],  P = K / 2
//
// Odd K in 3..31, stride S in {1, 2}; fp32, fp16 and bf16 tensors with fp32 accumulation. Tensors
// are NCHW-contiguous here: the Python wrapper converts channels_last inputs and converts back.
// The tiled kernels take one (n, c) plane per blockIdx.x (N * C can exceed gridDim.y/z's 65535) and a
// tile of it per (blockIdx.y, blockIdx.z), staged with its halo in shared memory.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

namespace {

constexpr int kTileW = 32;  // outputs per block along W (one warp wide)
constexpr int kTileH = 8;   // output rows per block; each thread computes kRowsPerThread of them
constexpr int kRowsPerThread = 2;
constexpr int kThreadsY = kTileH / kRowsPerThread;

// Forward. KS > 0 fixes the kernel size at compile time (unrolled); KS == 0 reads it from k.
template <typename scalar_t, int KS, int S>
__global__ void dwconv_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                      const scalar_t* __restrict__ b, scalar_t* __restrict__ y,
                                      int C, int H, int W, int Ho, int Wo, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int K = KS > 0 ? KS : k;
  const int P = K / 2;
  extern __shared__ unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* wsh = tile + ((kTileH - 1) * S + K) * ((kTileW - 1) * S + K);
  const int in_h = (kTileH - 1) * S + K, in_w = (kTileW - 1) * S + K;

  const int plane = blockIdx.x, c = plane % C;
  const int oy0 = blockIdx.y * kTileH, ox0 = blockIdx.z * kTileW;
  const int iy0 = oy0 * S - P, ix0 = ox0 * S - P;
  const scalar_t* xp = x + static_cast<int64_t>(plane) * H * W;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;

  for (int i = tid; i < K * K; i += nthreads) wsh[i] = static_cast<acc_t>(w[c * K * K + i]);
  for (int i = tid; i < in_h * in_w; i += nthreads) {
    const int ty = i / in_w, tx = i % in_w, iy = iy0 + ty, ix = ix0 + tx;
    tile[i] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? static_cast<acc_t>(xp[iy * W + ix]) : acc_t(0);
  }
  __syncthreads();

  const int ox = ox0 + threadIdx.x;
  const acc_t bias = b != nullptr ? static_cast<acc_t>(b[c]) : acc_t(0);
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int ly = threadIdx.y + r * kThreadsY, oy = oy0 + ly;
    if (oy >= Ho || ox >= Wo) continue;
    acc_t sum = bias;
    const acc_t* t = tile + (ly * S) * in_w + threadIdx.x * S;
#pragma unroll
    for (int i = 0; i < K; ++i) {
#pragma unroll
      for (int j = 0; j < K; ++j) sum += t[i * in_w + j] * wsh[i * K + j];
    }
    y[static_cast<int64_t>(plane) * Ho * Wo + oy * Wo + ox] = static_cast<scalar_t>(sum);
  }
}

// Input gradient: dx[iy,ix] = sum over taps (i,j) with (iy + P - i) = oy*S, (ix + P - j) = ox*S of dy[oy,ox] w[i,j].
template <typename scalar_t, int S>
__global__ void dwconv_input_grad_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ w,
                                         scalar_t* __restrict__ dx, int C, int H, int W, int Ho, int Wo, int K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int P = K / 2;
  extern __shared__ unsigned char smem_raw[];
  acc_t* wsh = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* tile = wsh + K * K;
  // Output rows/cols that touch input rows iy0 .. iy0 + kTileH - 1 (likewise columns).
  const int plane = blockIdx.x, c = plane % C;
  const int iy0 = blockIdx.y * kTileH, ix0 = blockIdx.z * kTileW;
  const int oy_lo = (iy0 + P - (K - 1) + S * 4096) / S - 4096;  // floor division for negatives
  const int ox_lo = (ix0 + P - (K - 1) + S * 4096) / S - 4096;
  const int t_h = (kTileH - 1 + K - 1) / S + 2, t_w = (kTileW - 1 + K - 1) / S + 2;
  const scalar_t* dyp = dy + static_cast<int64_t>(plane) * Ho * Wo;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;

  for (int i = tid; i < K * K; i += nthreads) wsh[i] = static_cast<acc_t>(w[c * K * K + i]);
  for (int i = tid; i < t_h * t_w; i += nthreads) {
    const int oy = oy_lo + i / t_w, ox = ox_lo + i % t_w;
    tile[i] = (oy >= 0 && oy < Ho && ox >= 0 && ox < Wo) ? static_cast<acc_t>(dyp[oy * Wo + ox]) : acc_t(0);
  }
  __syncthreads();

  const int ix = ix0 + threadIdx.x;
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int iy = iy0 + threadIdx.y + r * kThreadsY;
    if (iy >= H || ix >= W) continue;
    acc_t sum = 0;
    for (int i = (iy + P) % S; i < K; i += S) {  // taps whose output row is a whole number
      const int oy = (iy + P - i) / S;
      const acc_t* trow = tile + (oy - oy_lo) * t_w;
      for (int j = (ix + P) % S; j < K; j += S) {
        sum += trow[(ix + P - j) / S - ox_lo] * wsh[i * K + j];
      }
    }
    dx[static_cast<int64_t>(plane) * H * W + iy * W + ix] = static_cast<scalar_t>(sum);
  }
}

// Weight gradient, partial sums: block (c, chunk) covers planes n = chunk, chunk + chunks, ... of
// channel c; thread t accumulates tap t % K^2 over a 1/(threads / K^2) share of the outputs.
template <typename scalar_t, int S>
__global__ void dwconv_weight_grad_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                          float* __restrict__ partial, int N, int C, int H, int W, int Ho, int Wo,
                                          int K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int P = K / 2, taps = K * K;
  const int c = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
  const int tap = threadIdx.x % taps, part = threadIdx.x / taps, parts = blockDim.x / taps;
  const int ti = tap / K, tj = tap % K;
  acc_t sum = 0;
  if (part < parts) {
    const int64_t outputs = static_cast<int64_t>(Ho) * Wo;
    for (int n = chunk; n < N; n += chunks) {
      const scalar_t* dyp = dy + (static_cast<int64_t>(n) * C + c) * outputs;
      const scalar_t* xp = x + (static_cast<int64_t>(n) * C + c) * H * W;
      for (int64_t o = part; o < outputs; o += parts) {
        const int oy = o / Wo, ox = o % Wo;
        const int iy = oy * S - P + ti, ix = ox * S - P + tj;
        if (iy >= 0 && iy < H && ix >= 0 && ix < W)
          sum += static_cast<acc_t>(dyp[o]) * static_cast<acc_t>(xp[iy * W + ix]);
      }
    }
  }
  extern __shared__ unsigned char smem_raw[];
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw);
  red[threadIdx.x] = sum;
  __syncthreads();
  if (part == 0) {
    for (int p = 1; p < parts; ++p) sum += red[p * taps + tap];
    partial[(static_cast<int64_t>(chunk) * C + c) * taps + tap] = sum;
  }
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& w, int64_t stride) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda(), "dwconv: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "dwconv: input must be a contiguous NCHW tensor");
  TORCH_CHECK(w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1 && w.size(2) == w.size(3),
              "dwconv: weight must have shape (C, 1, k, k) for an input with C channels");
  TORCH_CHECK(w.size(2) % 2 == 1 && w.size(2) >= 3 && w.size(2) <= 31, "dwconv: kernel size must be odd, 3..31");
  TORCH_CHECK(stride == 1 || stride == 2, "dwconv: stride must be 1 or 2");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "dwconv: input and weight dtypes differ");
}

int out_size(int64_t in, int64_t k, int64_t s) { return static_cast<int>((in + 2 * (k / 2) - k) / s + 1); }

template <typename scalar_t, int S>
void launch_forward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor* b, torch::Tensor& y, int K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = y.size(2), Wo = y.size(3);
  const dim3 block(kTileW, kThreadsY);
  const dim3 grid(N * C, (Ho + kTileH - 1) / kTileH, (Wo + kTileW - 1) / kTileW);
  const size_t smem = sizeof(acc_t) * (((kTileH - 1) * S + K) * ((kTileW - 1) * S + K) + K * K);
  auto stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* bp = b ? b->data_ptr<scalar_t>() : nullptr;
#define FAT_DW_FWD(KS)                                                                                 \
  dwconv_forward_kernel<scalar_t, KS, S><<<grid, block, smem, stream>>>(                                \
      x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bp, y.data_ptr<scalar_t>(), C, H, W, Ho, Wo, K)
  switch (K) {
    case 3: FAT_DW_FWD(3); break;
    case 5: FAT_DW_FWD(5); break;
    case 7: FAT_DW_FWD(7); break;
    case 9: FAT_DW_FWD(9); break;
    default: FAT_DW_FWD(0);
  }
#undef FAT_DW_FWD
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

torch::Tensor dwconv_forward(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> b, int64_t stride) {
  check_inputs(x, w, stride);
  const c10::cuda::CUDAGuard guard(x.device());
  w = w.contiguous();
  const int K = w.size(2);
  auto y = torch::empty({x.size(0), x.size(1), out_size(x.size(2), K, stride), out_size(x.size(3), K, stride)},
                        x.options());
  if (y.numel() == 0) return y;
  torch::Tensor bias;
  if (b.has_value()) bias = b->to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_forward", [&] {
    if (stride == 1) launch_forward<scalar_t, 1>(x, w, b.has_value() ? &bias : nullptr, y, K);
    else launch_forward<scalar_t, 2>(x, w, b.has_value() ? &bias : nullptr, y, K);
  });
  return y;
}

torch::Tensor dwconv_input_grad(torch::Tensor dy, torch::Tensor w, int64_t H, int64_t W, int64_t stride) {
  check_inputs(dy, w, stride);
  const c10::cuda::CUDAGuard guard(dy.device());
  w = w.contiguous();
  const int K = w.size(2), N = dy.size(0), C = dy.size(1), Ho = dy.size(2), Wo = dy.size(3);
  auto dx = torch::empty({N, C, H, W}, dy.options());
  if (dx.numel() == 0) return dx;
  const dim3 block(kTileW, kThreadsY);
  const dim3 grid(N * C, (H + kTileH - 1) / kTileH, (W + kTileW - 1) / kTileW);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "dwconv_input_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int t_h = (kTileH - 1 + K - 1) / stride + 2, t_w = (kTileW - 1 + K - 1) / stride + 2;
    const size_t smem = sizeof(acc_t) * (K * K + t_h * t_w);
    if (stride == 1)
      dwconv_input_grad_kernel<scalar_t, 1><<<grid, block, smem, stream>>>(
          dy.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), C, H, W, Ho, Wo, K);
    else
      dwconv_input_grad_kernel<scalar_t, 2><<<grid, block, smem, stream>>>(
          dy.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), C, H, W, Ho, Wo, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

torch::Tensor dwconv_weight_grad(torch::Tensor dy, torch::Tensor x, int64_t K, int64_t stride) {
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous(), "dwconv: tensors must be contiguous NCHW");
  const c10::cuda::CUDAGuard guard(x.device());
  const int N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = dy.size(2), Wo = dy.size(3);
  const int taps = K * K;
  const int threads = std::max(256, static_cast<int>((taps + 31) / 32 * 32));
  const int chunks = std::min(N, 64);
  auto partial = torch::zeros({chunks, C, taps}, x.options().dtype(torch::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(C, chunks);
    const size_t smem = sizeof(acc_t) * threads;
    if (stride == 1)
      dwconv_weight_grad_kernel<scalar_t, 1><<<grid, threads, smem, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), partial.data_ptr<float>(), N, C, H, W, Ho, Wo, K);
    else
      dwconv_weight_grad_kernel<scalar_t, 2><<<grid, threads, smem, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), partial.data_ptr<float>(), N, C, H, W, Ho, Wo, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.sum(0).view({C, 1, K, K});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &dwconv_forward, "depthwise conv2d forward (NCHW)");
  m.def("input_grad", &dwconv_input_grad, "depthwise conv2d input gradient (NCHW)");
  m.def("weight_grad", &dwconv_weight_grad, "depthwise conv2d weight gradient, fp32 (NCHW)");
}
