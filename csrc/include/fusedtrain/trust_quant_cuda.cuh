// The CUDA backend of the 8-bit trust-ratio rules (Note [quantized trust passes] in rules_trust_quant.h): the
// trust-ratio driver (trust_cuda.cuh) for the passes without states, the 8-bit block kernel (quant_cuda.cuh)
// for the others, and the trust driver's finisher for the block kernel's per-block sums.
#pragma once

#include "fusedtrain/quant_cuda.cuh"
#include "fusedtrain/rules_trust_quant.h"
#include "fusedtrain/trust_cuda.cuh"

namespace fusedtrain {
namespace trust_quant_cuda {

struct Backend : trust_cuda::Backend {
  template <class L, typename Op>
  static void apply_blocks(const Work& work, const Op& op, const quant::Signs& sgn) {
    quant::Driver<cuda::Backend>::template apply<L>(work, op, sgn);
  }

  // Note [block passes that read or reduce] (quant.h): each quantization block's sums into its own slot, then
  // trust_cuda.cuh's finisher adds a tensor's blocks in order (Note [deterministic per-tensor sums on the GPU]).
  // (The finisher's numel is the row length there: Note [quantized trust passes].)
  template <class L, typename Op, typename Fin>
  static void reduce_blocks(const Work& work, const Op& op, const quant::Signs& sgn, const Fin& fin, Work& out) {
    constexpr int S = Op::depth - 2;
    constexpr int N = 2 + 2 * S + (L::kCopy ? 1 : 0);
    static_assert(quant::BlockSums<Op>::value > 0, "a reducing block pass has terms");
    if constexpr (N > kMaxDepth || S > quant::kMaxStates) {
      TORCH_CHECK(false, "fusedtrain: too many quantized state lists for one tuple");
    } else {
      const unsigned signs = quant::cuda_impl::sign_bits(sgn, S);
      int64_t all_blocks = 0;
      for (size_t i = 0; i < work.size(); ++i) all_blocks += quant::tensor_blocks(work.numel[i], work.row[i]);
      trust_cuda::reduce_tables<N>(
          work, fin, all_blocks, out, [&](auto&& fn) { quant::cuda_impl::for_each_table8<N>(work, fn); },
          [&](const cuda::TensorTable<N>& table, int64_t blocks, double* part, int64_t base) {
            quant::cuda_impl::launch8<L>(work, table, blocks, op, signs, part, base);
          });
    }
  }
};

}  // namespace trust_quant_cuda
}  // namespace fusedtrain
