// The CUDA block driver of the quantized rules (Note [quantized rules] in rules_quant.h).
//
// Note [CUDA block launch]:
// The tensor table of the element-wise launcher (cuda_launcher.cuh: addresses in the kernel's parameter
// space, no copy, capturable) with chunk_end counting quantization blocks instead of chunks, and numel[t]
// holding the tensor's row length (the kernel needs no other size: Note [row blocks] in quant.h). One CUDA
// block of quant::kBlock (256) threads handles one quantization block at a time, one element per thread,
// and strides over the blocks of all tensors (a persistent grid). Per block: each thread dequantizes its
// element's states (the maps are copied once per CUDA block from __constant__ memory into shared
// memory, since the threads index them divergently), runs the rule's functor and stores the parameter;
// the block's new absmax is a warp-shuffle then shared-memory max (NaN-propagating, as on the CPU), and
// each thread requantizes its element by the same branch-free binary search as the CPU. Same tables, same
// float arithmetic and the same functor as the CPU: results agree up to the per-element functor's own
// CPU/GPU differences (none with -ffp-contract=off / --fmad=false).
#pragma once

#include <utility>

#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/quant.h"
#include "fusedtrain/rules_quant.h"

namespace fusedtrain {
namespace quant {
namespace cuda_impl {

static __constant__ Maps kDeviceMaps = kMaps;

// max(a, b) that keeps a NaN from either side
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// signs: bit s set = state s holds int8 codes on the signed map (else uint8 on the unsigned map)
template <class L, typename Op, int N>
__global__ void __launch_bounds__(kBlock) quant_kernel(const __grid_constant__ cuda::TensorTable<N> table,
                                                       const Op op_in, const unsigned signs) {
  using T = at::opmath_type<typename L::P>;
  using P = typename L::P;
  using G = typename L::G;
  using O = typename L::O;
  constexpr int D = Op::depth, S = D - 2, W = kBlock / 32;
  if (table.scalars.found_inf != nullptr && *table.scalars.found_inf != 0.0f) return;
  __shared__ Maps maps;
  __shared__ T partial[S > 0 ? S : 1][W];
  for (int k = threadIdx.x; k < static_cast<int>(sizeof(Maps) / sizeof(float)); k += blockDim.x) {
    reinterpret_cast<float*>(&maps)[k] = reinterpret_cast<const float*>(&kDeviceMaps)[k];
  }
  __syncthreads();
  const int32_t total = table.chunk_end[table.count - 1];
  Op op = op_in;
  math::Bound bound{-1.0, 0.0, 0.0, 0.0, 0.0};
  const uint64_t sr_seed = L::kStochastic ? read_seed(table.scalars) : 0;
  const int i = threadIdx.x, lane = i & 31, warp = i >> 5;
  for (int32_t c = blockIdx.x; c < total; c += gridDim.x) {
    int64_t b;
    const int t = cuda::find_unit(table, c, &b);
    const math::Bound bd = bound_for(table.scalars, table.step[t], table.has_aux ? table.aux[t] : nullptr);
    if (!math::same(bd, bound)) {
      bound = bd;
      op = op_in;
      op.bind(bd);
    }
    const uint32_t key = L::kStochastic ? rounding::tensor_key(sr_seed, table.ordinal[t]) : 0u;
    const int64_t row = table.numel[t], per_row = num_blocks(row);  // Note [row blocks]
    const int64_t in_row = (b % per_row) * kBlock + i;                // the element's position in its row
    const int64_t e = (b / per_row) * row + in_row;
    const bool active = in_row < row;
    T r[D];
#pragma unroll
    for (int k = 0; k < D; ++k) r[k] = T(0);
    if (active) {
      r[0] = static_cast<T>(static_cast<const P*>(table.ptr[0][t])[e]);
      r[1] = static_cast<T>(static_cast<const G*>(table.ptr[1][t])[e]);
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const float absmax = static_cast<const float*>(table.ptr[3 + 2 * s][t])[b];
        if ((signs >> s) & 1u) {
          r[2 + s] = static_cast<T>(
              decode_signed(static_cast<const int8_t*>(table.ptr[2 + 2 * s][t])[e], absmax, maps.signed_value));
        } else {  // Note [square-root states] (rules_quant.h): the codes hold sqrt(state)
          const float root =
              decode_unsigned(static_cast<const uint8_t*>(table.ptr[2 + 2 * s][t])[e], absmax, maps.unsigned_value);
          r[2 + s] = static_cast<T>(root * root);
        }
      }
      op(r);
      static_cast<P*>(table.ptr[0][t])[e] = rounding::store_param<L>(r[0], key, e);
      if constexpr (L::kCopy) static_cast<O*>(table.ptr[2 + 2 * S][t])[e] = static_cast<O>(r[0]);
    }
    // what the codes hold: the state, or its square root (Note [square-root states])
#pragma unroll
    for (int s = 0; s < S; ++s) r[2 + s] = ((signs >> s) & 1u) ? r[2 + s] : ::sqrt(r[2 + s]);
#pragma unroll
    for (int s = 0; s < S; ++s) {
      T m = active ? (r[2 + s] < T(0) ? -r[2 + s] : r[2 + s]) : T(0);
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, off));
      if (lane == 0) partial[s][warp] = m;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < S; ++s) {
      T m = partial[s][0];
#pragma unroll
      for (int w = 1; w < W; ++w) m = nan_max(m, partial[s][w]);
      const float absmax = static_cast<float>(m);
      if (i == 0) static_cast<float*>(table.ptr[3 + 2 * s][t])[b] = absmax;
      const T inv = absmax > 0.0f ? T(1) / static_cast<T>(absmax) : T(0);
      if (active) {
        if ((signs >> s) & 1u) {
          static_cast<int8_t*>(table.ptr[2 + 2 * s][t])[e] = encode_signed(r[2 + s] * inv, maps.signed_mid);
        } else {
          static_cast<uint8_t*>(table.ptr[2 + 2 * s][t])[e] = encode_unsigned(r[2 + s] * inv, maps.unsigned_mid);
        }
      }
    }
    __syncthreads();  // partial is reused by the next block
  }
}

