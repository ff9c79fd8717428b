// CUDA driver of the dropout family: dropout (any group size: Dropout, Dropout2d, DropPath), its in-place
// form, bias-dropout-add forward and backward.
//
// Note [CUDA dropout kernel]:
// A grid-stride loop over vectors of E consecutive elements (E = 4 for float32/float64, 8 for the half
// types: one or two Philox blocks, a 16-byte load for float32 and the half types, two for float64). The
// thread computes the multipliers of its E elements from their indices (Note [fusedtrain random stream],
// philox.h; Note [dropout keep rule], dropout.h), loads the vector, multiplies in the opmath type and
// stores. With group > 1 (Dropout2d, DropPath) the decision index is element / group, computed with one
// 64-bit division per vector; a Philox block is recomputed only when the decision index leaves it.
// Misaligned pointers (views at odd offsets) and the tail take the scalar path. Inputs are made
// contiguous by the host code first (Note [dropout layouts] in dropout_host.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "fusedtrain/cuda_arch.h"
#include "fusedtrain/dropout.h"
#include "fusedtrain/dropout_host.h"
#include "fusedtrain/philox.h"

namespace fusedtrain {
namespace cuda {
namespace {

constexpr int kDropoutThreads = 256;

template <typename S>
struct VecWidth {
  static constexpr int value = sizeof(S) == 2 ? 8 : 4;
};

template <typename S, int E>
struct alignas(16) Vec {
  S v[E];
};

__device__ __forceinline__ uint32_t pick(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, uint64_t j) {
  return j == 0 ? w0 : (j == 1 ? w1 : (j == 2 ? w2 : w3));
}

// m[e] = multiplier of element i0 + e, for a vector start i0 that is a multiple of E (and of 4).
template <typename T, int E>
__device__ __forceinline__ void multipliers(const philox::Stream& s, const dropout::KeepRule<T>& rule, int64_t i0,
                                            int64_t group, T* m) {
  if (group == 1) {
#pragma unroll
    for (int b = 0; b < E / 4; ++b) {
      uint32_t w0, w1, w2, w3;
      s.block(static_cast<uint64_t>(i0 / 4 + b), w0, w1, w2, w3);
      m[4 * b + 0] = rule.multiplier(w0);
      m[4 * b + 1] = rule.multiplier(w1);
      m[4 * b + 2] = rule.multiplier(w2);
      m[4 * b + 3] = rule.multiplier(w3);
    }
    return;
  }
  uint64_t g = static_cast<uint64_t>(i0 / group);
  int64_t r = i0 - static_cast<int64_t>(g) * group;
  uint64_t cached = ~uint64_t(0);
  uint32_t w0 = 0, w1 = 0, w2 = 0, w3 = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if ((g >> 2) != cached) {
      cached = g >> 2;
      s.block(cached, w0, w1, w2, w3);
    }
    m[e] = rule.multiplier(pick(w0, w1, w2, w3, g & 3));
    if (++r == group) {
      r = 0;
      ++g;
    }
  }
}

// y = x * multiplier(i / group); x may equal y (in place).
template <typename S, int E>
__global__ void __launch_bounds__(kDropoutThreads)
    dropout_kernel(const S* x, S* y, int64_t n, philox::StreamArg stream, dropout::KeepRule<at::opmath_type<S>> rule,
                   int64_t group, bool aligned) {
  using T = at::opmath_type<S>;
  const philox::Stream s = stream.get();  // Note [device seed]
  const int64_t nvec = (n + E - 1) / E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const int64_t i0 = v * E;
    T m[E];
    multipliers<T, E>(s, rule, i0, group, m);
    if (aligned && i0 + E <= n) {
      Vec<S, E> a = reinterpret_cast<const Vec<S, E>*>(x)[v];
#pragma unroll
      for (int e = 0; e < E; ++e) a.v[e] = static_cast<S>(static_cast<T>(a.v[e]) * m[e]);
      reinterpret_cast<Vec<S, E>*>(y)[v] = a;
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (i0 + e < n) y[i0 + e] = static_cast<S>(static_cast<T>(x[i0 + e]) * m[e]);
      }
    }
  }
}

