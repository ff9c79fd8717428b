// CUDA driver of the augment op (per-pixel math: augment.h; checks and descriptors: augment_host.h).
//
// Note [CUDA augment launch]:
// One block per (output row, sample); a thread makes the C values of one output pixel at a time
// (columns x = threadIdx.x, + blockDim.x, ...), so the stores of each channel plane are coalesced.
// The per-sample descriptors travel in the kernel's parameter space (__grid_constant__), kMaxImages
// samples per launch: no host-to-device copy, nothing to allocate but the output.
// Contrast needs each sample's mean gray level after brightness. When some sample has a contrast
// factor != 1, a first kernel computes the same pixels without storing them and writes one sum per
// (sample, row); the second kernel's blocks add up their sample's row sums (one warp, in double) and
// then make and store the pixels. Recomputing the pixels costs reads of the (L2-resident) source
// crop instead of a write and a read of the float output, which is what bounds this op on a GPU.
// With antialias each pixel averages its window of source pixels (recomputing the window's weights,
// cheap next to the loads), in the order of the CPU driver (augment.h, Note [bilinear order]).
// uint8 and float32 inputs share the kernels: every source load branches on the launch's input type,
// the same for every thread (no divergence), instead of doubling the kernels' instantiations.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "fusedtrain/augment.h"
#include "fusedtrain/augment_host.h"
#include "fusedtrain/cuda_arch.h"

namespace fusedtrain {
namespace augment {
namespace {

constexpr int kMaxImages = 128;
constexpr int kMaxThreads = 256;

struct LaunchImage {
  const void* data;
  int64_t stride_c, stride_h, stride_w;
  int32_t top, left, height, width;
  int32_t flip;
  SampleJitter jitter;
};

struct LaunchArgs {
  LaunchImage img[kMaxImages];
  Normalize norm;
  int32_t out_h, out_w;
  int32_t antialias;
  int32_t float_input;  // float32 images (else uint8)
  void* out;        // output of the launch's first sample
  double* row_sum;  // (samples of this launch, out_h)
};

// The source value at element offset `o` of the image, as float.
__device__ __forceinline__ float load(const LaunchImage& im, int32_t float_input, int64_t o) {
  return float_input ? __ldg(static_cast<const float*>(im.data) + o)
                     : static_cast<float>(__ldg(static_cast<const uint8_t*>(im.data) + o));
}

// Bilinear sample of channel values at output pixel (y, x), in the order of Note [bilinear order].
template <int C>
__device__ __forceinline__ void sample_pixel(const LaunchImage& im, int32_t fl, const Tap& ty, int32_t x,
                                             int32_t out_w, float* v) {
  const int32_t xs = im.flip ? out_w - 1 - x : x;
  const Tap tx = linear_tap(xs, out_w, im.width);
  const int64_t r0 = (im.top + ty.i0) * im.stride_h + im.left * im.stride_w;
  const int64_t r1 = (im.top + ty.i1) * im.stride_h + im.left * im.stride_w;
  const int64_t a = tx.i0 * im.stride_w, b = tx.i1 * im.stride_w;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int64_t o = c * im.stride_c;
    const float col0 = lerp2(load(im, fl, r0 + o + a), load(im, fl, r1 + o + a), ty.w0, ty.w1);
    const float col1 = lerp2(load(im, fl, r0 + o + b), load(im, fl, r1 + o + b), ty.w0, ty.w1);
    v[c] = lerp2(col0, col1, tx.w0, tx.w1);
  }
}

// The same with antialias=True: the window of source rows `wy` (uniform across the block) and the
// window of source columns of this pixel, in the order of the CPU driver: per source column the
// weighted sum over the rows (taps in order, from 0), then the weighted sum of those over the columns.
template <int C>
__device__ __forceinline__ void sample_pixel_aa(const LaunchImage& im, int32_t fl, const AaAxis& ay,
                                                const AaWindow& wy, int32_t x, int32_t out_w, float* v) {
  const int32_t xs = im.flip ? out_w - 1 - x : x;
  const AaAxis ax = aa_axis(im.width, out_w);
  const AaWindow wx = aa_window(ax, xs, im.width);
  const int64_t base = (im.top + wy.start) * im.stride_h + (im.left + wx.start) * im.stride_w;
#pragma unroll
  for (int c = 0; c < C; ++c) v[c] = 0.f;
  for (int32_t jx = 0; jx < wx.count; ++jx) {
    const float wxj = aa_weight(ax, wx, jx);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t p = base + c * im.stride_c + jx * im.stride_w;
      float col = 0.f;
      for (int32_t jy = 0; jy < wy.count; ++jy) {
        col = col + aa_weight(ay, wy, jy) * load(im, fl, p + jy * im.stride_h);
      }
      v[c] = v[c] + wxj * col;
    }
  }
}

template <int C>
__device__ __forceinline__ void make_pixel(const LaunchArgs& args, const LaunchImage& im, const Tap& ty,
                                           const AaAxis& ay, const AaWindow& wy, int32_t x, float* v) {
  if (args.antialias) {
    sample_pixel_aa<C>(im, args.float_input, ay, wy, x, args.out_w, v);
  } else {
    sample_pixel<C>(im, args.float_input, ty, x, args.out_w, v);
  }
}

// Kernel 1: per (row, sample) the sum over the row of gray(brightness(pixel)) (or of the value, C == 1).
template <int C>
__global__ void __launch_bounds__(kMaxThreads) row_sum_kernel(const __grid_constant__ LaunchArgs args) {
  const LaunchImage& im = args.img[blockIdx.y];
  const int32_t out_h = args.out_h, out_w = args.out_w;
  const int32_t y = blockIdx.x;
  __shared__ float warp_sums[kMaxThreads / 32];
  float sum = 0.f;
  if (im.jitter.contrast != 1.f) {
    const Tap ty = linear_tap(y, out_h, im.height);
    const AaAxis ay = aa_axis(im.height, out_h);
    const AaWindow wy = args.antialias ? aa_window(ay, y, im.height) : AaWindow{};
    for (int32_t x = threadIdx.x; x < out_w; x += blockDim.x) {
      float v[C];
      make_pixel<C>(args, im, ty, ay, wy, x, v);
#pragma unroll
      for (int c = 0; c < C; ++c) v[c] = brightness(v[c], im.jitter);
      sum += contrast_source<C>(v);
    }
  }
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, d);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>((blockDim.x + 31) / 32); ++w) total += static_cast<double>(warp_sums[w]);
    args.row_sum[static_cast<int64_t>(blockIdx.y) * out_h + y] = total;
  }
}

