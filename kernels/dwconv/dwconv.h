// Launchers of the depthwise-convolution kernels (dwconv_kernels.cu), called by the binding
// (dwconv.cpp). Tensors are NCHW-contiguous; acc_t is at::opmath_type<scalar_t> (float for
// fp16/bf16/fp32, double for fp64). The kernels file includes no torch headers, so it compiles fast.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fat_dwconv {

// y = depthwise conv of x (N, C, H, W) with w (C, 1, K, K), stride S, padding K / 2, plus bias b
// (may be null). flip = true correlates with the 180-degree rotated kernel (stride 1 only): that is
// the input gradient of a stride-1 convolution.
template <typename scalar_t>
void launch_forward(const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t* y, int64_t planes, int C,
                    int H, int W, int Ho, int Wo, int K, int S, bool flip, cudaStream_t stream);

// dx (N, C, H, W) of a stride-2 convolution from dy (N, C, Ho, Wo).
template <typename scalar_t>
void launch_input_grad_stride2(const scalar_t* dy, const scalar_t* w, scalar_t* dx, int64_t planes, int C, int H,
                               int W, int Ho, int Wo, int K, cudaStream_t stream);

// Per-chunk partial sums of the weight gradient, partial_w (chunks, C, K * K), and of the bias
// gradient, partial_b (chunks, C), in acc_t; the caller sums over chunks.
template <typename scalar_t, typename acc_t>
void launch_weight_grad(const scalar_t* dy, const scalar_t* x, acc_t* partial_w, acc_t* partial_b, int chunks, int N,
                        int C, int H, int W, int Ho, int Wo, int K, int S, cudaStream_t stream);

// How many partial sums launch_weight_grad writes per channel for these sizes.
int weight_grad_chunks(int N, int C, int Ho, int Wo);

}  // namespace fat_dwconv
