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
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "fusedtrain/rounding.h"
#include "fusedtrain/rules.h"
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
  static constexpr int kMax = (kArgBytes - 32 - static_cast<int>(sizeof(Scalars))) / (D * 8 + 8 + 16 + 32 + 4 + 4);
  void* ptr[D][kMax];
  int64_t numel[kMax];
  Scalar step[kMax];        // per-tensor step: a host value, or the device counter (capturable)
  Scalar aux[kMax][2];      // per-tensor bound scalar states (Note [tensor scalars] in rules.h), if has_aux
  int32_t has_aux;
  int32_t chunk_end[kMax];  // cumulative chunk count up to and including tensor t
  uint32_t ordinal[kMax];   // the tensor's position in its call (keys stochastic rounding; Work::ordinal)
  int32_t count;
  Scalars scalars;
};

// The tensor of global unit c (a chunk here, a quantization block in quant_cuda.cuh) and its index within
// that tensor: a binary search over the cumulative unit counts, uniform across the block, served by the
// constant cache.
template <int D>
__device__ __forceinline__ int find_unit(const TensorTable<D>& table, int32_t c, int64_t* local) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (table.chunk_end[mid] > c) hi = mid;
    else lo = mid + 1;
  }
  *local = static_cast<int64_t>(c - (lo > 0 ? table.chunk_end[lo - 1] : 0));
  return lo;
}

// The tensor and element range of global chunk c.
template <int D>
__device__ __forceinline__ int find_chunk(const TensorTable<D>& table, int32_t c, int64_t* start, int64_t* len) {
  const int t = find_unit(table, c, start);
  *start *= kChunk;
  *len = min(kChunk, table.numel[t] - *start);
  return t;
}

template <typename S, int N>
struct alignas(sizeof(S) * N) Pack {
  S v[N];
};

// The pointers of one chunk, typed by the layout (Note [mixed-precision layouts] in rounding.h).
template <class L, int D>
struct ChunkPtrs {
  static constexpr int NS = D > 2 ? D - 2 : 1;
  typename L::P* p;
  const typename L::G* g;
  typename L::St* s[NS];
  typename L::O* out;
};

template <class L, typename Op>
__device__ __forceinline__ void element(const ChunkPtrs<L, Op::depth>& c, int64_t i, const Op& op, uint32_t key,
                                        int64_t index) {
  using T = at::opmath_type<typename L::P>;
  constexpr int D = Op::depth;
  T r[D];
  r[0] = static_cast<T>(c.p[i]);
  r[1] = static_cast<T>(c.g[i]);
#pragma unroll
  for (int k = 2; k < D; ++k) r[k] = static_cast<T>(c.s[k - 2][i]);
  op(r);
  c.p[i] = rounding::store_param<L>(r[0], key, index);
#pragma unroll
  for (int k = 2; k < D; ++k) c.s[k - 2][i] = static_cast<typename L::St>(r[k]);
  if constexpr (L::kCopy) c.out[i] = static_cast<typename L::O>(r[0]);
}

