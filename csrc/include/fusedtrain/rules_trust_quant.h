// LAMB and LARS with 8-bit states (Note [quantized rules] in rules_quant.h): the passes of their float rules
// (Note [trust-ratio passes] in rules_trust.h), with the same ops and finishers, on the 8-bit block walk.
//
// Note [quantized trust passes]:
// LARS's momentum buffer is signed; LAMB's exp_avg is signed and exp_avg_sq unsigned (stored through its
// square root, Note [square-root states]). A pass that touches the states runs on the backend's 8-bit block
// walk (quant_cpu.h, quant_cuda.cuh), which decodes a block, runs the op and requantizes what the op stores
// (Note [block passes that read or reduce]):
//   LARS   pass 1 (sum(p^2), sum(g^2)) reads no state: the float rule's reduction as is. Pass 2, the SGD
//          update with the momentum buffer and the tensor's ratio (aux), is a block update.
//   LAMB   pass 1 is a reducing block pass: the block's m, v are updated and requantized, then decoded again
//          from their new codes, and the terms p'^2, u^2 are taken from those stored values (the float rule's
//          norms op), so the ratio is that of the update pass 2 applies; the blocks' sums are added per tensor
//          in block order (deterministic). Pass 2 decodes m, v (read only: their codes stay as they are) and
//          applies p' - lr * ratio * u. Without adaptation, one block pass updates m, v and p from the new m, v
//          in registers, as the other 8-bit rules do.
//          With caution the mask's count would have to come from the stored moments too (a read-only mask op
//          as the terms of pass 1, a read-only norms pass, and on CUDA the true numel for the finisher): not
//          done; lamb8bit refuses caution in states() (before any write), and fusedtrain.optim.Lamb refuses
//          caution=True with state_bits=8 (python/fusedtrain/optim/lamb.py).
// The states' storage type of the ops is the opmath type: the 8-bit ops see decoded values, never a float16 or
// bfloat16 state. The trust ratios' finishers see each tensor's sums as in the float rules (across shards too:
// Note [sums across shards]); on CUDA their numel is the row length (quant_cuda.cuh's table), which the LAMB
// (without caution) and LARS finishers do not read.
// Layouts: those of the other 8-bit rules (quant::for_layout); no fused EMA (the optimizer runs the EMA's own
// pass for quantized states).
//
// Backend interface, beyond the float rules' (trust_quant_cpu.h, trust_quant_cuda.cuh):
//   template <class L, class Op> static void apply_blocks(const Work&, const Op&, const quant::Signs&);
//   template <class L, class Op, class Fin> static void reduce_blocks(const Work&, const Op&, const quant::Signs&,
//       const Fin&, Work& out)   a block pass whose op has terms (math::BlockPass), finished like reduce.
#pragma once

#include "fusedtrain/rules_quant.h"
#include "fusedtrain/rules_trust.h"

namespace fusedtrain {
namespace math {

// A reducing block pass (Note [block passes that read or reduce] in quant_cpu.h): Update's step on the decoded
// block (its own terms dropped), and Terms' terms on the block as stored afterwards.
template <typename T, typename Update, typename Terms>
struct BlockPass {
  static_assert(Terms::depth == Update::depth && Terms::kStore == 0u && Terms::kSums > 0,
                "the terms of a block pass come from a read-only op of the same registers");
  static constexpr int depth = Update::depth;
  static constexpr unsigned kStore = Update::kStore;
  static constexpr int kSums = Terms::kSums;
  Update update;
  Terms reduce;

  FT_HD void bind(const Bound& b) {
    update.bind(b);
    reduce.bind(b);
  }
  FT_HD void operator()(T* r) const {
    double t[2];
    update(r, t);
  }
  FT_HD void terms(T* r, double* t) const { reduce(r, t); }
};

}  // namespace math

namespace rules {

struct Lars8bit : Quantized<Lars8bit, Lars> {
  static constexpr const char* kName = "lars8bit";
  static quant::Signs signed_states(const double*) { return {true, false, false}; }

