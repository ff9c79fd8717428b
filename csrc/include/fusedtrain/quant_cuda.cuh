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

// A state's value from its code byte and its block's absmax (Note [8-bit optimizer states]): the signed map,
// or the square of the unsigned one (Note [square-root states] in rules_quant.h: the codes hold sqrt(state)).
template <typename T>
__device__ __forceinline__ T decode_state(bool is_signed, uint8_t byte, float absmax, const Maps& maps) {
  if (is_signed) return static_cast<T>(decode_signed(static_cast<int8_t>(byte), absmax, maps.signed_value));
  const float root = decode_unsigned(byte, absmax, maps.unsigned_value);
  return static_cast<T>(root * root);
}

// signs (Forms::bits): bit s set = state s holds int8 codes on the signed map (else uint8 on the unsigned map);
// bit 8 + s set = state s is a float state of type L::St (Note [mixed state lists] in rules_quant.h): loaded and
// stored as is, its lists start at list[s] (the copy at list[S]); the table may have unused trailing columns.
// Note [block passes that read or reduce] (quant.h): the parameter and the states the op stores (StoreMask)
// are written; an op with terms (BlockSums) has each quantization block c of the table write its two sums,
// a fixed tree over the block's threads of the terms of its elements as stored, to partials[2 * (base + c)].
template <class L, typename Op, int N>
__global__ void __launch_bounds__(kBlock) quant_kernel(const __grid_constant__ cuda::TensorTable<N> table,
                                                       const Op op_in, const unsigned signs, double* partials,
                                                       int64_t base) {
  using T = at::opmath_type<typename L::P>;
  using P = typename L::P;
  using G = typename L::G;
  using O = typename L::O;
  using St = typename L::St;
  constexpr int D = Op::depth, S = D - 2, W = kBlock / 32;
  constexpr unsigned kMask = StoreMask<Op>::value;
  constexpr bool kReduces = BlockSums<Op>::value > 0;
  if (table.scalars.found_inf != nullptr && *table.scalars.found_inf != 0.0f) return;
  __shared__ Maps maps;
  __shared__ T partial[S > 0 ? S : 1][W];
  __shared__ double tree[kReduces ? 2 : 1][kReduces ? kBlock : 1];
  for (int k = threadIdx.x; k < static_cast<int>(sizeof(Maps) / sizeof(float)); k += blockDim.x) {
    reinterpret_cast<float*>(&maps)[k] = reinterpret_cast<const float*>(&kDeviceMaps)[k];
  }
  __syncthreads();
  const int32_t total = table.chunk_end[table.count - 1];
  Op op = op_in;
  math::Bound bound{-1.0, 0.0, 0.0, 0.0, 0.0};
  const uint64_t sr_seed = L::kStochastic ? read_seed(table.scalars) : 0;
  const int i = threadIdx.x, lane = i & 31, warp = i >> 5;
  int list[S + 1];  // Note [mixed state lists]: each state's first list, then the copy's
  list[0] = 2;
#pragma unroll
  for (int s = 0; s < S; ++s) list[s + 1] = list[s] + (((signs >> (8 + s)) & 1u) ? 1 : 2);
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
    uint8_t byte[S > 0 ? S : 1];  // each state's code and block scale as stored (for the terms)
    float scale[S > 0 ? S : 1];
#pragma unroll
    for (int k = 0; k < D; ++k) r[k] = T(0);
#pragma unroll
    for (int s = 0; s < S; ++s) {
      byte[s] = 0;
      scale[s] = ((signs >> (8 + s)) & 1u) ? 0.0f : static_cast<const float*>(table.ptr[list[s] + 1][t])[b];
    }
    if (active) {
      r[0] = static_cast<T>(static_cast<const P*>(table.ptr[0][t])[e]);
      r[1] = static_cast<T>(static_cast<const G*>(table.ptr[1][t])[e]);
#pragma unroll
      for (int s = 0; s < S; ++s) {
        if ((signs >> (8 + s)) & 1u) {  // a float state (Note [mixed state lists])
          r[2 + s] = static_cast<T>(static_cast<const St*>(table.ptr[list[s]][t])[e]);
          continue;
        }
        byte[s] = static_cast<const uint8_t*>(table.ptr[list[s]][t])[e];
        r[2 + s] = decode_state<T>((signs >> s) & 1u, byte[s], scale[s], maps);
      }
      op(r);
      if constexpr ((kMask & 1u) != 0) {
        static_cast<P*>(table.ptr[0][t])[e] = rounding::store_param<L>(r[0], key, e);
        if constexpr (L::kCopy) static_cast<O*>(table.ptr[list[S]][t])[e] = static_cast<O>(r[0]);
      }
#pragma unroll
      for (int s = 0; s < S; ++s) {  // float states: stored as the float drivers store them
        if (((signs >> (8 + s)) & 1u) && ((kMask >> (2 + s)) & 1u)) {
          static_cast<St*>(table.ptr[list[s]][t])[e] = static_cast<St>(r[2 + s]);
        }
      }
    }
    // what the codes hold: the state, or its square root (Note [square-root states])
#pragma unroll
    for (int s = 0; s < S; ++s) {
      r[2 + s] = ((signs >> s) & 1u) || ((signs >> (8 + s)) & 1u) ? r[2 + s] : ::sqrt(r[2 + s]);
    }
#pragma unroll
    for (int s = 0; s < S; ++s) {
      if (((kMask >> (2 + s)) & 1u) == 0) continue;  // read only: the codes stay (uniform over the block)
      if ((signs >> (8 + s)) & 1u) continue;         // a float state: no block scale (uniform over the block)
      T m = active ? (r[2 + s] < T(0) ? -r[2 + s] : r[2 + s]) : T(0);
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, off));
      if (lane == 0) partial[s][warp] = m;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < S; ++s) {
      if (((kMask >> (2 + s)) & 1u) == 0 || ((signs >> (8 + s)) & 1u)) continue;
      T m = partial[s][0];
#pragma unroll
      for (int w = 1; w < W; ++w) m = nan_max(m, partial[s][w]);
      const float absmax = static_cast<float>(m);
      if (i == 0) static_cast<float*>(table.ptr[list[s] + 1][t])[b] = absmax;
      scale[s] = absmax;
      const T inv = absmax > 0.0f ? T(1) / static_cast<T>(absmax) : T(0);
      if (active) {
        if ((signs >> s) & 1u) {
          const int8_t code = encode_signed(r[2 + s] * inv, maps.signed_mid);
          static_cast<int8_t*>(table.ptr[list[s]][t])[e] = code;
          byte[s] = static_cast<uint8_t>(code);
        } else {
          const uint8_t code = encode_unsigned(r[2 + s] * inv, maps.unsigned_mid);
          static_cast<uint8_t*>(table.ptr[list[s]][t])[e] = code;
          byte[s] = code;
        }
      }
    }
    if constexpr (kReduces) {  // Note [block passes that read or reduce]: the terms of the block as stored
      double terms[2] = {0.0, 0.0};
      if (active) {
        T q[D];
        q[0] = static_cast<T>(static_cast<const P*>(table.ptr[0][t])[e]);
        q[1] = static_cast<T>(static_cast<const G*>(table.ptr[1][t])[e]);
#pragma unroll
        for (int s = 0; s < S; ++s) {
          q[2 + s] = ((signs >> (8 + s)) & 1u) ? static_cast<T>(static_cast<const St*>(table.ptr[list[s]][t])[e])
                                                : decode_state<T>((signs >> s) & 1u, byte[s], scale[s], maps);
        }
        op.terms(q, terms);
      }
      tree[0][i] = terms[0];
      tree[1][i] = terms[1];
      __syncthreads();
      for (int h = kBlock / 2; h > 0; h >>= 1) {
        if (i < h) {
          tree[0][i] += tree[0][i + h];
          tree[1][i] += tree[1][i + h];
        }
        __syncthreads();
      }
      if (i == 0) {
        partials[2 * (base + c)] = tree[0][0];
        partials[2 * (base + c) + 1] = tree[1][0];
      }
    }
    __syncthreads();  // partial (and tree) are reused by the next block
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

