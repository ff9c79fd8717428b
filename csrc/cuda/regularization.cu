// CUDA driver of the regularization penalty (Note [penalty convention] in regularization.h).
//
// Note [CUDA penalty reduction]:
// The tensors travel in the launcher's __grid_constant__ tensor table (cuda_launcher.cuh) cut into chunks
// of kChunk elements; a fixed grid strides over the chunks, each thread sums |x| and x^2 of its elements
// in the opmath type, each block reduces its threads in a fixed tree and writes its two partial sums, and
// torch's sum adds the blocks' partials. No atomics: the value is reproducible. The backward pass is the
// shared multi-tensor launcher with PenaltyGradScalePtrOp, which reads the incoming gradient from device
// memory (no host synchronization).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "fusedtrain/cuda_arch.h"
#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/dropout_host.h"
#include "fusedtrain/optim_host.h"
#include "fusedtrain/regularization.h"

namespace fusedtrain {
namespace cuda {
namespace {

constexpr int kReduceThreads = 512;

template <typename S>
__global__ void __launch_bounds__(kReduceThreads)
    penalty_kernel(const __grid_constant__ TensorTable<1> table, at::opmath_type<S>* partial) {
  using T = at::opmath_type<S>;
  __shared__ T sh_abs[kReduceThreads];
  __shared__ T sh_sq[kReduceThreads];
  T a = T(0), q = T(0);
  const int32_t total = table.chunk_end[table.count - 1];
  for (int32_t c = blockIdx.x; c < total; c += gridDim.x) {
    int lo = 0, hi = table.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (table.chunk_end[mid] > c) hi = mid;
      else lo = mid + 1;
    }
    const int t = lo;
    const int64_t start = static_cast<int64_t>(c - (t > 0 ? table.chunk_end[t - 1] : 0)) * kChunk;
    const int64_t len = min(kChunk, table.numel[t] - start);
    const S* p = static_cast<const S*>(table.ptr[0][t]) + start;
    for (int64_t i = threadIdx.x; i < len; i += kReduceThreads) {
      const T v = static_cast<T>(p[i]);
      a += regularization::abs_term(v);
      q += regularization::square_term(v);
    }
  }
  sh_abs[threadIdx.x] = a;
  sh_sq[threadIdx.x] = q;
  __syncthreads();
  for (int w = kReduceThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      sh_abs[threadIdx.x] += sh_abs[threadIdx.x + w];
      sh_sq[threadIdx.x] += sh_sq[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = sh_abs[0];
    partial[gridDim.x + blockIdx.x] = sh_sq[0];
  }
}

at::Tensor penalty_cuda(at::TensorList params, double l1, double l2) {
  host::check_penalty_params("penalty", params);
  check_device_arch(params[0].device());
  const at::ScalarType dtype = params[0].scalar_type();
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> dense;
  for (const at::Tensor& p : params) {
    if (p.numel() > 0) dense.push_back(p.contiguous());
  }
  std::vector<at::Tensor> sums;  // [2] per launch: (sum |x|, sum x^2)
  if (!dense.empty()) {
    int sm_count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, params[0].device().index()));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedtrain_penalty_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      TensorTable<1> table;
      table.count = 0;
      int64_t chunks = 0;
      auto flush = [&] {
        if (table.count == 0) return;
        const int64_t grid = std::min<int64_t>(chunks, static_cast<int64_t>(sm_count) * 4);
        at::Tensor partial = at::empty({2, grid}, params[0].options().dtype(acc));
        penalty_kernel<scalar_t><<<static_cast<unsigned>(grid), kReduceThreads, 0, stream>>>(table,
                                                                                            partial.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        sums.push_back(partial.sum(1));
        table.count = 0;
        chunks = 0;
      };
      for (const at::Tensor& t : dense) {
        const int64_t tensor_chunks = (t.numel() + kChunk - 1) / kChunk;
        if (table.count == TensorTable<1>::kMax || chunks + tensor_chunks > INT32_MAX) flush();
        table.ptr[0][table.count] = const_cast<void*>(t.const_data_ptr());
        table.numel[table.count] = t.numel();
        chunks += tensor_chunks;
        table.chunk_end[table.count] = static_cast<int32_t>(chunks);
        ++table.count;
      }
      flush();
    });
  }
  at::Tensor both = sums.empty() ? at::zeros({2}, params[0].options().dtype(acc))
                                 : (sums.size() == 1 ? sums[0] : at::stack(sums).sum(0));
  // A zero coefficient drops its term (so l1 = 0 with an infinite parameter gives inf, not NaN).
  at::Tensor value = at::zeros({}, both.options());
  if (l1 != 0.0) value = value + both[0] * l1;
  if (l2 != 0.0) value = value + both[1] * l2;
  return value;
}

std::vector<at::Tensor> penalty_backward_cuda(at::TensorList params, const at::Tensor& grad, double l1, double l2) {
  host::check_penalty_params("penalty_backward", params);
  check_device_arch(params[0].device());
  TORCH_CHECK(grad.numel() == 1, "fusedtrain.penalty_backward: grad must have one element (got ", grad.sizes(), ")");
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const at::Tensor& p : params) outs.push_back(at::empty(p.sizes(), p.options()));
  Work work = host::prepare({outs, params}, {});
  if (work.size() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fusedtrain_penalty_bwd_cuda",
                                    [&] {
                                      using T = at::opmath_type<scalar_t>;
                                      const at::Tensor scale =
                                          grad.to(params[0].device(), c10::CppTypeToScalarType<T>::value).reshape({});
                                      multi_tensor_apply<Uniform<scalar_t>>(
                                          work, regularization::PenaltyGradScalePtrOp<T>{
                                                    static_cast<T>(l1), static_cast<T>(2.0 * l2),
                                                    scale.const_data_ptr<T>()});
                                    });
    for (auto& [original, temp] : work.copy_back) original.copy_(temp);
  }
  return outs;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("penalty", &fusedtrain::cuda::penalty_cuda);
  m.impl("penalty_backward", &fusedtrain::cuda::penalty_backward_cuda);
}