// Kernel 2: make, jitter, normalize and store the pixels of one output row of one sample.
template <int C, typename OutT, bool SAT>
__global__ void __launch_bounds__(kMaxThreads) augment_kernel(const __grid_constant__ LaunchArgs args) {
  const LaunchImage& im = args.img[blockIdx.y];
  const int32_t out_h = args.out_h, out_w = args.out_w;
  const int32_t y = blockIdx.x;
  SampleJitter jit = im.jitter;
  const bool contrast = jit.contrast != 1.f;
  __shared__ double mean;
  if (contrast) {
    if (threadIdx.x < 32) {
      const double* rows = args.row_sum + static_cast<int64_t>(blockIdx.y) * out_h;
      double s = 0.0;
      for (int32_t k = threadIdx.x; k < out_h; k += 32) s += rows[k];
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) s += __shfl_down_sync(0xffffffffu, s, d);
      if (threadIdx.x == 0) mean = s / (static_cast<double>(out_h) * static_cast<double>(out_w));
    }
    __syncthreads();
    jit.contrast_rest = contrast_rest(jit.contrast, mean);
  }
  const Tap ty = linear_tap(y, out_h, im.height);
  const AaAxis ay = aa_axis(im.height, out_h);
  const AaWindow wy = args.antialias ? aa_window(ay, y, im.height) : AaWindow{};
  const int64_t plane = static_cast<int64_t>(out_h) * out_w;
  OutT* out = static_cast<OutT*>(args.out) + static_cast<int64_t>(blockIdx.y) * C * plane +
              static_cast<int64_t>(y) * out_w;
  for (int32_t x = threadIdx.x; x < out_w; x += blockDim.x) {
    float v[C];
    make_pixel<C>(args, im, ty, ay, wy, x, v);
#pragma unroll
    for (int c = 0; c < C; ++c) v[c] = brightness(v[c], jit);
    if (contrast) {
      finish_pixel<C, true, SAT>(v, jit, args.norm);
    } else {
      finish_pixel<C, false, SAT>(v, jit, args.norm);
    }
#pragma unroll
    for (int c = 0; c < C; ++c) out[c * plane + x] = static_cast<OutT>(v[c]);
  }
}

