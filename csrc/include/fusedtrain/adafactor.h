// Adafactor (Shazeer & Stern 2018) in torch.optim.Adafactor's parametrization, one parameter per call
// (the fusedtrain::adafactor_ op, ops.cpp). The formulas here are shared by the drivers.
//
// Note [Adafactor passes]:
// torch's single-tensor step makes ~19 passes over a factored (>= 2-D) parameter: the row and column
// norms of the gradient, the parameter's norm, the outer product row_var @ col_var materialized, then
// div_, clamp_, rsqrt_, mul_ and norm over it, the weight decay and the update. The op makes three:
//   1. read g and p: the squared row and column sums of g (one sweep, per-thread column partials) and the
//      squared norm of p (alpha needs it before the decay);
//   (the factors are tiny: row_var / col_var are updated on the host side of the op, in torch's order)
//   2. read g: the squared norm of the update u = g * rsqrt(max(r_i c_j / R, eps1^2)), recomputed per
//      element from the factors (nothing m x n is written);
//   3. read g and p, write p: p <- p*(1 - lr*wd) - alpha/denom * u.
// An unfactored (0-D / 1-D) parameter: pass 1 reads p, pass 2 also updates its `variance`, pass 3 as above.
//
// Note [Adafactor rounding]:
// Every quantity torch keeps in a tensor of the parameter's dtype S is rounded to S where torch's tensor op
// would round it (rnd below: a no-op for float32 in float32 arithmetic, and for float64), so bfloat16 and
// float16 parameters follow torch's roundings too. The sums are accumulated in double (torch sums in the
// opmath type with its own order): float32 results agree with torch to a few ulps, float64 to ~1e-15.
#pragma once

#include <cmath>

#include "fusedtrain/math.h"

namespace fusedtrain {
namespace adafactor {

// The scalars of one parameter's step, computed by the host in double as torch computes them in Python.
struct Scalars {
  double one_minus_beta2;  // step ** beta2_decay
  double eps1, eps1_sq;    // eps1 (clamp of the row mean) and eps1 * eps1 (clamp of the variance estimate)
  double decay;            // 1 - lr * weight_decay (exactly 1 without weight decay)
  double inv_scale, clip_coef;  // GradScaler's 1/scale and max_grad_norm's coefficient (1 when unused)
  double sign;                  // -1 for maximize, else 1
};

// x rounded to the storage type S and back (Note [Adafactor rounding]).
template <typename S, typename T>
FT_HD T rnd(T x) {
  return static_cast<T>(static_cast<S>(x));
}

// The gradient as torch's step sees it: unscaled and clipped in place by GradScaler / clip_grad_norm_
// (rounded to S after each; with both factors 1 this is exactly g), times sign = -1 for maximize. No
// branches and no bools: the loops over it vectorize (Note [flags as numbers] in math.h).
template <typename S, typename T>
FT_HD T grad(S g, T inv_scale, T clip_coef, T sign) {
  return rnd<S>(rnd<S>(static_cast<T>(g) * inv_scale) * clip_coef) * sign;
}

// clamp_(min=lo) as torch computes it: NaN stays NaN.
template <typename T>
FT_HD T clamp_min(T x, T lo) {
  return x != x ? x : (x < lo ? lo : x);
}

// u = g * rsqrt(max(v, eps1^2)) for the variance estimate v (already rounded to S); torch: clamp_, rsqrt_
// (1/sqrt), mul_(grad), each rounded to S.
template <typename S, typename T>
FT_HD T update(T v, T g, T eps1_sq) {
  const T c = rnd<S>(clamp_min(v, eps1_sq));
  const T r = rnd<S>(T(1) / std::sqrt(c));
  return rnd<S>(r * g);
}

// The factored variance estimate of element (i, j): (row_var_i * col_var_j) / R (row_var @ col_var, div_).
template <typename S, typename T>
FT_HD T factored_estimate(T row, T col, T row_mean) {
  return rnd<S>(rnd<S>(row * col) / row_mean);
}

// p <- p * decay, then p + step * u, with step = -alpha / denom. torch skips the multiplication when
// weight_decay == 0; decay is then exactly 1 and the product exactly p.
template <typename S, typename T>
FT_HD T apply(T p, T u, T decay, T step) {
  return rnd<S>(rnd<S>(p * decay) + step * u);
}

}  // namespace adafactor
}  // namespace fusedtrain