// CUDA blocks of kernel K (kThreads threads) resident per SM, asked once per kernel.
template <auto K, int kThreads>
int blocks_per_sm() {
  static const int value = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, K, kThreads, 0));
    return blocks > 0 ? blocks : 1;
  }();
  return value;
}

// Note [CUDA block launch] for a quantized format (8 bits here, 4 bits in quant4_cuda.cuh): fills the tensor
// table with each tuple's pointers, step, aux and cumulative block count, and launches kernel K (one CUDA block
// of kThreads threads per quantization block, a persistent grid) whenever the table is full and at the end.
// blocks_of(i): tuple i's quantization blocks and the value the kernel reads as numel[t].
template <auto K, int kThreads, int N, typename Op, typename BlocksOf>
void launch_blocks(const Work& work, const Op& op, unsigned signs, const char* format, const BlocksOf& blocks_of) {
  using Table = cuda::TensorTable<N>;
  static_assert(sizeof(Table) + sizeof(Op) <= 32764, "kernel parameters exceed the 32 KB limit");
  const c10::cuda::CUDAGuard guard(work.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, work.device.index()));
  const int64_t max_grid = static_cast<int64_t>(sm_count) * blocks_per_sm<K, kThreads>();
  Table table;
  table.count = 0;
  table.has_aux = work.aux.empty() ? 0 : 1;
  table.scalars = work.scalars;
  int64_t blocks = 0;
  auto flush = [&] {
    if (table.count == 0) return;
    const unsigned grid = static_cast<unsigned>(blocks < max_grid ? blocks : max_grid);
    K<<<grid, kThreads, 0, stream>>>(table, op, signs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table.count = 0;
    blocks = 0;
  };
  for (size_t i = 0; i < work.size(); ++i) {
    const std::pair<int64_t, int64_t> own = blocks_of(i);
    TORCH_CHECK(own.first <= INT32_MAX, "fusedtrain: a tensor of ", work.numel[i], " elements has too many ", format,
                " blocks for one launch");
    if (table.count == Table::kMax || blocks + own.first > INT32_MAX) flush();
    for (int k = 0; k < N; ++k) table.ptr[k][table.count] = work.ptr[i][k];
    table.numel[table.count] = own.second;
    table.step[table.count] = work.step[i];
    table.ordinal[table.count] = work.ordinal[i];
    if (table.has_aux) {
      table.aux[table.count][0] = work.aux[i][0];
      table.aux[table.count][1] = work.aux[i][1];
    }
    blocks += own.first;
    table.chunk_end[table.count] = static_cast<int32_t>(blocks);  // cumulative quantization blocks
    ++table.count;
  }
  flush();
}

}  // namespace cuda_impl

template <>
struct Driver<cuda::Backend> {
  // Note [CUDA block launch]
  template <class L, typename Op>
  static void apply(const Work& work, const Op& op, const Signs& sgn) {
    constexpr int S = Op::depth - 2;
    constexpr int N = 2 + 2 * S + (L::kCopy ? 1 : 0);
    if constexpr (N > kMaxDepth || S > kMaxStates) {
      TORCH_CHECK(false, "fusedtrain: too many quantized state lists for one tuple");
    } else {
      unsigned signs = 0;
      for (int s = 0; s < S; ++s) signs |= sgn[s] ? (1u << s) : 0u;
      // numel[t]: the row length (the kernel needs no other size: Note [row blocks] in quant.h)
      cuda_impl::launch_blocks<cuda_impl::quant_kernel<L, Op, N>, kBlock, N>(
          work, op, signs, "8-bit", [&](size_t i) {
            return std::pair<int64_t, int64_t>(tensor_blocks(work.numel[i], work.row[i]), work.row[i]);
          });
    }
  }
};

}  // namespace quant
}  // namespace fusedtrain
