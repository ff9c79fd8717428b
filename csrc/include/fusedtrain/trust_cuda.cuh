// CUDA driver of the trust-ratio passes (Note [trust-ratio passes] in rules_trust.h).
//
// Note [deterministic per-tensor sums on the GPU]:
// The reduction pass walks the chunks of cuda_launcher.cuh's tensor table with a persistent grid; each
// chunk is reduced by one block (a fixed tree over the threads' double sums) into its own slot of a
// partials buffer, so nothing is accumulated with atomics. A second kernel, one thread per tensor, adds
// its chunks' partials in chunk order and runs the rule's finisher (the trust ratio), writing the two
// float64 values the next pass binds as aux0 / aux1 (Note [wide device scalars] in work.h). Deterministic,
// no host synchronisation, capturable. The final pass is the generic launcher (cuda_launcher.cuh).
#pragma once

#include <ATen/ops/empty.h>

#include <vector>

#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/rules_trust.h"

namespace fusedtrain {
namespace trust_cuda {

constexpr int kThreads = 256;

template <class L, typename Op>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const __grid_constant__ cuda::TensorTable<Op::depth> table,
                                                          const Op op_in, int64_t chunk_base, double* partials) {
  using T = at::opmath_type<typename L::P>;
  using St = typename L::St;
  constexpr int D = Op::depth;
  constexpr unsigned LD = Op::kLoad, ST = Op::kStore;
  static_assert((ST & 3u) == 0u, "a reduction pass writes states only");
  __shared__ double shared[2][kThreads];
  if (table.scalars.found_inf != nullptr && *table.scalars.found_inf != 0.0f) return;
  const int32_t total = table.chunk_end[table.count - 1];
  Op op = op_in;
  math::Bound bound{-1.0, 0.0, 0.0, 0.0, 0.0};
  for (int32_t c = blockIdx.x; c < total; c += gridDim.x) {
    int64_t start, len;
    const int t = cuda::find_chunk(table, c, &start, &len);
    const math::Bound b = bound_for(table.scalars, table.step[t], table.has_aux ? table.aux[t] : nullptr);
    if (!math::same(b, bound)) {
      bound = b;
      op = op_in;
      op.bind(b);
    }
    const typename L::P* p = static_cast<const typename L::P*>(table.ptr[0][t]) + start;
    const typename L::G* g = static_cast<const typename L::G*>(table.ptr[1][t]) + start;
    St* s[D > 2 ? D - 2 : 1];
#pragma unroll
    for (int k = 2; k < D; ++k) s[k - 2] = static_cast<St*>(table.ptr[k][t]) + start;
    double s0 = 0.0, s1 = 0.0;
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      T r[D];
      if constexpr ((LD & 1u) != 0) r[0] = static_cast<T>(p[i]);
      if constexpr ((LD & 2u) != 0) r[1] = static_cast<T>(g[i]);
#pragma unroll
      for (int k = 2; k < D; ++k) {
        if ((LD >> k) & 1u) r[k] = static_cast<T>(s[k - 2][i]);
      }
      double v[2] = {0.0, 0.0};
      op(r, v);
#pragma unroll
      for (int k = 2; k < D; ++k) {
        if ((ST >> k) & 1u) s[k - 2][i] = static_cast<St>(r[k]);
      }
      s0 += v[0];
      s1 += v[1];
    }
    shared[0][threadIdx.x] = s0;
    shared[1][threadIdx.x] = s1;
    __syncthreads();
    for (int h = kThreads / 2; h > 0; h >>= 1) {
      if (threadIdx.x < h) {
        shared[0][threadIdx.x] += shared[0][threadIdx.x + h];
        shared[1][threadIdx.x] += shared[1][threadIdx.x + h];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      partials[2 * (chunk_base + c)] = shared[0][0];
      partials[2 * (chunk_base + c) + 1] = shared[1][0];
    }
    __syncthreads();  // the next chunk reuses `shared`
  }
}

// What finish_kernel does with each tensor's sums: finish them (the usual case), or, for a reduction across
// shards (Note [sums across shards] in work.h), write them as rows (sum0, sum1, numel) and finish those rows
// in a second launch once they hold the whole tensor's values.
enum FinishMode : int { kFinish = 0, kToRows = 1, kFromRows = 2 };

template <int D, typename Fin, int MODE>
__global__ void finish_kernel(const __grid_constant__ cuda::TensorTable<D> table, const Fin fin, int64_t chunk_base,
                              const double* partials, double* rows, double* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= table.count) return;
  double sums[2] = {0.0, 0.0};
  int64_t numel = table.numel[t];
  if constexpr (MODE == kFromRows) {
    sums[0] = rows[3 * t];
    sums[1] = rows[3 * t + 1];
    numel = static_cast<int64_t>(rows[3 * t + 2]);
  } else {
    const int32_t c0 = t > 0 ? table.chunk_end[t - 1] : 0, c1 = table.chunk_end[t];
    for (int32_t c = c0; c < c1; ++c) {
      sums[0] += partials[2 * (chunk_base + c)];
      sums[1] += partials[2 * (chunk_base + c) + 1];
    }
  }
  if constexpr (MODE == kToRows) {
    rows[3 * t] = sums[0];
    rows[3 * t + 1] = sums[1];
    rows[3 * t + 2] = static_cast<double>(numel);
  } else {
    const math::Bound b = bound_for(table.scalars, table.step[t], table.has_aux ? table.aux[t] : nullptr);
    double v[2] = {0.0, 0.0};
    fin(sums, numel, b, v);
    out[2 * t] = v[0];
    out[2 * t + 1] = v[1];
  }
}

