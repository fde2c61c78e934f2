// Depthwise 2-D convolution for FAT: forward, input gradient, weight and bias gradients.
//
//   y[n,c,oy,ox] = b[c] + sum_{i,j < K} x[n,c, oy*S - P + i, ox*S - P + j] * w[c,0,i,j],   P = K / 2
//
// Odd K in 3..31, S in {1, 2}, NCHW-contiguous tensors, fp32 accumulation (fp64 for fp64). K = 3, 5,
// 7, 9 are compiled with the kernel size fixed (weights in registers, loops unrolled); other sizes
// and fp64 take a runtime-K path. Only light c10 headers are included (no torch/extension.h), so
// this file compiles quickly.
#include "dwconv.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

namespace fat_dwconv {
namespace {

constexpr int kThreads = 256;     // threads per block of the forward and input-gradient kernels
constexpr int kMaxSmem = 48 * 1024;  // dynamic shared memory without an opt-in
constexpr int kRowsStride1 = 8;   // output rows per thread (a vertical strip; rows share loads)
constexpr int kRowsStride2 = 4;
constexpr int kGradRows = 8;      // output rows per weight-gradient tile (tiles are 32 columns wide)

template <typename T>
__device__ __forceinline__ T* shared_buffer() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<T*>(smem_raw);
}

// Forward (and, with FLIP, the stride-1 input gradient). A block holds blockDim.z planes (n, c);
// for each, a tile of blockDim.y * R output rows by blockDim.x output columns. The input window of
// the tile and the plane's weights are staged in shared memory as acc_t. Each thread computes R
// consecutive rows of one column: every input row it loads from shared memory serves up to
// ceil(K / S) of its outputs.
template <typename scalar_t, int KS, int S, int R, bool FLIP>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w, const scalar_t* __restrict__ b,
                   scalar_t* __restrict__ y, int64_t planes, int C, int H, int W, int Ho, int Wo, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int K = KS > 0 ? KS : k;
  const int P = K / 2;
  const int tile_h = blockDim.y * R, tile_w = blockDim.x;
  const int in_h = (tile_h - 1) * S + K, in_w = (tile_w - 1) * S + K;
  acc_t* wsh = shared_buffer<acc_t>() + threadIdx.z * (K * K + in_h * in_w);
  acc_t* tile = wsh + K * K;

  const int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.z + threadIdx.z;
  const bool active = plane < planes;
  const int c = static_cast<int>(plane % C);
  const int oy0 = blockIdx.y * tile_h, ox0 = blockIdx.z * tile_w;
  const int iy0 = oy0 * S - P, ix0 = ox0 * S - P;
  const int lt = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  if (active) {
    const scalar_t* wp = w + static_cast<int64_t>(c) * K * K;
    for (int i = lt; i < K * K; i += nt) wsh[i] = static_cast<acc_t>(wp[FLIP ? K * K - 1 - i : i]);
    const scalar_t* xp = x + plane * H * W;
    for (int i = lt; i < in_h * in_w; i += nt) {
      const int r = i / in_w, iy = iy0 + r, ix = ix0 + (i - r * in_w);
      tile[i] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? static_cast<acc_t>(xp[static_cast<int64_t>(iy) * W + ix])
                                                          : acc_t(0);
    }
  }
  __syncthreads();
  const int ly0 = threadIdx.y * R, ox = ox0 + threadIdx.x;
  if (!active || ox >= Wo || oy0 + ly0 >= Ho) return;