// out = residual + (x + bias[i % H]) * multiplier(i).
template <typename S, int E>
__global__ void __launch_bounds__(kDropoutThreads)
    bias_dropout_add_kernel(const S* x, const at::opmath_type<S>* bias, const S* res, S* out, int64_t n, int64_t H,
                            philox::StreamArg stream, dropout::KeepRule<at::opmath_type<S>> rule, bool aligned) {
  using T = at::opmath_type<S>;
  const philox::Stream s = stream.get();  // Note [device seed]
  const int64_t nvec = (n + E - 1) / E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const int64_t i0 = v * E;
    T m[E];
    multipliers<T, E>(s, rule, i0, 1, m);
    T b[E];
    int64_t col = i0 % H;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      b[e] = bias[col];
      if (++col == H) col = 0;
    }
    if (aligned && i0 + E <= n) {
      const Vec<S, E> xa = reinterpret_cast<const Vec<S, E>*>(x)[v];
      const Vec<S, E> ra = reinterpret_cast<const Vec<S, E>*>(res)[v];
      Vec<S, E> o;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        o.v[e] = static_cast<S>(
            dropout::bias_dropout_add(static_cast<T>(xa.v[e]), b[e], static_cast<T>(ra.v[e]), m[e]));
      }
      reinterpret_cast<Vec<S, E>*>(out)[v] = o;
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (i0 + e < n) {
          out[i0 + e] = static_cast<S>(
              dropout::bias_dropout_add(static_cast<T>(x[i0 + e]), b[e], static_cast<T>(res[i0 + e]), m[e]));
        }
      }
    }
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// One wave of resident blocks (the occupancy the compiled kernel allows), fewer for small inputs; the
// grid-stride loop covers the rest. Each kernel instantiation has its own signature, so the
// function-local cache is per kernel (occupancy depends only on the compiled kernel).
template <typename Kernel>
unsigned grid_for(Kernel kernel, int64_t nvec, const at::Tensor& t) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, t.device().index()));
  static const int per_sm = [kernel] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kDropoutThreads, 0));
    return blocks;
  }();
  const int64_t want = (nvec + kDropoutThreads - 1) / kDropoutThreads;
  const int64_t cap = static_cast<int64_t>(sm_count) * std::max(per_sm, 1);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap)));
}

void run_dropout(const at::Tensor& x, const at::Tensor& y, int64_t group, const philox::StreamArg& s, double p,
                 bool rescale) {
  check_device_arch(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedtrain_dropout_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    constexpr int E = VecWidth<scalar_t>::value;
    const auto rule = dropout::make_rule<T>(p, rescale);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t nvec = (n + E - 1) / E;
    dropout_kernel<scalar_t, E><<<grid_for(&dropout_kernel<scalar_t, E>, nvec, x), kDropoutThreads, 0, stream>>>(
        xp, yp, n, s, rule, group, aligned16(xp) && aligned16(yp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct Run {
  static void run(const at::Tensor& x, const at::Tensor& y, int64_t group, const philox::StreamArg& s, double p,
                  bool rescale) {
    run_dropout(x, y, group, s, p, rescale);
  }
};

at::Tensor bias_dropout_add_cuda(const at::Tensor& input, const at::Tensor& bias, const at::Tensor& residual,
                                 const at::Tensor& seed, int64_t offset, double p) {
  check_device_arch(input.device());
  const host::BiasDropoutAdd a = host::prepare_bias_dropout_add(input, bias, residual, seed, offset, p);
  const philox::StreamArg& s = a.s;
  const at::Tensor& x = a.x;
  const at::Tensor& r = a.r;
  at::Tensor out = a.out;
  const int64_t n = a.n;
  if (n == 0) return out;
  const int64_t H = a.H;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedtrain_bias_dropout_add_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    constexpr int E = VecWidth<scalar_t>::value;
    const auto rule = dropout::make_rule<T>(p, true);
    const at::Tensor b = bias.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t nvec = (n + E - 1) / E;
    bias_dropout_add_kernel<scalar_t, E><<<grid_for(&bias_dropout_add_kernel<scalar_t, E>, nvec, x),
                                           kDropoutThreads, 0, stream>>>(
        xp, b.const_data_ptr<T>(), rp, op, n, H, s, rule, aligned16(xp) && aligned16(rp) && aligned16(op));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// grad_input by the dropout kernel; grad_bias by one extra reduction over grad_input (torch's sum, in
// the opmath type), unlike the CPU, which fuses it (Note [fused bias gradient] in cpu/dropout.cpp).
std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward_cuda(const at::Tensor& grad, const at::Tensor& seed,
                                                                  int64_t offset, double p, int64_t bias_numel) {
  check_device_arch(grad.device());
  const philox::StreamArg s = host::check_bias_dropout_add_backward(grad, seed, offset, p, bias_numel);
  const at::Tensor g = grad.contiguous();
  at::Tensor gx = at::empty(g.sizes(), g.options());
  run_dropout(g, gx, 1, s, p, true);
  if (bias_numel == 0) return std::make_tuple(gx, at::empty({0}, g.options()));  // reshape({-1, 0}) is ambiguous
  const at::ScalarType acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gb = at::sum(gx.reshape({-1, bias_numel}), {0}, false, acc).to(g.scalar_type());
  return std::make_tuple(gx, gb);
}

}  // namespace
}  // namespace cuda
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("dropout", &fusedtrain::host::dropout_impl<fusedtrain::cuda::Run>);
  m.impl("dropout_", &fusedtrain::host::dropout_inplace_impl<fusedtrain::cuda::Run>);
  m.impl("bias_dropout_add", &fusedtrain::cuda::bias_dropout_add_cuda);
  m.impl("bias_dropout_add_backward", &fusedtrain::cuda::bias_dropout_add_backward_cuda);
}
