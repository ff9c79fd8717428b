// The vector norm of many tensors at once (gradient clipping), shared by the CPU and CUDA drivers.
//
// Note [norm accumulation]:
// Each element contributes a term (|x|, x*x, |x|^p, or |x| for the max). Terms are summed in the opmath
// type A over short runs (at most kRun elements per SIMD lane or thread: float's rounding error stays
// near 1e-6 relative) and the run sums are accumulated in double, so long inputs lose no accuracy.
// Both drivers use a fixed split (blocks of the flat index space), which makes the result deterministic
// run to run. The total is returned in float32 (float64 for float64 inputs).
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

constexpr int kRun = 1024;  // elements summed in the opmath type before a double accumulation

template <typename A>
FT_HD A term(A x, Kind kind, double p) {
  const A a = x < A(0) ? -x : x;
  switch (kind) {
    case kL1:
    case kInf:
      return a;
    case kL2:
      return x * x;
    default:
      return static_cast<A>(::pow(static_cast<double>(a), p));
  }
}

// Sums for the p-norms; for the infinity norm a max that propagates NaN, as torch.linalg.vector_norm does.
template <typename A>
FT_HD A combine(A acc, A t, Kind kind) {
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