  const acc_t bias = b != nullptr ? static_cast<acc_t>(b[c]) : acc_t(0);
  acc_t acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = bias;
  const acc_t* t = tile + ly0 * S * in_w + threadIdx.x * S;  // window of output (ly0, threadIdx.x)
  if constexpr (KS > 0) {
    acc_t wr[KS * KS];
#pragma unroll
    for (int i = 0; i < KS * KS; ++i) wr[i] = wsh[i];
    // Window row q feeds output row r through weight row i = q - r * S.
#pragma unroll
    for (int q = 0; q < (R - 1) * S + KS; ++q) {
      acc_t v[KS];
#pragma unroll
      for (int j = 0; j < KS; ++j) v[j] = t[q * in_w + j];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int i = q - r * S;
        if (i >= 0 && i < KS) {
#pragma unroll
          for (int j = 0; j < KS; ++j) acc[r] += v[j] * wr[i * KS + j];
        }
      }
    }
  } else {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < K; ++i) {
        const acc_t* row = t + (r * S + i) * in_w;
        const acc_t* wrow = wsh + i * K;
        for (int j = 0; j < K; ++j) acc[r] += row[j] * wrow[j];
      }
    }
  }
  scalar_t* yp = y + plane * Ho * Wo;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int oy = oy0 + ly0 + r;
    if (oy < Ho) yp[static_cast<int64_t>(oy) * Wo + ox] = static_cast<scalar_t>(acc[r]);
  }
}

// Input gradient of a stride-2 convolution, split into the four parities of the input position:
//   dx[2m + a - P, 2n + e - P] = sum_{t < Ta, u < Te} dy[m - t, n - u] * w[a + 2t, e + 2u],
// with Ta = (K - a + 1) / 2 taps of parity a (no multiplications by inserted zeros). A block covers
// a tile of (m, n) positions, blockDim.y * R by blockDim.x, for all four parities; shared memory
// holds dy rows m0 - T + 1 .. m0 + tile_h - 1 (T = (K + 1) / 2), likewise columns.
template <typename scalar_t, int KS, int R>
__global__ void __launch_bounds__(kThreads)
    input_grad_stride2_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ w,
                              scalar_t* __restrict__ dx, int64_t planes, int C, int H, int W, int Ho, int Wo, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int K = KS > 0 ? KS : k;
  const int P = K / 2, T = (K + 1) / 2;
  const int tile_h = blockDim.y * R, tile_w = blockDim.x;
  const int in_h = tile_h + T - 1, in_w = tile_w + T - 1;
  acc_t* wsh = shared_buffer<acc_t>() + threadIdx.z * (K * K + in_h * in_w);
  acc_t* tile = wsh + K * K;

  const int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.z + threadIdx.z;
  const bool active = plane < planes;
  const int c = static_cast<int>(plane % C);
  const int m0 = blockIdx.y * tile_h, n0 = blockIdx.z * tile_w;
  const int lt = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  if (active) {
    const scalar_t* wp = w + static_cast<int64_t>(c) * K * K;
    for (int i = lt; i < K * K; i += nt) wsh[i] = static_cast<acc_t>(wp[i]);
    const scalar_t* dyp = dy + plane * Ho * Wo;
    for (int i = lt; i < in_h * in_w; i += nt) {
      const int r = i / in_w, oy = m0 - (T - 1) + r, ox = n0 - (T - 1) + (i - r * in_w);
      tile[i] = (oy >= 0 && oy < Ho && ox >= 0 && ox < Wo)
                    ? static_cast<acc_t>(dyp[static_cast<int64_t>(oy) * Wo + ox]) : acc_t(0);
    }
  }
  __syncthreads();
  const int ly0 = threadIdx.y * R, m_first = m0 + ly0, n = n0 + threadIdx.x;
  if (!active || 2 * m_first - P >= H || 2 * n - P >= W) return;

  scalar_t* dxp = dx + plane * H * W;
  // dy[m - t, n - u] for m = m_first + r sits at tile row ly0 + r - t + T - 1, column threadIdx.x - u + T - 1.
  const acc_t* t0 = tile + (ly0 + T - 1) * in_w + threadIdx.x + T - 1;
  if constexpr (KS > 0) {
    constexpr int TK = (KS + 1) / 2;
    acc_t wr[KS * KS];
#pragma unroll
    for (int i = 0; i < KS * KS; ++i) wr[i] = wsh[i];
#pragma unroll
    for (int a = 0; a < 2; ++a) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int Ta = (KS - a + 1) / 2, Te = (KS - e + 1) / 2;
        acc_t acc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = acc_t(0);
        // Row d (relative to m_first, from -(Ta - 1) to R - 1) feeds output r through t = r - d.
#pragma unroll
        for (int d = 1 - TK; d < R; ++d) {
          if (d <= -Ta) continue;
          acc_t v[TK];
#pragma unroll
          for (int u = 0; u < TK; ++u) v[u] = u < Te ? t0[d * in_w - u] : acc_t(0);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int tt = r - d;
            if (tt >= 0 && tt < Ta) {
#pragma unroll
              for (int u = 0; u < TK; ++u) {
                if (u < Te) acc[r] += v[u] * wr[(a + 2 * tt) * KS + e + 2 * u];
              }
            }
          }
        }
        const int ix = 2 * n + e - P;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int iy = 2 * (m_first + r) + a - P;
          if (iy >= 0 && iy < H && ix >= 0 && ix < W) dxp[static_cast<int64_t>(iy) * W + ix] = static_cast<scalar_t>(acc[r]);
        }
      }
    }
  } else {
    for (int a = 0; a < 2; ++a) {
      for (int e = 0; e < 2; ++e) {
        const int Ta = (K - a + 1) / 2, Te = (K - e + 1) / 2;
        const int ix = 2 * n + e - P;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          acc_t acc = 0;
          for (int tt = 0; tt < Ta; ++tt) {
            const acc_t* row = t0 + (r - tt) * in_w;
            const acc_t* wrow = wsh + (a + 2 * tt) * K + e;
            for (int u = 0; u < Te; ++u) acc += row[-u] * wrow[2 * u];
          }
          const int iy = 2 * (m_first + r) + a - P;
          if (iy >= 0 && iy < H && ix >= 0 && ix < W) dxp[static_cast<int64_t>(iy) * W + ix] = static_cast<scalar_t>(acc);
        }
      }
    }
  }
}