// Note [deterministic per-tensor sums on the GPU], for the tables of any pass: for_tables(fn) calls
// fn(table, units) for each filled table of D lists (units: its chunks, or quantization blocks for the 8-bit
// walk of trust_quant_cuda.cuh); launch(table, units, partials, base) launches the pass's kernel on it, which
// writes the sums of the table's unit c to partials[2 * (base + c)]. Each tensor's sums are then finished (added
// across shards first, Note [sums across shards]) into out.aux. The finisher's numel is the table's numel[t].
template <int D, typename Fin, typename ForTables, typename Launch>
void reduce_tables(const Work& work, const Fin& fin, int64_t all_units, Work& out, ForTables&& for_tables,
                   Launch&& launch) {
  using Table = cuda::TensorTable<D>;
  const c10::cuda::CUDAGuard guard(work.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto options = at::TensorOptions().device(work.device);
  at::Tensor partials = at::empty({std::max<int64_t>(2 * all_units, 1)}, options.dtype(at::kDouble));
  at::Tensor values = at::empty({static_cast<int64_t>(2 * work.size())}, options.dtype(at::kDouble));
  double* part = partials.data_ptr<double>();
  double* vals = values.data_ptr<double>();
  out.keep_alive.push_back(partials);
  out.keep_alive.push_back(values);

  const bool across = static_cast<bool>(work.reduce_across);
  at::Tensor rows;
  double* row = nullptr;
  if (across) {
    rows = at::empty({static_cast<int64_t>(work.size()), 3}, options.dtype(at::kDouble));
    row = rows.data_ptr<double>();
  }
  struct Filled {
    Table table;
    size_t tensor_base;
  };
  std::vector<Filled> filled;  // (across shards: the tables, finished after the reduction)

  int64_t chunk_base = 0;
  size_t tensor_base = 0;
  for_tables([&](const Table& table, int64_t units) {
    const unsigned fin_grid = static_cast<unsigned>((table.count + 127) / 128);
    launch(table, units, part, chunk_base);
    if (across) {
      finish_kernel<D, Fin, kToRows><<<fin_grid, 128, 0, stream>>>(table, fin, chunk_base, part,
                                                                    row + 3 * tensor_base, nullptr);
      filled.push_back({table, tensor_base});
    } else {
      finish_kernel<D, Fin, kFinish><<<fin_grid, 128, 0, stream>>>(table, fin, chunk_base, part, nullptr,
                                                                    vals + 2 * tensor_base);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tensor_base += static_cast<size_t>(table.count);
    chunk_base += units;
  });
  if (across) {
    work.reduce_across(rows, work.ordinal);
    out.keep_alive.push_back(rows);
    for (const Filled& f : filled) {
      const unsigned fin_grid = static_cast<unsigned>((f.table.count + 127) / 128);
      finish_kernel<D, Fin, kFromRows><<<fin_grid, 128, 0, stream>>>(f.table, fin, 0, nullptr,
                                                                      row + 3 * f.tensor_base,
                                                                      vals + 2 * f.tensor_base);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  out.aux.resize(work.size());
  for (size_t i = 0; i < work.size(); ++i) out.aux[i] = {Scalar::wide(vals + 2 * i), Scalar::wide(vals + 2 * i + 1)};
}

struct Backend : cuda::Backend {
  using Generic = cuda::Backend;  // the element-wise launcher (host::run_rule), whose apply this one hides

  template <class L, typename Op, typename Fin>
  static void reduce(const Work& work, const Op& op, const Fin& fin, Work& out) {
    constexpr int D = Op::depth;
    using Table = cuda::TensorTable<D>;
    const c10::cuda::CUDAGuard guard(work.device);
    int sm_count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, work.device.index()));
    const int64_t max_grid = static_cast<int64_t>(sm_count) * 4;
    int64_t all_chunks = 0;
    for (size_t i = 0; i < work.size(); ++i) all_chunks += (work.numel[i] + cuda::kChunk - 1) / cuda::kChunk;
    reduce_tables<D>(
        work, fin, all_chunks, out, [&](auto&& fn) { cuda::for_each_table<D>(work, fn); },
        [&](const Table& table, int64_t chunks, double* part, int64_t chunk_base) {
          const unsigned grid = static_cast<unsigned>(chunks < max_grid ? chunks : max_grid);
          reduce_kernel<L, Op><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(table, op, chunk_base, part);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }

  template <class L, typename Op>
  static void apply(const Work& work, const Op& op) {
    using T = at::opmath_type<typename L::P>;
    cuda::multi_tensor_apply<L>(work, math::NoSums<T, Op>{op});
  }
};

}  // namespace trust_cuda
}  // namespace fusedtrain
