// Weight and bias gradients of a depthwise convolution on CPU, channels_last (NHWC) fp32.
//
// oneDNN's depthwise weight gradient runs at a few GMAC/s on CPU (205 ms for FAT-B0's stage-0 FFN
// conv at batch 32, 7x its forward). Here each output pixel's gradient vector is multiplied into the
// k x k input pixels it saw, channel vectors contiguous, accumulating into a per-thread k x k x C
// block small enough for the L1/L2 cache; threads split the output rows and their blocks are summed.
//
// Plain C ABI (loaded with ctypes): no torch headers, so it builds in about a second with any C++
// compiler. Returns 0, or -1 when an argument is out of range.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kChannelBlock = 64;  // accumulators per block: k*k*64 floats (6.4 KB for k = 5)

struct Shape {
  int64_t batch, height, width, channels, out_height, out_width, kernel, stride, pad;
};

// Accumulate rows [row_begin, row_end) of the output (row = n * out_height + oh) into
// grad_w (kernel x kernel x channels) and grad_b (channels).
void accumulate_rows(const float* x, const float* grad_out, const Shape& s, int64_t row_begin,
                     int64_t row_end, float* grad_w, float* grad_b) {
  const int64_t C = s.channels, k = s.kernel;
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
    const int64_t cn = std::min(kChannelBlock, C - c0);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t n = row / s.out_height, oh = row % s.out_height;
      const float* g_row = grad_out + (row * s.out_width) * C + c0;
      for (int64_t ow = 0; ow < s.out_width; ++ow) {
        const float* g = g_row + ow * C;
        float* b = grad_b + c0;
#pragma GCC ivdep
        for (int64_t c = 0; c < cn; ++c) b[c] += g[c];
      }
      for (int64_t i = 0; i < k; ++i) {
        const int64_t ih = oh * s.stride + i - s.pad;
        if (ih < 0 || ih >= s.height) continue;
        const float* x_row = x + ((n * s.height + ih) * s.width) * C + c0;
        float* acc_i = grad_w + i * k * C + c0;
        for (int64_t ow = 0; ow < s.out_width; ++ow) {
          const float* g = g_row + ow * C;
          const int64_t iw0 = ow * s.stride - s.pad;
          const int64_t j_begin = std::max<int64_t>(0, -iw0), j_end = std::min(k, s.width - iw0);
          for (int64_t j = j_begin; j < j_end; ++j) {
            const float* xv = x_row + (iw0 + j) * C;
            float* acc = acc_i + j * C;
#pragma GCC ivdep
            for (int64_t c = 0; c < cn; ++c) acc[c] += g[c] * xv[c];
          }
        }
      }
    }
  }
}

}  // namespace

extern "C" int fat_dwconv_weight_bias_grad_nhwc(const float* x, const float* grad_out, float* grad_w,
                                                 float* grad_b, int64_t batch, int64_t height, int64_t width,
                                                 int64_t channels, int64_t out_height, int64_t out_width,
                                                 int64_t kernel, int64_t stride, int64_t pad,
                                                 int64_t num_threads) {
  if (batch < 0 || height <= 0 || width <= 0 || channels <= 0 || out_height < 0 || out_width < 0 ||
      kernel <= 0 || stride <= 0 || pad < 0 || num_threads <= 0)
    return -1;
  const Shape s{batch, height, width, channels, out_height, out_width, kernel, stride, pad};
  const int64_t rows = batch * out_height, w_size = kernel * kernel * channels;
  const int64_t threads = std::max<int64_t>(1, std::min(num_threads, rows));
  std::fill(grad_w, grad_w + w_size, 0.f);
  std::fill(grad_b, grad_b + channels, 0.f);
  if (threads == 1) {
    accumulate_rows(x, grad_out, s, 0, rows, grad_w, grad_b);
    return 0;
  }
  // Thread t sums rows [t * rows / threads, (t + 1) * rows / threads) into its own block; fixed
  // split and fixed summation order, so the result does not depend on timing.
  std::vector<float> partial(threads * (w_size + channels), 0.f);
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      float* w = partial.data() + t * (w_size + channels);
      accumulate_rows(x, grad_out, s, t * rows / threads, (t + 1) * rows / threads, w, w + w_size);
    });
  }
  for (auto& th : pool) th.join();
  for (int64_t t = 0; t < threads; ++t) {
    const float* w = partial.data() + t * (w_size + channels);
    for (int64_t e = 0; e < w_size; ++e) grad_w[e] += w[e];
    for (int64_t c = 0; c < channels; ++c) grad_b[c] += w[w_size + c];
  }
  return 0;
}