// Weight and bias gradients. Block (c, chunk) walks the work items chunk, chunk + chunks, ... of
// channel c, an item being a tile of kGradRows x 32 outputs of one image; dy's tile and the input
// window are staged in shared memory. Fixed K (block 32 x K threads): thread (s, j) owns output
// column s and tap column j, keeps its dy column in registers and accumulates all K taps (i, j);
// the 32 columns are summed with warp shuffles at the end. Runtime K: one thread per tap. Each
// block writes one partial sum per tap (no atomics); the caller adds the chunks.
template <typename scalar_t, int KS, int S>
__global__ void __launch_bounds__(1024) weight_grad_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                   at::opmath_type<scalar_t>* __restrict__ partial_w,
                                   at::opmath_type<scalar_t>* __restrict__ partial_b, int N, int C, int H, int W,
                                   int Ho, int Wo, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TH = kGradRows, TW = 32;
  const int K = KS > 0 ? KS : k;
  const int P = K / 2, taps = K * K;
  const int in_h = (TH - 1) * S + K, in_w = (TW - 1) * S + K;
  acc_t* dyt = shared_buffer<acc_t>();
  acc_t* xt = dyt + TH * TW;

  const int c = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
  const int tiles_h = (Ho + TH - 1) / TH, tiles_w = (Wo + TW - 1) / TW;
  const int64_t items = static_cast<int64_t>(N) * tiles_h * tiles_w;
  const int lt = threadIdx.x, nt = blockDim.x;

  constexpr int NACC = KS > 0 ? KS : 1;
  acc_t acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = acc_t(0);
  acc_t bias_acc = 0;

  for (int64_t item = chunk; item < items; item += chunks) {
    const int n = static_cast<int>(item / (tiles_h * tiles_w));
    const int tile = static_cast<int>(item % (tiles_h * tiles_w));
    const int oy0 = (tile / tiles_w) * TH, ox0 = (tile % tiles_w) * TW;
    const int iy0 = oy0 * S - P, ix0 = ox0 * S - P;
    const int64_t plane = static_cast<int64_t>(n) * C + c;
    const scalar_t* dyp = dy + plane * Ho * Wo;
    const scalar_t* xp = x + plane * H * W;
    __syncthreads();  // the previous item's tiles are no longer read
    for (int i = lt; i < TH * TW; i += nt) {
      const int oy = oy0 + i / TW, ox = ox0 + i % TW;
      dyt[i] = (oy < Ho && ox < Wo) ? static_cast<acc_t>(dyp[static_cast<int64_t>(oy) * Wo + ox]) : acc_t(0);
    }
    for (int i = lt; i < in_h * in_w; i += nt) {
      const int r = i / in_w, iy = iy0 + r, ix = ix0 + (i - r * in_w);
      xt[i] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? static_cast<acc_t>(xp[static_cast<int64_t>(iy) * W + ix])
                                                        : acc_t(0);
    }
    __syncthreads();
    if constexpr (KS > 0) {
      const int s = lt % TW, j = lt / TW;
      acc_t d[TH];
#pragma unroll
      for (int r = 0; r < TH; ++r) d[r] = dyt[r * TW + s];
      if (j == 0) {
#pragma unroll
        for (int r = 0; r < TH; ++r) bias_acc += d[r];
      }
      const acc_t* col = xt + s * S + j;
      // Window row q meets output row r at tap row i = q - r * S.
#pragma unroll
      for (int q = 0; q < (TH - 1) * S + KS; ++q) {
        const acc_t v = col[q * in_w];
#pragma unroll
        for (int r = 0; r < TH; ++r) {
          const int i = q - r * S;
          if (i >= 0 && i < KS) acc[i] += v * d[r];
        }
      }
    } else {
      if (lt < taps) {
        const int i = lt / K, j = lt % K;
        acc_t sum = 0;
        for (int r = 0; r < TH; ++r) {
          const acc_t* xrow = xt + (r * S + i) * in_w + j;
          const acc_t* drow = dyt + r * TW;
          for (int s = 0; s < TW; ++s) sum += drow[s] * xrow[s * S];
        }
        acc[0] += sum;
      }
      if (lt == 0) {
        for (int i = 0; i < TH * TW; ++i) bias_acc += dyt[i];
      }
    }
  }

  acc_t* pw = partial_w + (static_cast<int64_t>(chunk) * C + c) * taps;
  if constexpr (KS > 0) {
    const int s = lt % TW, j = lt / TW;  // a warp is the 32 columns s of one tap column j
#pragma unroll
    for (int i = 0; i < KS; ++i) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) acc[i] += __shfl_down_sync(0xffffffffu, acc[i], offset);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) bias_acc += __shfl_down_sync(0xffffffffu, bias_acc, offset);
    if (s == 0) {
#pragma unroll
      for (int i = 0; i < KS; ++i) pw[i * KS + j] = acc[i];
      if (j == 0) partial_b[static_cast<int64_t>(chunk) * C + c] = bias_acc;
    }
  } else {
    if (lt < taps) pw[lt] = acc[0];
    if (lt == 0) partial_b[static_cast<int64_t>(chunk) * C + c] = bias_acc;
  }
}