template <int C, typename OutT>
void launch_all(const Plan& plan, at::Tensor& out) {
  const int64_t n = static_cast<int64_t>(plan.samples.size());
  const int32_t out_h = static_cast<int32_t>(plan.out_h), out_w = static_cast<int32_t>(plan.out_w);
  const int threads = std::min<int>(kMaxThreads, static_cast<int>((out_w + 31) / 32 * 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor row_sum;
  if (plan.any_contrast) {
    row_sum = at::empty({std::min<int64_t>(n, kMaxImages), out_h}, out.options().dtype(at::kDouble));
  }
  OutT* out_base = out.data_ptr<OutT>();
  const int64_t sample_elems = static_cast<int64_t>(C) * out_h * out_w;
  static_assert(sizeof(LaunchArgs) <= 32764, "kernel parameters exceed the 32 KB limit");
  for (int64_t start = 0; start < n; start += kMaxImages) {
    const int count = static_cast<int>(std::min<int64_t>(kMaxImages, n - start));
    LaunchArgs args;
    bool contrast = false;
    for (int k = 0; k < count; ++k) {
      const ImageDesc& d = plan.images[start + k];
      const SampleDesc& s = plan.samples[start + k];
      args.img[k] = LaunchImage{d.data, d.stride_c, d.stride_h, d.stride_w, s.top, s.left, s.height, s.width,
                                s.flip, s.jitter};
      contrast = contrast || s.jitter.contrast != 1.f;
    }
    args.norm = plan.norm;
    args.out_h = out_h;
    args.out_w = out_w;
    args.antialias = plan.antialias ? 1 : 0;
    args.float_input = plan.float_input ? 1 : 0;
    args.out = out_base + start * sample_elems;
    args.row_sum = contrast ? row_sum.data_ptr<double>() : nullptr;
    const dim3 grid(static_cast<unsigned>(out_h), static_cast<unsigned>(count));
    if (contrast) {
      row_sum_kernel<C><<<grid, threads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (plan.any_saturation) {
      augment_kernel<C, OutT, true><<<grid, threads, 0, stream>>>(args);
    } else {
      augment_kernel<C, OutT, false><<<grid, threads, 0, stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

struct CudaDriver {
  template <int C, typename OutT>
  static void run(const Plan& plan, at::Tensor& out) {
    launch_all<C, OutT>(plan, out);
  }
};

at::Tensor augment_cuda(at::TensorList images, const at::Tensor& boxes, const at::Tensor& flips,
                        const at::Tensor& factors, at::IntArrayRef size, at::ArrayRef<double> mean,
                        at::ArrayRef<double> std, at::ScalarType out_dtype, bool antialias) {
  const Plan plan = make_plan(images, boxes, flips, factors, size, mean, std, out_dtype, antialias);
  cuda::check_device_arch(images[0].device());
  // One block row per output row: grid.x = out_h <= 32768 (make_plan), inside CUDA's grid limits.
  const c10::cuda::CUDAGuard guard(images[0].device());
  const int64_t n = static_cast<int64_t>(plan.samples.size());
  at::Tensor out = at::empty({n, plan.channels, plan.out_h, plan.out_w}, images[0].options().dtype(out_dtype));
  run_plan<CudaDriver>(plan, out, out_dtype);
  return out;
}

}  // namespace
}  // namespace augment
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("augment", &fusedtrain::augment::augment_cuda);
}