// The persistent grid of kernel K for `units` quantization blocks: at most the resident CUDA blocks.
template <auto K, int kThreads>
unsigned grid_for(const Work& work, int64_t units) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, work.device.index()));
  const int64_t max_grid = static_cast<int64_t>(sm_count) * blocks_per_sm<K, kThreads>();
  return static_cast<unsigned>(units < max_grid ? units : max_grid);
}

// Note [CUDA block launch] for a quantized format (8 bits here, 4 bits in quant4_cuda.cuh): fills the tensor
// table with each tuple's pointers, step, aux and cumulative block count, and calls fn(table, blocks) whenever
// the table is full and at the end. blocks_of(i): tuple i's quantization blocks and the value the kernel reads
// as numel[t].
template <int N, typename BlocksOf, typename Fn>
void for_each_block_table(const Work& work, const char* format, const BlocksOf& blocks_of, Fn&& fn) {
  using Table = cuda::TensorTable<N>;
  Table table;
  table.count = 0;
  table.has_aux = work.aux.empty() ? 0 : 1;
  table.scalars = work.scalars;
  int64_t blocks = 0;
  auto flush = [&] {
    if (table.count == 0) return;
    fn(static_cast<const Table&>(table), blocks);
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

// Kernel K(table, op, signs) of kThreads threads over the tables of for_each_block_table (quant4_cuda.cuh).
template <auto K, int kThreads, int N, typename Op, typename BlocksOf>
void launch_blocks(const Work& work, const Op& op, unsigned signs, const char* format, const BlocksOf& blocks_of) {
  static_assert(sizeof(cuda::TensorTable<N>) + sizeof(Op) <= 32764, "kernel parameters exceed the 32 KB limit");
  const c10::cuda::CUDAGuard guard(work.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for_each_block_table<N>(work, format, blocks_of, [&](const cuda::TensorTable<N>& table, int64_t blocks) {
    K<<<grid_for<K, kThreads>(work, blocks), kThreads, 0, stream>>>(table, op, signs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The 8-bit tables of a work list (numel[t]: the row length, Note [row blocks]) and their block counts.
template <int N, typename Fn>
void for_each_table8(const Work& work, Fn&& fn) {
  for_each_block_table<N>(work, "8-bit", [&](size_t i) {
    return std::pair<int64_t, int64_t>(tensor_blocks(work.numel[i], work.row[i]), work.row[i]);
  }, fn);
}

// The 8-bit kernel on one table (partials: where its blocks' sums go, for an op with terms; else null).
template <class L, typename Op, int N>
void launch8(const Work& work, const cuda::TensorTable<N>& table, int64_t blocks, const Op& op, unsigned signs,
             double* partials, int64_t base) {
  static_assert(sizeof(cuda::TensorTable<N>) + sizeof(Op) <= 32764, "kernel parameters exceed the 32 KB limit");
  const unsigned grid = grid_for<quant_kernel<L, Op, N>, kBlock>(work, blocks);
  quant_kernel<L, Op, N><<<grid, kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(table, op, signs, partials, base);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernel's signs argument (Forms::bits: bit s signed, bit 8 + s float; Note [mixed state lists]).
inline unsigned sign_bits(const Forms& fm, int states) { return fm.bits(states); }

}  // namespace cuda_impl

template <>
struct Driver<cuda::Backend> {
  // Note [CUDA block launch]
  template <class L, typename Op>
  static void apply(const Work& work, const Op& op, const Forms& fm) {
    constexpr int S = Op::depth - 2;
    constexpr int N = 2 + 2 * S + (L::kCopy ? 1 : 0);  // at most (a float state has one list: unused columns)
    if constexpr (N > kMaxDepth || S > kMaxStates) {
      TORCH_CHECK(false, "fusedtrain: too many quantized state lists for one tuple");
    } else {
      static_assert(BlockSums<Op>::value == 0, "a reducing block pass has its sums to finish (trust_quant_cuda.cuh)");
      const c10::cuda::CUDAGuard guard(work.device);
      const unsigned signs = cuda_impl::sign_bits(fm, S);
      cuda_impl::for_each_table8<N>(work, [&](const cuda::TensorTable<N>& table, int64_t blocks) {
        cuda_impl::launch8<L>(work, table, blocks, op, signs, nullptr, 0);
      });
    }
  }
};

}  // namespace quant
}  // namespace fusedtrain