// Block shape for a tile-per-plane kernel: blockDim.x columns (8, 16 or 32: about the output
// width), blockDim.y strips of R rows, blockDim.z planes, at most kThreads threads and kMaxSmem bytes.
struct Config {
  dim3 grid, block;
  size_t smem;
};

template <typename acc_t, typename SmemFn>
Config plan(int64_t planes, int out_h, int out_w, int R, SmemFn smem_per_plane) {
  int bx = 8;
  while (bx < 32 && bx < out_w) bx *= 2;
  int by = std::max(1, std::min((out_h + R - 1) / R, kThreads / bx));
  int bz = std::max(1, kThreads / (bx * by));
  bz = static_cast<int>(std::min<int64_t>(bz, planes));
  auto bytes = [&](int by_, int bz_) { return sizeof(acc_t) * static_cast<size_t>(smem_per_plane(bx, by_ * R)) * bz_; };
  while (bz > 1 && bytes(by, bz) > kMaxSmem) --bz;
  while (by > 1 && bytes(by, bz) > kMaxSmem) --by;
  const int tile_h = by * R;
  Config config;
  config.block = dim3(bx, by, bz);
  config.grid = dim3(static_cast<unsigned>((planes + bz - 1) / bz), (out_h + tile_h - 1) / tile_h, (out_w + bx - 1) / bx);
  config.smem = bytes(by, bz);
  return config;
}