template <typename S>
__device__ __forceinline__ bool aligned_to(const S* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <class L, typename Op, int N>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const __grid_constant__ TensorTable<N> table,
                                                                const Op op_in) {
  using T = at::opmath_type<typename L::P>;
  using P = typename L::P;
  using G = typename L::G;
  using St = typename L::St;
  using O = typename L::O;
  constexpr int D = Op::depth;
  constexpr int VEC = 16 / L::kMaxBytes;  // elements per vector: 16 bytes of the widest list
  constexpr int NS = ChunkPtrs<L, D>::NS;
  // GradScaler found an inf/NaN: the whole update is skipped, decided on the device (no host sync).
  if (table.scalars.found_inf != nullptr && *table.scalars.found_inf != 0.0f) return;
  const int32_t total = table.chunk_end[table.count - 1];
  // bind() costs two double pow() for Adam; a block rebinds only when its chunk's values change (in the
  // usual case every tensor is at the same step: once per block).
  Op op = op_in;
  math::Bound bound{-1.0, 0.0, 0.0, 0.0, 0.0};
  const uint64_t sr_seed = L::kStochastic ? read_seed(table.scalars) : 0;
  for (int32_t c = blockIdx.x; c < total; c += gridDim.x) {
    int64_t start, len;
    const int t = find_chunk(table, c, &start, &len);
    const math::Bound b = bound_for(table.scalars, table.step[t], table.has_aux ? table.aux[t] : nullptr);
    if (!math::same(b, bound)) {
      bound = b;
      op = op_in;
      op.bind(b);
    }
    const uint32_t key = L::kStochastic ? rounding::tensor_key(sr_seed, table.ordinal[t]) : 0u;
    ChunkPtrs<L, D> cp;
    cp.p = static_cast<P*>(table.ptr[0][t]) + start;
    cp.g = static_cast<const G*>(table.ptr[1][t]) + start;
    bool aligned = aligned_to(cp.p, sizeof(P) * VEC) && aligned_to(cp.g, sizeof(G) * VEC);
#pragma unroll
    for (int k = 2; k < D; ++k) {
      cp.s[k - 2] = static_cast<St*>(table.ptr[k][t]) + start;
      aligned = aligned && aligned_to(cp.s[k - 2], sizeof(St) * VEC);
    }
    cp.out = nullptr;
    if constexpr (L::kCopy) {
      cp.out = static_cast<O*>(table.ptr[D][t]) + start;
      aligned = aligned && aligned_to(cp.out, sizeof(O) * VEC);
    }
    int64_t done = 0;
    if (aligned) {
      const int64_t nvec = len / VEC;
      // kIlp independent vectors per thread per round: all their loads are issued before the first use.
      for (int64_t v0 = threadIdx.x; v0 < nvec; v0 += kThreads * kIlp) {
        Pack<P, VEC> xp[kIlp];
        Pack<G, VEC> xg[kIlp];
        Pack<St, VEC> xs[kIlp][NS];
#pragma unroll
        for (int u = 0; u < kIlp; ++u) {
          const int64_t v = v0 + u * kThreads;
          if (v < nvec) {
            xp[u] = reinterpret_cast<const Pack<P, VEC>*>(cp.p)[v];
            xg[u] = reinterpret_cast<const Pack<G, VEC>*>(cp.g)[v];
#pragma unroll
            for (int k = 2; k < D; ++k) xs[u][k - 2] = reinterpret_cast<const Pack<St, VEC>*>(cp.s[k - 2])[v];
          }
        }
#pragma unroll
        for (int u = 0; u < kIlp; ++u) {
          const int64_t v = v0 + u * kThreads;
          if (v >= nvec) break;
          Pack<O, VEC> xo;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            T r[D];
            r[0] = static_cast<T>(xp[u].v[e]);
            r[1] = static_cast<T>(xg[u].v[e]);
#pragma unroll
            for (int k = 2; k < D; ++k) r[k] = static_cast<T>(xs[u][k - 2].v[e]);
            op(r);
            xp[u].v[e] = rounding::store_param<L>(r[0], key, start + v * VEC + e);
#pragma unroll
            for (int k = 2; k < D; ++k) xs[u][k - 2].v[e] = static_cast<St>(r[k]);
            if constexpr (L::kCopy) xo.v[e] = static_cast<O>(r[0]);
          }
          reinterpret_cast<Pack<P, VEC>*>(cp.p)[v] = xp[u];
#pragma unroll
          for (int k = 2; k < D; ++k) reinterpret_cast<Pack<St, VEC>*>(cp.s[k - 2])[v] = xs[u][k - 2];
          if constexpr (L::kCopy) reinterpret_cast<Pack<O, VEC>*>(cp.out)[v] = xo;
        }
      }
      done = nvec * VEC;
    }
    for (int64_t i = done + threadIdx.x; i < len; i += kThreads) element<L, Op>(cp, i, op, key, start + i);
  }
}

template <class L, typename Op>
int blocks_per_sm() {
  // Function-local cache per kernel instantiation: occupancy depends only on the compiled kernel.
  static const int value = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, multi_tensor_kernel<L, Op, Op::depth + (L::kCopy ? 1 : 0)>, kThreads, 0));
    return blocks > 0 ? blocks : 1;
  }();
  return value;
}

// The one fill loop of the tensor tables: walks `work` (lists 0..D-1 of each tuple) into tables of at most
// TensorTable<D>::kMax tensors and fewer than 2^31 chunks, and calls launch(table, chunks) for each filled table,
// in order (multi_tensor_apply, and the reduction passes of trust_cuda.cuh).
template <int D, typename Launch>
void for_each_table(const Work& work, Launch&& launch) {
  using Table = TensorTable<D>;
  Table table;
  table.count = 0;
  table.has_aux = work.aux.empty() ? 0 : 1;
  table.scalars = work.scalars;
  int64_t chunks = 0;
  auto flush = [&] {
    if (table.count == 0) return;
    launch(static_cast<const Table&>(table), chunks);
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
    table.ordinal[table.count] = work.ordinal[i];
    if (table.has_aux) {
      table.aux[table.count][0] = work.aux[i][0];
      table.aux[table.count][1] = work.aux[i][1];
    }
    chunks += tensor_chunks;
    table.chunk_end[table.count] = static_cast<int32_t>(chunks);
    ++table.count;
  }
  flush();
}

