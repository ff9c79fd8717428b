// Per-element rules of the regularization penalty, shared by cpu/regularization.cpp and
// cuda/regularization.cu.
//
// Note [penalty convention]:
//     penalty(params) = l1 * sum_i |theta_i| + l2 * sum_i theta_i^2          (sums over every element)
//     d penalty / d theta = l1 * sign(theta) + 2 * l2 * theta               (sign(0) = 0, as torch.sign)
// The two sums are accumulated separately in the opmath type (float32 for float32/float16/bfloat16,
// float64 for float64) and combined once at the end. SGD's weight_decay=lambda adds lambda*theta to the
// gradient, which is the gradient of this penalty with l2 = lambda / 2.
#pragma once

#include <cmath>

#include "fusedtrain/math.h"  // FT_HD

namespace fusedtrain {
namespace regularization {

template <typename T>
FT_HD T abs_term(T x) {
  return x < T(0) ? -x : x;
}

template <typename T>
FT_HD T square_term(T x) {
  return x * x;
}

template <typename T>
FT_HD T sign(T x) {
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
}

template <typename T>
FT_HD T penalty_grad(T x, T l1, T two_l2) {
  // A zero coefficient drops its term, so l2 = 0 with an infinite parameter gives +-l1, not NaN.
  return l1 * sign(x) + (two_l2 != T(0) ? two_l2 * x : T(0));
}

// For the multi-tensor drivers (cpu_driver.h, cuda_launcher.cuh). Registers: r[0] = the gradient
// (written), r[1] = theta (read). `scale` is the incoming gradient of the penalty (a host value on the
// CPU); ScalePtrOp reads it from device memory, so the CUDA backward needs no host synchronization.
template <typename T>
struct PenaltyGradOp {
  static constexpr int depth = 2;
  T l1, two_l2, scale;

  FT_HD void bind(const math::Bound&) {}  // nothing per step (Note [per-tensor binding])
  FT_HD void operator()(T* r) const { r[0] = scale * penalty_grad(r[1], l1, two_l2); }
};

template <typename T>
struct PenaltyGradScalePtrOp {
  static constexpr int depth = 2;
  T l1, two_l2;
  const T* scale;

  FT_HD void bind(const math::Bound&) {}
  FT_HD void operator()(T* r) const { r[0] = *scale * penalty_grad(r[1], l1, two_l2); }
};

}  // namespace regularization
}  // namespace fusedtrain