template <typename scalar_t, int S, int R, bool FLIP>
void forward_dispatch(const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t* y, int64_t planes, int C,
                      int H, int W, int Ho, int Wo, int K, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const Config cfg = plan<acc_t>(planes, Ho, Wo, R, [&](int tile_w, int tile_h) {
    return K * K + ((tile_h - 1) * S + K) * ((tile_w - 1) * S + K);
  });
#define FAT_DWCONV_FORWARD(KS) \
  forward_kernel<scalar_t, KS, S, R, FLIP><<<cfg.grid, cfg.block, cfg.smem, stream>>>(x, w, b, y, planes, C, H, W, Ho, Wo, K)
  if constexpr (std::is_same<scalar_t, double>::value) {
    FAT_DWCONV_FORWARD(0);
  } else {
    switch (K) {
      case 3: FAT_DWCONV_FORWARD(3); break;
      case 5: FAT_DWCONV_FORWARD(5); break;
      case 7: FAT_DWCONV_FORWARD(7); break;
      case 9: FAT_DWCONV_FORWARD(9); break;
      default: FAT_DWCONV_FORWARD(0);
    }
  }
#undef FAT_DWCONV_FORWARD
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename scalar_t>
void launch_forward(const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t* y, int64_t planes, int C,
                    int H, int W, int Ho, int Wo, int K, int S, bool flip, cudaStream_t stream) {
  if (S == 1 && flip) forward_dispatch<scalar_t, 1, kRowsStride1, true>(x, w, b, y, planes, C, H, W, Ho, Wo, K, stream);
  else if (S == 1) forward_dispatch<scalar_t, 1, kRowsStride1, false>(x, w, b, y, planes, C, H, W, Ho, Wo, K, stream);
  else forward_dispatch<scalar_t, 2, kRowsStride2, false>(x, w, b, y, planes, C, H, W, Ho, Wo, K, stream);
}

template <typename scalar_t>
void launch_input_grad_stride2(const scalar_t* dy, const scalar_t* w, scalar_t* dx, int64_t planes, int C, int H,
                               int W, int Ho, int Wo, int K, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int R = kRowsStride2;
  const int P = K / 2, T = (K + 1) / 2;
  // Positions m, n with 2m + a - P in [0, H) for a parity a in {0, 1}.
  const int M = (H - 1 + P) / 2 + 1, Nw = (W - 1 + P) / 2 + 1;
  const Config cfg = plan<acc_t>(planes, M, Nw, R, [&](int tile_w, int tile_h) {
    return K * K + (tile_h + T - 1) * (tile_w + T - 1);
  });
#define FAT_DWCONV_INPUT_GRAD(KS) \
  input_grad_stride2_kernel<scalar_t, KS, R><<<cfg.grid, cfg.block, cfg.smem, stream>>>(dy, w, dx, planes, C, H, W, Ho, Wo, K)
  if constexpr (std::is_same<scalar_t, double>::value) {
    FAT_DWCONV_INPUT_GRAD(0);
  } else {
    switch (K) {
      case 3: FAT_DWCONV_INPUT_GRAD(3); break;
      case 5: FAT_DWCONV_INPUT_GRAD(5); break;
      case 7: FAT_DWCONV_INPUT_GRAD(7); break;
      case 9: FAT_DWCONV_INPUT_GRAD(9); break;
      default: FAT_DWCONV_INPUT_GRAD(0);
    }
  }
#undef FAT_DWCONV_INPUT_GRAD
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int weight_grad_chunks(int N, int C, int Ho, int Wo) {
  const int64_t items = static_cast<int64_t>(N) * ((Ho + kGradRows - 1) / kGradRows) * ((Wo + 31) / 32);
  const int64_t wanted = std::max<int64_t>(1, (4096 + C - 1) / C);  // enough blocks to fill the GPU
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({items, wanted, 65535})));
}