// Tuples of `work` are dense with equal strides (optim_host.h) and all on work.device.
template <class L, typename Op>
void multi_tensor_apply(const Work& work, const Op& op) {
  constexpr int D = Op::depth + (L::kCopy ? 1 : 0);  // lists in the table: the rule's, then the copy
  using Table = TensorTable<D>;
  static_assert(sizeof(Table) + sizeof(Op) <= 32764, "kernel parameters exceed the 32 KB limit");
  const c10::cuda::CUDAGuard guard(work.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, work.device.index()));
  const int64_t max_grid = static_cast<int64_t>(sm_count) * blocks_per_sm<L, Op>();
  for_each_table<D>(work, [&](const Table& table, int64_t chunks) {
    const unsigned grid = static_cast<unsigned>(chunks < max_grid ? chunks : max_grid);
    multi_tensor_kernel<L, Op, D><<<grid, kThreads, 0, stream>>>(table, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Note [tensor scalars] (rules.h) on the device: one thread per tensor reads its step counter and scalar
// states, runs the rule's advance, stores the new states (float32, as torch's capturable optimizers keep
// them) and the two bound values the element-wise kernel reads next.
constexpr int kAuxMax = 1024;
struct AuxTable {
  double hyper[24];
  float* aux[kAuxMax][2];
  const float* step[kAuxMax];
  int32_t count;
  Scalar lr;
  const float* found_inf;
};

template <class Rule>
__global__ void aux_kernel(const __grid_constant__ AuxTable table, int k, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= table.count) return;
  if (table.found_inf != nullptr && *table.found_inf != 0.0f) return;
  double stored[2] = {0.0, 0.0}, bound[2] = {0.0, 0.0};
  for (int j = 0; j < k; ++j) stored[j] = static_cast<double>(*table.aux[i][j]);
  Rule::advance(table.hyper, static_cast<double>(*table.step[i]), read(table.lr), stored, bound, rules::AuxRound{});
  for (int j = 0; j < k; ++j) *table.aux[i][j] = static_cast<float>(stored[j]);
  out[2 * i] = static_cast<float>(bound[0]);
  out[2 * i + 1] = static_cast<float>(bound[1]);
}

struct Backend {
  template <class L, typename Op>
  static void apply(const Work& work, const Op& op) {
    multi_tensor_apply<L, Op>(work, op);
  }

  template <class Rule>
  static void advance_aux(const AuxArgs& a) {
    if (a.n == 0) return;
    static_assert(Rule::kHyper.size() <= 24, "AuxTable holds up to 24 hyperparameters");
    const at::Tensor& first = a.aux[0];
    const c10::cuda::CUDAGuard guard(first.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor out = at::empty({static_cast<int64_t>(a.n), 2}, first.options().dtype(at::kFloat));
    a.keep->push_back(out);
    float* o = out.data_ptr<float>();
    AuxTable table;
    for (size_t h = 0; h < Rule::kHyper.size(); ++h) table.hyper[h] = a.hyper[h];
    table.lr = a.lr;
    table.found_inf = a.found_inf;
    for (size_t base = 0; base < a.n; base += kAuxMax) {
      const size_t count = std::min<size_t>(kAuxMax, a.n - base);
      for (size_t i = 0; i < count; ++i) {
        for (int j = 0; j < a.k; ++j) {
          const at::Tensor& t = a.aux[j * a.n + base + i];
          TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat, "fusedtrain: tensor scalar states on the GPU "
                      "must be float32 (got ", t.scalar_type(), " on ", t.device(), ")");
          table.aux[i][j] = static_cast<float*>(t.data_ptr());
        }
        TORCH_CHECK(a.steps[base + i].ptr != nullptr, "fusedtrain: tensor scalar states on the GPU need the step "
                    "counters there too");
        table.step[i] = a.steps[base + i].ptr;
      }
      table.count = static_cast<int32_t>(count);
      aux_kernel<Rule><<<static_cast<unsigned>((count + 127) / 128), 128, 0, stream>>>(table, a.k, o + 2 * base);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (size_t i = 0; i < a.n; ++i) a.out[i] = {Scalar{o + 2 * i, 0.0}, Scalar{o + 2 * i + 1, 0.0}};
  }
};

}  // namespace cuda
}  // namespace fusedtrain
