// The one CUDA multi-tensor launcher: every optimizer (and later EMA) runs through multi_tensor_apply.
//
// Note [CUDA launch shape]:
// - Tensor addresses travel in the kernel's parameter space (up to ~32 KB since CUDA 12.1 on sm_70+),
//   passed as a __grid_constant__ struct, so one launch carries hundreds of tensors with no host-to-device
//   copy and nothing to allocate: the launch can be captured in a CUDA graph.
// - Each tensor is cut into chunks of kChunk elements. A persistent grid (as many blocks as fit on the
//   device at once) strides over the global chunk index; a block finds the chunk's tensor by binary
//   search over the cumulative chunk counts (uniform across the block, served by the constant cache).
// - Inside a chunk each thread moves 16-byte vectors (4 floats, 8 halves, 2 doubles) of all D tensors,
//   converts them to opmath registers, runs the math.h functor, and stores the mutated ones back.
//   Chunks start at multiples of kChunk elements, so alignment of a tensor's base address decides the
//   vector path for all its chunks; misaligned tensors (views at odd offsets) take a scalar loop.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "fusedtrain/work.h"

namespace fusedtrain {
namespace cuda {

constexpr int kThreads = 512;
#ifndef FUSEDTRAIN_CUDA_ILP
#define FUSEDTRAIN_CUDA_ILP 2
#endif
constexpr int kIlp = FUSEDTRAIN_CUDA_ILP;  // vectors in flight per thread (benchmarks/NOTES.md)
constexpr int64_t kChunk = 16384;  // elements; a multiple of every vector width
constexpr int kArgBytes = 31 * 1024;  // kernel parameter budget for the tensor table (limit: 32764 B)

template <int D>
struct TensorTable {
  static constexpr int kMax = (kArgBytes - 16 - static_cast<int>(sizeof(Scalars))) / (D * 8 + 8 + 16 + 4);
  void* ptr[D][kMax];
  int64_t numel[kMax];
  Scalar step[kMax];        // per-tensor step: a host value, or the device counter (capturable)
  int32_t chunk_end[kMax];  // cumulative chunk count up to and including tensor t
  int32_t count;
  Scalars scalars;
};

// The tensor and element range of global chunk c (binary search over the cumulative chunk counts;
// uniform across the block, served by the constant cache).
template <int D>
__device__ __forceinline__ int find_chunk(const TensorTable<D>& table, int32_t c, int64_t* start, int64_t* len) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (table.chunk_end[mid] > c) hi = mid;
    else lo = mid + 1;
  }
  *start = static_cast<int64_t>(c - (lo > 0 ? table.chunk_end[lo - 1] : 0)) * kChunk;
  *len = min(kChunk, table.numel[lo] - *start);
  return lo;
}

template <typename S, int N>
struct alignas(16) Pack {
  S v[N];
};

template <typename S, typename Op, int D>
__device__ __forceinline__ void element(S* const* p, int64_t i, const Op& op) {
  using T = at::opmath_type<S>;
  T r[D];
#pragma unroll
  for (int k = 0; k < D; ++k) r[k] = static_cast<T>(p[k][i]);
  op(r);
  p[0][i] = static_cast<S>(r[0]);
#pragma unroll
  for (int k = 2; k < D; ++k) p[k][i] = static_cast<S>(r[k]);
}