template <typename scalar_t, typename acc_t>
void launch_weight_grad(const scalar_t* dy, const scalar_t* x, acc_t* partial_w, acc_t* partial_b, int chunks, int N,
                        int C, int H, int W, int Ho, int Wo, int K, int S, cudaStream_t stream) {
  constexpr int TH = kGradRows, TW = 32;
  const size_t smem = sizeof(acc_t) * (TH * TW + ((TH - 1) * S + K) * ((TW - 1) * S + K));
  const dim3 grid(C, chunks);
  const int generic_threads = (K * K + 31) / 32 * 32;
#define FAT_DWCONV_WEIGHT_GRAD(KS, SS, THREADS) \
  weight_grad_kernel<scalar_t, KS, SS><<<grid, THREADS, smem, stream>>>(dy, x, partial_w, partial_b, N, C, H, W, Ho, Wo, K)
#define FAT_DWCONV_WEIGHT_GRAD_K(KS)                                                 \
  if (S == 1) FAT_DWCONV_WEIGHT_GRAD(KS, 1, KS > 0 ? TW * KS : generic_threads);    \
  else FAT_DWCONV_WEIGHT_GRAD(KS, 2, KS > 0 ? TW * KS : generic_threads)
  if constexpr (std::is_same<scalar_t, double>::value) {
    FAT_DWCONV_WEIGHT_GRAD_K(0);
  } else {
    switch (K) {
      case 3: FAT_DWCONV_WEIGHT_GRAD_K(3); break;
      case 5: FAT_DWCONV_WEIGHT_GRAD_K(5); break;
      case 7: FAT_DWCONV_WEIGHT_GRAD_K(7); break;
      case 9: FAT_DWCONV_WEIGHT_GRAD_K(9); break;
      default: FAT_DWCONV_WEIGHT_GRAD_K(0);
    }
  }
#undef FAT_DWCONV_WEIGHT_GRAD_K
#undef FAT_DWCONV_WEIGHT_GRAD
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define FAT_DWCONV_INSTANTIATE(scalar_t)                                                                            \
  template void launch_forward<scalar_t>(const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, int64_t, int, \
                                         int, int, int, int, int, int, bool, cudaStream_t);                         \
  template void launch_input_grad_stride2<scalar_t>(const scalar_t*, const scalar_t*, scalar_t*, int64_t, int, int, \
                                                    int, int, int, int, cudaStream_t);                              \
  template void launch_weight_grad<scalar_t, at::opmath_type<scalar_t>>(                                            \
      const scalar_t*, const scalar_t*, at::opmath_type<scalar_t>*, at::opmath_type<scalar_t>*, int, int, int, int,  \
      int, int, int, int, int, cudaStream_t);
FAT_DWCONV_INSTANTIATE(float)
FAT_DWCONV_INSTANTIATE(double)
FAT_DWCONV_INSTANTIATE(c10::Half)
FAT_DWCONV_INSTANTIATE(c10::BFloat16)
#undef FAT_DWCONV_INSTANTIATE

}  // namespace fat_dwconv