  template <class Backend>
  static void run(const host::RunArgs& a) {
    const double* h = a.hyper;
    const bool adapt = h[kWeightDecay] != 0.0 || h[kAlwaysAdapt] != 0.0;
    const quant::Signs sgn = signed_states(h);
    quant::for_layout(a.prec, [&](auto layout) {
      using L = decltype(layout);
      using T = at::opmath_type<typename L::P>;
      const Work* last = &a.work;
      Work w1;
      if (adapt) {  // pass 1 reads no state: the float rule's reduction
        w1 = a.work;
        const math::LarsFin<T> fin{T(h[kTrustCoeff]), T(h[kWeightDecay]), T(h[kEps]), h[kTrustClip] != 0.0};
        Backend::template reduce<L>(a.work, make<T, math::kLarsNorms, false>(h, a.common), fin, w1);
        last = &w1;
      }
      if (h[kMomentum] != 0.0) {
        using Op = math::LarsOp<T, math::kLarsApply, true>;
        Backend::template apply_blocks<L>(*last, math::NoSums<T, Op>{make<T, math::kLarsApply, true>(h, a.common)},
                                          sgn);
      } else {  // no state (as Sgd8bit without momentum)
        using Op = math::LarsOp<T, math::kLarsApply, false>;
        Backend::template apply_blocks<L>(*last, math::NoSums<T, Op>{make<T, math::kLarsApply, false>(h, a.common)},
                                          sgn);
      }
    });
  }
};

struct Lamb8bit : Quantized<Lamb8bit, Lamb> {
  static constexpr const char* kName = "lamb8bit";
  static quant::Signs signed_states(const double*) { return {true, false, false}; }
  // (checked here: the call's checks ask for the state lists before anything is written, Note [refused calls])
  static Names states(const double* h) {
    TORCH_CHECK(h[kCaution] == 0.0, "fusedtrain: 'lamb8bit' has no caution passes (Note [quantized trust "
                "passes]); use caution=False, or float states (state_bits=32)");
    return Quantized::states(h);
  }

  template <class Backend>
  static void run(const host::RunArgs& a) {
    const double* h = a.hyper;
    TORCH_CHECK(h[kCaution] == 0.0, "fusedtrain: 'lamb8bit' has no caution passes");  // (states() refused it)
    const bool adapt = h[kWeightDecay] != 0.0 || h[kAlwaysAdapt] != 0.0, clip = h[kTrustClip] != 0.0;
    const quant::Signs sgn = signed_states(h);
    quant::for_layout(a.prec, [&](auto layout) {
      using L = decltype(layout);
      using T = at::opmath_type<typename L::P>;
      // the states' storage type of the ops: T (Note [quantized trust passes])
      if (adapt) {
        using Moments = math::LambOp<T, T, math::kLambMoments, false>;
        using Norms = math::LambOp<T, T, math::kLambNorms, false>;
        using Apply = math::LambOp<T, T, math::kLambApply, false>;
        Work w1 = a.work;
        Backend::template reduce_blocks<L>(
            a.work,
            math::BlockPass<T, Moments, Norms>{make<T, T, math::kLambMoments, false>(h, a.common),
                                               make<T, T, math::kLambNorms, false>(h, a.common)},
            sgn, math::LambFin<T, math::kLambMoments, false>{adapt, clip}, w1);
        const math::NoSums<T, Apply> apply{make<T, T, math::kLambApply, false>(h, a.common)};
        Backend::template apply_blocks<L>(w1, apply, sgn);
      } else {
        using Full = math::LambOp<T, T, math::kLambFull, false>;
        const math::NoSums<T, Full> full{make<T, T, math::kLambFull, false>(h, a.common)};
        Backend::template apply_blocks<L>(a.work, full, sgn);
      }
    });
  }
};

}  // namespace rules
}  // namespace fusedtrain