template <typename S, typename Op, int D>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const __grid_constant__ TensorTable<D> table,
                                                                const Op op_in) {
  using T = at::opmath_type<S>;
  constexpr int VEC = 16 / sizeof(S);
  // GradScaler found an inf/NaN: the whole update is skipped, decided on the device (no host sync).
  if (table.scalars.found_inf != nullptr && *table.scalars.found_inf != 0.0f) return;
  const int32_t total = table.chunk_end[table.count - 1];
  // bind() costs two double pow() for Adam; a block rebinds only when its chunk's values change (in the
  // usual case every tensor is at the same step: once per block).
  Op op = op_in;
  math::Bound bound{-1.0, 0.0, 0.0, 0.0};
  for (int32_t c = blockIdx.x; c < total; c += gridDim.x) {
    int64_t start, len;
    const int t = find_chunk(table, c, &start, &len);
    const math::Bound b = bound_for(table.scalars, table.step[t]);
    if (b.step != bound.step || b.lr != bound.lr || b.inv_scale != bound.inv_scale ||
        b.clip_coef != bound.clip_coef) {
      bound = b;
      op = op_in;
      op.bind(b);
    }
    S* p[D];
    bool aligned = true;
#pragma unroll
    for (int k = 0; k < D; ++k) {
      p[k] = static_cast<S*>(table.ptr[k][t]) + start;
      aligned = aligned && (reinterpret_cast<uintptr_t>(p[k]) % 16 == 0);
    }
    int64_t done = 0;
    if (aligned) {
      const int64_t nvec = len / VEC;
      // kIlp independent vectors per thread per round: all their loads are issued before the first use.
      for (int64_t v0 = threadIdx.x; v0 < nvec; v0 += kThreads * kIlp) {
        Pack<S, VEC> x[kIlp][D];
#pragma unroll
        for (int u = 0; u < kIlp; ++u) {
          const int64_t v = v0 + u * kThreads;
          if (v < nvec) {
#pragma unroll
            for (int k = 0; k < D; ++k) x[u][k] = reinterpret_cast<const Pack<S, VEC>*>(p[k])[v];
          }
        }
#pragma unroll
        for (int u = 0; u < kIlp; ++u) {
          const int64_t v = v0 + u * kThreads;
          if (v >= nvec) break;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            T r[D];
#pragma unroll
            for (int k = 0; k < D; ++k) r[k] = static_cast<T>(x[u][k].v[e]);
            op(r);
            x[u][0].v[e] = static_cast<S>(r[0]);
#pragma unroll
            for (int k = 2; k < D; ++k) x[u][k].v[e] = static_cast<S>(r[k]);
          }
          reinterpret_cast<Pack<S, VEC>*>(p[0])[v] = x[u][0];
#pragma unroll
          for (int k = 2; k < D; ++k) reinterpret_cast<Pack<S, VEC>*>(p[k])[v] = x[u][k];
        }
      }
      done = nvec * VEC;
    }
    for (int64_t i = done + threadIdx.x; i < len; i += kThreads) element<S, Op, D>(p, i, op);
  }
}

template <typename S, typename Op>
int blocks_per_sm() {
  // Function-local cache per kernel instantiation: occupancy depends only on the compiled kernel.
  static const int value = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, multi_tensor_kernel<S, Op, Op::depth>, kThreads, 0));
    return blocks > 0 ? blocks : 1;
  }();
  return value;
}

// Tuples of `work` are dense with equal strides (optim_host.h) and all on work.device.
template <typename S, typename Op>
void multi_tensor_apply(const Work& work, const Op& op) {
  constexpr int D = Op::depth;
  using Table = TensorTable<D>;
  static_assert(sizeof(Table) + sizeof(Op) <= 32764, "kernel parameters exceed the 32 KB limit");
  const c10::cuda::CUDAGuard guard(work.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, work.device.index()));
  const int64_t max_grid = static_cast<int64_t>(sm_count) * blocks_per_sm<S, Op>();

  Table table;
  table.count = 0;
  table.scalars = work.scalars;
  int64_t chunks = 0;
  auto flush = [&] {
    if (table.count == 0) return;
    const unsigned grid = static_cast<unsigned>(chunks < max_grid ? chunks : max_grid);
    multi_tensor_kernel<S, Op, D><<<grid, kThreads, 0, stream>>>(table, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table.count = 0;
    chunks = 0;
  };
  for (size_t i = 0; i < work.size(); ++i) {
    const int64_t numel = work.numel[i];
    const int64_t tensor_chunks = (numel + kChunk - 1) / kChunk;
    if (table.count == Table::kMax || chunks + tensor_chunks > INT32_MAX) flush();
    for (int k = 0; k < D; ++k) table.ptr[k][table.count] = work.ptr[i][k];
    table.numel[table.count] = numel;
    table.step[table.count] = work.step[i];
    chunks += tensor_chunks;
    table.chunk_end[table.count] = static_cast<int32_t>(chunks);
    ++table.count;
  }
  flush();
}

struct Backend {
  template <typename S, typename Op>
  static void apply(const Work& work, const Op& op) {
    multi_tensor_apply<S, Op>(work, op);
  }
};

}  // namespace cuda
}  // namespace fusedtrain
