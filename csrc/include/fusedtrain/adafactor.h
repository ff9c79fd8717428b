// Adafactor (Shazeer & Stern 2018) in torch.optim.Adafactor's parametrization (the fusedtrain::adafactor_
// op, ops.cpp: one call per (param group, dtype)). The formulas here are shared by the drivers: the CPU
// driver (cpu/optim_adafactor.cpp, Note [Adafactor blocks]) only loads, calls these and stores.
//
// Note [Adafactor passes]:
// torch's single-tensor step makes ~19 passes over a factored (>= 2-D) parameter: the row and column
// norms of the gradient, the parameter's norm, the outer product row_var @ col_var materialized, then
// div_, clamp_, rsqrt_, mul_ and norm over it, the weight decay and the update. The op makes three:
//   1. read g and p: the squared row and column sums of g and the squared norm of p (alpha needs it
//      before the decay); each row's row_var is updated as soon as its sum is complete, col_var and the
//      slice's row mean R as soon as the slice's column sums are (Note [Adafactor blocks]);
//   2. read g: the squared norm of the update u = g * rsqrt(max(r_i c_j / R, eps1^2)), recomputed per
//      element from the factors (nothing m x n is written);
//   3. read g and p, write p: p <- p*(1 - lr*wd) - alpha/denom * u.
// An unfactored (0-D / 1-D) parameter makes two: p's norm, the variance update and u's norm in one (the
// variance does not depend on p), then the update (reading the variance again).
//
// Note [Adafactor rounding]:
// Every quantity torch keeps in a tensor of the parameter's dtype S is rounded to S where torch's tensor op
// would round it (rnd below: a no-op for float32 in float32 arithmetic, and for float64), so bfloat16 and
// float16 parameters follow torch's roundings too. The sums are accumulated in double (torch sums in the
// opmath type with its own order): float32 results agree with torch to a few ulps, float64 to ~1e-15.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedtrain/math.h"

namespace fusedtrain {
namespace adafactor {

// The per-parameter scalars of torch's step, from the step count after its increment, in double as torch
// computes them in Python: one_minus_beta2_t = step ** beta2_decay, rho_t = min(lr, 1 / step ** 0.5)
// (Python's min keeps its first argument unless the second is smaller).
inline double one_minus_beta2(double step, double beta2_decay) { return std::pow(step, beta2_decay); }
inline double rho(double step, double lr) {
  const double r = 1.0 / std::pow(step, 0.5);
  return r < lr ? r : lr;
}

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

// row_mean / col_mean of torch's step from a squared sum over `count` elements: vector_norm (rounded to
// S), square_, div_(count), each rounded to S. The sum itself is accumulated in double by the driver.
template <typename S, typename T>
FT_HD T mean_square(double sq, int64_t count) {
  const T norm = rnd<S>(static_cast<T>(std::sqrt(sq)));
  return rnd<S>(rnd<S>(norm * norm) / static_cast<T>(count));
}

// R = row_var.mean(dim=-2).clamp_(min=eps1) from the (double) sum of one slice's m updated row_var values.
template <typename S, typename T>
FT_HD T row_mean(double row_sum, int64_t m, T eps1) {
  return rnd<S>(clamp_min(rnd<S>(static_cast<T>(row_sum / static_cast<double>(m))), eps1));
}

// -alpha / denom of torch's step, from the squared norms of p (before the decay) and of the update u:
// alpha = max(eps2, ||p|| / sqrt(numel)) * rho, denom = max(1, ||u|| / (sqrt(numel) d)), the norms rounded
// to S as torch's .norm() returns them, the rest in double (Python). Python's max(a, b) keeps a unless
// b > a (a NaN b gives a).
template <typename S, typename T>
FT_HD double step_size(double p_sq, double u_sq, int64_t numel, double eps2, double rho, double d) {
  const double root = std::sqrt(static_cast<double>(numel));
  const double p_rms = static_cast<double>(rnd<S>(static_cast<T>(std::sqrt(p_sq)))) / root;
  const double alpha = (p_rms > eps2 ? p_rms : eps2) * rho;
  const double ratio = static_cast<double>(rnd<S>(static_cast<T>(std::sqrt(u_sq)))) / (root * d);
  const double denom = ratio > 1.0 ? ratio : 1.0;
  return -alpha / denom;
}

}  // namespace adafactor
}  // namespace fusedtrain
