// Per-element rules of the dropout family (dropout, Dropout2d, DropPath, DropConnect, bias-dropout-add),
// shared by the CPU driver (cpu/dropout.cpp) and the CUDA driver (cuda/dropout.cu).
//
// Note [dropout keep rule]:
// Each decision index d (an element for dropout, a (sample, channel) pair for Dropout2d, a sample for
// DropPath) draws the uint32 word u_d of Note [fusedtrain random stream] (philox.h). It is dropped iff
//     u_d < t,   t = min(floor(p * 2^32 + 1/2), 2^32 - 1),
// so P(drop) = t / 2^32 differs from p by at most 2^-32 (2^-33 unless p > 1 - 2^-33). t is computed
// once on the host in double precision (p * 2^32 is exact, the + 1/2 and floor are exact below 2^53).
// A kept element is multiplied by `scale`, a dropped one by 0 (so NaN/inf inputs stay NaN, as in torch):
//     scale = 1 / (1 - p) in the opmath type: float(1) / float(1 - p) for float32/float16/bfloat16 (the
//             division torch's CPU dropout does for float32), 1.0 / (1.0 - p) for float64;
//     scale = 0 for p = 1 (every element dropped), 1 when rescaling is off (DropPath scale_by_keep=False).
// fp16/bf16 elements are multiplied in float and rounded once; torch's CPU kernel instead rounds the
// scale to the half type first (a bias of up to 2^-9 relative in bf16), its CUDA kernel does as we do.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "fusedtrain/math.h"  // FT_HD
#include "fusedtrain/philox.h"

namespace fusedtrain {
namespace dropout {

template <typename T>
struct KeepRule {
  uint32_t threshold;  // drop iff u < threshold
  T scale;             // multiplier of a kept element

  FT_HD T multiplier(uint32_t u) const { return u >= threshold ? scale : T(0); }
};

inline uint32_t drop_threshold(double p) {
  const double t = std::floor(p * 4294967296.0 + 0.5);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

inline void check_p(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "fusedtrain.", op, ": dropout probability has to be between 0 and 1, but got ",
              p);
}

template <typename T>
KeepRule<T> make_rule(double p, bool rescale) {
  KeepRule<T> rule;
  rule.threshold = drop_threshold(p);
  if (p >= 1.0) {
    rule.scale = T(0);
  } else if (!rescale) {
    rule.scale = T(1);
  } else {
    rule.scale = T(1) / static_cast<T>(1.0 - p);
  }
  return rule;
}

// residual + dropout(x + bias): the kept value (x + b) is scaled, then the residual added, each rounded
// in the opmath type as torch's `residual + (x + b) * mask_scale` would round them in float32/float64.
template <typename T>
FT_HD T bias_dropout_add(T x, T b, T residual, T multiplier) {
  return residual + (x + b) * multiplier;
}

}  // namespace dropout
}  // namespace fusedtrain
