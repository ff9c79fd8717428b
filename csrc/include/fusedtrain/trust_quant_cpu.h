// The CPU backend of the 8-bit trust-ratio rules (Note [quantized trust passes] in rules_trust_quant.h): the
// trust-ratio driver (trust_cpu.h) for the passes without states, the 8-bit block walk (quant_cpu.h) for the
// others, and the trust driver's finisher for the block walk's per-tensor sums.
#pragma once

#include <vector>

#include "fusedtrain/quant_cpu.h"
#include "fusedtrain/rules_trust_quant.h"
#include "fusedtrain/trust_cpu.h"

namespace fusedtrain {
namespace trust_quant_cpu {

struct Backend : trust_cpu::Backend {
  template <class L, typename Op>
  static void apply_blocks(const Work& work, const Op& op, const quant::Signs& sgn) {
    quant::Driver<cpu::Backend>::template apply<L>(work, op, sgn);
  }

  // Note [block passes that read or reduce] (quant.h): deterministic per-tensor sums, then the finisher.
  template <class L, typename Op, typename Fin>
  static void reduce_blocks(const Work& work, const Op& op, const quant::Signs& sgn, const Fin& fin, Work& out) {
    static_assert(quant::BlockSums<Op>::value > 0, "a reducing block pass has terms");
    finish(work, quant::cpu_impl::run_blocks<quant::cpu_impl::RowBlocks, L>(work, op, sgn), fin, out);
  }
};

}  // namespace trust_quant_cpu
}  // namespace fusedtrain
