// CUDA driver of fusedtrain::total_norm: a persistent grid over the chunks of all tensors (the tensor
// table of cuda_launcher.cuh), one double partial per block added into a zeroed buffer, then one block
// combines the partials in a fixed order (Note [norm accumulation]): deterministic, no atomics, no host
// synchronisation, capturable in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "fusedtrain/cuda_arch.h"
#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/norm_host.h"

namespace fusedtrain {
namespace cuda {
namespace {

constexpr int kNormThreads = 512;

template <norm::Kind K>
__device__ double block_combine(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kNormThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] = norm::combine(shared[threadIdx.x], shared[threadIdx.x + s], K);
    __syncthreads();
  }
  return shared[0];
}

template <typename S, norm::Kind K>
__global__ void __launch_bounds__(kNormThreads) norm_partials(const __grid_constant__ TensorTable<1> table, double p,
                                                              double* partials) {
  __shared__ double shared[kNormThreads];
  double acc = 0.0;
  const int32_t total = table.chunk_end[table.count - 1];
  for (int32_t c = blockIdx.x; c < total; c += gridDim.x) {
    int64_t start, len;
    const int t = find_chunk(table, c, &start, &len);
    const S* x = static_cast<const S*>(table.ptr[0][t]) + start;
    // A chunk gives each thread kChunk / kNormThreads = 32 elements: summed in the opmath type, then
    // added in double (Note [norm accumulation]).
    using A = at::opmath_type<S>;
    A run = A(0);
    for (int64_t i = threadIdx.x; i < len; i += kNormThreads) run = norm::combine(run, norm::term(A(x[i]), K, p), K);
    acc = norm::combine(acc, static_cast<double>(run), K);
  }
  const double block = block_combine<K>(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = norm::combine(partials[blockIdx.x], block, K);
}

template <typename R, norm::Kind K>
__global__ void __launch_bounds__(kNormThreads) norm_finish(const double* partials, int n, double p, R* out) {
  __shared__ double shared[kNormThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += kNormThreads) acc = norm::combine(acc, partials[i], K);
  const double total = block_combine<K>(acc, shared);
  if (threadIdx.x == 0) *out = static_cast<R>(norm::finish(total, K, p));
}

template <typename S, norm::Kind K>
void reduce(const host::NormWork& work, double p, at::Tensor& out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, out.device().index()));
  const int grid = sm_count * 4;
  at::Tensor partials = at::zeros({grid}, out.options().dtype(at::kDouble));
  double* part = partials.data_ptr<double>();
  TensorTable<1> table;
  table.count = 0;
  int64_t chunks = 0;
  auto flush = [&] {
    if (table.count == 0) return;
    norm_partials<S, K><<<grid, kNormThreads, 0, stream>>>(table, p, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table.count = 0;
    chunks = 0;
  };
  for (size_t i = 0; i < work.numel.size(); ++i) {
    const int64_t tensor_chunks = (work.numel[i] + kChunk - 1) / kChunk;
    if (table.count == TensorTable<1>::kMax || chunks + tensor_chunks > INT32_MAX) flush();
    table.ptr[0][table.count] = const_cast<void*>(work.ptr[i]);
    table.numel[table.count] = work.numel[i];
    chunks += tensor_chunks;
    table.chunk_end[table.count] = static_cast<int32_t>(chunks);
    ++table.count;
  }
  flush();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fusedtrain_norm_out", [&] {
    norm_finish<scalar_t, K><<<1, kNormThreads, 0, stream>>>(part, grid, p, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor total_norm_cuda(at::TensorList tensors, double norm_type) {
  const host::NormWork work = host::prepare_norm(tensors, norm_type);
  check_device_arch(tensors[0].device());
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  at::Tensor out = host::norm_output(tensors[0]);
  if (work.numel.empty()) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "fusedtrain_norm", [&] {
    switch (norm::kind_of(norm_type)) {
      case norm::kL1: reduce<scalar_t, norm::kL1>(work, norm_type, out); break;
      case norm::kL2: reduce<scalar_t, norm::kL2>(work, norm_type, out); break;
      case norm::kInf: reduce<scalar_t, norm::kInf>(work, norm_type, out); break;
      default: reduce<scalar_t, norm::kP>(work, norm_type, out); break;
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) { m.impl("total_norm", &fusedtrain::cuda::total_norm_cuda); }
