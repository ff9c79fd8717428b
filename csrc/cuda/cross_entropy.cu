// CUDA driver of the fused softmax cross-entropy (Note [fused cross-entropy] in cross_entropy.h).
//
// Note [CUDA cross-entropy kernel]:
// One block per row: (1) a block maximum, (2) a block sum of e = exp(x - m) (and, with label smoothing, of
// x - m), both reduced in shared memory in a fixed order (deterministic), thread 0 writes the row's loss;
// (3) each thread writes the gradient of its elements, recomputing e (cheaper than a round trip to memory on a
// GPU). A first one-block kernel counts the non-ignored targets into device memory (read by the row kernel for
// 'mean': no host synchronisation) and asserts each target is in range on the device, as torch's nll_loss
// does (a device-side assert, reported at the next synchronisation). The reduction of the row losses is
// torch's sum (in double), divided by the count on the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "fusedtrain/cross_entropy.h"
#include "fusedtrain/cross_entropy_host.h"
#include "fusedtrain/cuda_arch.h"

namespace fusedtrain {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kScaleThreads = 256;

struct MaxOp {
  template <typename A>
  __device__ A operator()(A a, A b) const {
    return b > a ? b : a;
  }
};
struct SumOp {
  template <typename A>
  __device__ A operator()(A a, A b) const {
    return a + b;
  }
};

// A fixed-order tree over the block's threads; every thread gets the result.
template <int Threads, typename A, typename Op>
__device__ A block_reduce(A v, A* shared, Op op) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = Threads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + s]);
    __syncthreads();
  }
  const A result = shared[0];
  __syncthreads();  // the buffer is reused by the next reduction
  return result;
}

__global__ void __launch_bounds__(kRowThreads) count_targets_kernel(const int64_t* target, int64_t n, int64_t classes,
                                                                    int64_t ignore_index, int64_t* count) {
  __shared__ int64_t shared[kRowThreads];
  int64_t local = 0;
  for (int64_t r = threadIdx.x; r < n; r += kRowThreads) {
    const int64_t t = target[r];
    if (t == ignore_index) continue;
    CUDA_KERNEL_ASSERT(t >= 0 && t < classes && "fusedtrain.cross_entropy: target out of bounds");
    ++local;
  }
  const int64_t total = block_reduce<kRowThreads>(local, shared, SumOp{});
  if (threadIdx.x == 0) *count = total;
}

template <typename S>
__global__ void __launch_bounds__(kRowThreads)
    rows_kernel(const S* x, int64_t stride, const int64_t* target, int64_t classes, int64_t ignore_index,
                at::opmath_type<S> eps, int reduction, const int64_t* count, S* grad,
                at::opmath_type<S>* rows) {
  using A = at::opmath_type<S>;
  __shared__ A shared[kRowThreads];
  const int64_t r = blockIdx.x;
  const int64_t t = target[r];
  S* g = grad != nullptr ? grad + r * classes : nullptr;
  if (t == ignore_index) {
    if (threadIdx.x == 0) rows[r] = A(0);
    if (g != nullptr)
      for (int64_t c = threadIdx.x; c < classes; c += kRowThreads) g[c] = S(0);
    return;
  }
  const S* xr = x + r * stride;
  A m = -INFINITY;
  for (int64_t c = threadIdx.x; c < classes; c += kRowThreads) m = MaxOp{}(m, static_cast<A>(xr[c]));
  m = block_reduce<kRowThreads>(m, shared, MaxOp{});
  A s = A(0), sum_d = A(0);
  for (int64_t c = threadIdx.x; c < classes; c += kRowThreads) {
    const A d = static_cast<A>(xr[c]) - m;
    s += xent::exp_shifted(d);
    sum_d += d;
  }
  s = block_reduce<kRowThreads>(s, shared, SumOp{});
  if (eps != A(0)) sum_d = block_reduce<kRowThreads>(sum_d, shared, SumOp{});
  const A classes_a = static_cast<A>(classes);
  if (threadIdx.x == 0) rows[r] = xent::row_loss(::log(s), static_cast<A>(xr[t]) - m, sum_d, eps, classes_a);
  if (g == nullptr) return;
  const xent::Coef<A> k = xent::coef(xent::row_weight<A>(reduction, *count), s, eps, A(1) / classes_a);
  for (int64_t c = threadIdx.x; c < classes; c += kRowThreads) {
    const A e = xent::exp_shifted(static_cast<A>(xr[c]) - m);
    g[c] = static_cast<S>(xent::grad(e, k, c == t ? k.hit : A(0)));
  }
}

template <typename S>
__global__ void __launch_bounds__(kScaleThreads)
    scale_kernel(const S* grad, const at::opmath_type<S>* go, bool per_row, int64_t classes, int64_t n, S* out) {
  using A = at::opmath_type<S>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kScaleThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kScaleThreads) {
    const A f = go[per_row ? i / classes : 0];
    out[i] = static_cast<S>(xent::scale(static_cast<A>(grad[i]), f));
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cuda(const at::Tensor& input, const at::Tensor& target,
                                                      double label_smoothing, int64_t ignore_index,
                                                      c10::string_view reduction, bool compute_grad) {
  check_device_arch(input.device());
  const host::CrossEntropyArgs a =
      host::prepare_cross_entropy(input, target, label_smoothing, std::string(reduction));
  const int64_t N = a.n, C = a.classes;
  TORCH_CHECK(N <= INT32_MAX, "fusedtrain.cross_entropy: at most 2^31 - 1 rows on CUDA, got ", N);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = host::loss_dtype(input.scalar_type());
  at::Tensor rows = at::empty({N}, input.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty({N, C}, input.options().memory_format(at::MemoryFormat::Contiguous))
                                 : at::empty({0}, input.options());
  at::Tensor count = at::empty({}, input.options().dtype(at::kLong));
  count_targets_kernel<<<1, kRowThreads, 0, stream>>>(a.target.const_data_ptr<int64_t>(), N, C, ignore_index,
                                                      count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedtrain_cross_entropy_cuda",
                                    [&] {
      using A = at::opmath_type<scalar_t>;
      rows_kernel<scalar_t><<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(
          a.x.const_data_ptr<scalar_t>(), a.row_stride, a.target.const_data_ptr<int64_t>(), C, ignore_index,
          static_cast<A>(label_smoothing), a.reduction, count.const_data_ptr<int64_t>(),
          compute_grad ? grad.data_ptr<scalar_t>() : nullptr, rows.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (a.reduction == xent::kNone) return std::make_tuple(rows, grad);
  at::Tensor total = at::sum(rows, at::kDouble);
  if (a.reduction == xent::kMean) total = total / count.to(at::kDouble);  // 0 / 0 = nan: every target ignored
  return std::make_tuple(total.to(acc), grad);
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_device_arch(grad.device());
  host::check_cross_entropy_backward(grad, grad_output);
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty_like(grad, at::MemoryFormat::Contiguous);
  const int64_t n = grad.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fusedtrain_xent_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor go = grad_output.to(c10::CppTypeToScalarType<A>::value).contiguous();
    const int64_t blocks = std::min<int64_t>((n + kScaleThreads - 1) / kScaleThreads, 65535);
    scale_kernel<scalar_t><<<static_cast<unsigned>(blocks), kScaleThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), go.const_data_ptr<A>(), grad_output.numel() != 1, grad.size(1), n,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("cross_entropy", &fusedtrain::cuda::cross_entropy_cuda);
  m.impl("cross_entropy_backward", &fusedtrain::cuda::cross_entropy_backward_cuda);
}
