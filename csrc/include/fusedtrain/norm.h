// The vector norm of many tensors at once (gradient clipping), shared by the CPU and CUDA drivers.
//
// Note [norm accumulation]:
// Each element contributes a term (|x|, x*x, |x|^p, or |x| for the max), accumulated in double, so the
// result does not depend on how the elements are split between threads or blocks beyond double
// rounding; both drivers use a fixed split (blocks of the flat index space), which makes the result
// deterministic run to run. The total is returned in float32 (float64 for float64 inputs).
#pragma once

#include <cmath>

#include "fusedtrain/math.h"

namespace fusedtrain {
namespace norm {

enum Kind : int { kP = 0, kL1 = 1, kL2 = 2, kInf = 3 };

inline Kind kind_of(double p) {
  if (std::isinf(p) && p > 0) return kInf;
  if (p == 1.0) return kL1;
  if (p == 2.0) return kL2;
  return kP;
}

FT_HD double term(double x, Kind kind, double p) {
  const double a = x < 0 ? -x : x;
  switch (kind) {
    case kL1:
    case kInf:
      return a;
    case kL2:
      return x * x;
    default:
      return ::pow(a, p);
  }
}

// Sums for the p-norms; for the infinity norm a max that propagates NaN, as torch.linalg.vector_norm does.
FT_HD double combine(double acc, double t, Kind kind) {
  if (kind != kInf) return acc + t;
  return (t != t || t > acc) ? t : acc;
}

FT_HD double finish(double acc, Kind kind, double p) {
  switch (kind) {
    case kL1:
    case kInf:
      return acc;
    case kL2:
      return ::sqrt(acc);
    default:
      return ::pow(acc, 1.0 / p);
  }
}

}  // namespace norm
}  // namespace fusedtrain
