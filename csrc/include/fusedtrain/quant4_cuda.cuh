// The CUDA block driver of the 4-bit rules (Note [4-bit optimizer states] in quant4.h): the 8-bit launch
// (Note [CUDA block launch] in quant_cuda.cuh: the element-wise tensor table with chunk_end counting
// quantization blocks, a persistent grid) with one CUDA block of kBlock4 = 128 threads per quantization
// block, one element per thread. A thread decodes its nibble from the shared byte, runs the functor, takes
// part in the block's absmax (warp shuffles, then shared memory; NaN-propagating) and encodes its element
// by quant4.h's encode4; the even thread of each pair then takes its neighbour's code by one shuffle and
// writes the byte. The tables are 31 floats each: read from __constant__ memory, where the fifteen
// midpoint comparisons of a warp read the same address (a broadcast), and the decode's divergent reads
// hit a single cache line.
#pragma once

#include "fusedtrain/cuda_launcher.cuh"
#include "fusedtrain/quant4.h"
#include "fusedtrain/quant_cuda.cuh"
#include "fusedtrain/rules_quant4.h"

namespace fusedtrain {
namespace quant {
namespace cuda4_impl {

static __constant__ Maps4 kDeviceMaps4 = kMaps4;

// signs: bit s set = state s is on the signed map (else its codes hold sqrt(state) on the unsigned map)
template <class L, typename Op, int N>
__global__ void __launch_bounds__(kBlock4) quant4_kernel(const __grid_constant__ cuda::TensorTable<N> table,
                                                         const Op op_in, const unsigned signs) {
  using T = at::opmath_type<typename L::P>;
  using P = typename L::P;
  using G = typename L::G;
  using O = typename L::O;
  constexpr int D = Op::depth, S = D - 2, W = kBlock4 / 32;
  if (table.scalars.found_inf != nullptr && *table.scalars.found_inf != 0.0f) return;
  __shared__ T partial[S > 0 ? S : 1][W];
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
    const int64_t e = b * kBlock4 + i;
    const bool active = e < table.numel[t];
    T r[D];
#pragma unroll
    for (int k = 0; k < D; ++k) r[k] = T(0);
    if (active) {
      r[0] = static_cast<T>(static_cast<const P*>(table.ptr[0][t])[e]);
      r[1] = static_cast<T>(static_cast<const G*>(table.ptr[1][t])[e]);
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const float absmax = static_cast<const float*>(table.ptr[3 + 2 * s][t])[b];
        const int code = nibble4(static_cast<const uint8_t*>(table.ptr[2 + 2 * s][t]), e);
        if ((signs >> s) & 1u) {
          r[2 + s] = static_cast<T>(kDeviceMaps4.signed_value[code] * absmax);
        } else {  // Note [square-root states] (rules_quant.h): the codes hold sqrt(state)
          const float root = kDeviceMaps4.unsigned_value[code] * absmax;
          r[2 + s] = static_cast<T>(root * root);
        }
      }
      op(r);
      static_cast<P*>(table.ptr[0][t])[e] = rounding::store_param<L>(r[0], key, e);
      if constexpr (L::kCopy) static_cast<O*>(table.ptr[2 + 2 * S][t])[e] = static_cast<O>(r[0]);
    }
#pragma unroll
    for (int s = 0; s < S; ++s) r[2 + s] = ((signs >> s) & 1u) ? r[2 + s] : ::sqrt(r[2 + s]);
#pragma unroll
    for (int s = 0; s < S; ++s) {
      T m = active ? (r[2 + s] < T(0) ? -r[2 + s] : r[2 + s]) : T(0);
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) m = cuda_impl::nan_max(m, __shfl_xor_sync(0xffffffffu, m, off));
      if (lane == 0) partial[s][warp] = m;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < S; ++s) {
      T m = partial[s][0];
#pragma unroll
      for (int w = 1; w < W; ++w) m = cuda_impl::nan_max(m, partial[s][w]);
      const float absmax = static_cast<float>(m);
      if (i == 0) static_cast<float*>(table.ptr[3 + 2 * s][t])[b] = absmax;
      const T inv = absmax > 0.0f ? T(1) / static_cast<T>(absmax) : T(0);
      const float* mid = ((signs >> s) & 1u) ? kDeviceMaps4.signed_mid : kDeviceMaps4.unsigned_mid;
      const int code = active ? encode4(r[2 + s] * inv, mid) : 0;  // an odd tail's unused nibble is 0
      const int high = __shfl_xor_sync(0xffffffffu, code, 1);
      if (active && (i & 1) == 0) {
        static_cast<uint8_t*>(table.ptr[2 + 2 * s][t])[e >> 1] = static_cast<uint8_t>(code | (high << 4));
      }
    }
    __syncthreads();  // partial is reused by the next block
  }
}

}  // namespace cuda4_impl

template <>
struct Driver4<cuda::Backend> {
  // Note [CUDA block launch] (quant_cuda.cuh), with flat blocks of kBlock4 elements.
  template <class L, typename Op>
  static void apply(const Work& work, const Op& op, const Forms& fm) {
    constexpr int S = Op::depth - 2;
    constexpr int N = 2 + 2 * S + (L::kCopy ? 1 : 0);
    if constexpr (N > kMaxDepth || S > kMaxStates) {
      TORCH_CHECK(false, "fusedtrain: too many quantized state lists for one tuple");
    } else {
      unsigned signs = 0;
      for (int s = 0; s < S; ++s) {
        TORCH_CHECK(!fm.is_float(s), "fusedtrain: 4-bit states keep no float state (Note [mixed state lists])");
        signs |= fm.is_signed(s) ? (1u << s) : 0u;
      }
      cuda_impl::launch_blocks<cuda4_impl::quant4_kernel<L, Op, N>, kBlock4, N>(
          work, op, signs, "4-bit", [&](size_t i) {
            return std::pair<int64_t, int64_t>(num_blocks4(work.numel[i]), work.numel[i]);
          });
    }
  }
};

}  // namespace quant
}  // namespace fusedtrain
