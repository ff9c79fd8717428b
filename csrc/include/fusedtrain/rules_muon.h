// Muon's element-wise passes (Jordan et al. 2024, torch.optim.Muon's parametrization), around the batched
// Newton-Schulz matmuls that python/fusedtrain/optim/muon.py runs with ATen:
//   1. "muon_momentum": B <- lerp(B, g, 1 - mu);  U = lerp(g, B, mu) (nesterov) or B,  written in the
//      Newton-Schulz input dtype (bfloat16 directly from float32: the bfloat16-state layout);
//   2. "muon_update":   p <- p * (1 - lr*wd);  p <- p - lr_adj * O,  with O the orthogonalized update.
// Both follow torch's single-tensor arithmetic operation by operation (Note [one source of truth] in math.h).
#pragma once

#include <array>

#include "fusedtrain/math.h"
#include "fusedtrain/rules.h"

namespace fusedtrain {
namespace math {

// The momentum step of one element: B <- lerp(B, g, 1 - mu) in place; returns U (the Newton-Schulz input).
template <typename T>
struct MuonMomentumMath : GradPrescale<T> {
  T momentum, one_minus_momentum;
  T nesterov;  // flag (Note [flags as numbers])

  FT_HD void bind(const Bound& b) { this->bind_prescale(b); }

  FT_HD T momentum_step(T& buf, T grad) const {
    const T g = this->grad(grad);
    buf = lerp(buf, g, one_minus_momentum);         // buf.lerp_(grad, 1 - momentum)
    return on(nesterov) ? lerp(g, buf, momentum) : buf;  // grad.lerp(buf, momentum)
  }
};

// Registers: (B, g, U): the momentum buffer takes the parameter's place (updated in place), U is written.
template <typename T>
struct MuonMomentumOp : MuonMomentumMath<T> {
  static constexpr int depth = 3;
  FT_HD void operator()(T* r) const { r[2] = this->momentum_step(r[0], r[1]); }
};

// Registers: (U, g, B): the same step with U in the parameter's place (written, never read) and B a state,
// for the block drivers of quantized states, which keep states in registers and a float tensor in slot 0
// (Note [Muon's 8-bit momentum] in rules_muon_quant.h).
template <typename T>
struct MuonMomentumOutOp : MuonMomentumMath<T> {
  static constexpr int depth = 3;
  FT_HD void operator()(T* r) const { r[0] = this->momentum_step(r[2], r[1]); }
};

// Registers: (p, O). lr is the shape-adjusted learning rate (adjust_lr_fn), decay = 1 - lr*weight_decay
// with torch's (unadjusted) lr, computed in double as torch computes it in Python.
template <typename T>
struct MuonUpdateOp {
  static constexpr int depth = 2;
  T decay, lr;

  FT_HD void bind(const Bound& b) { lr = static_cast<T>(b.lr); }

  FT_HD void operator()(T* r) const {
    const T p = r[0] * decay;  // param.mul_(1 - lr * weight_decay)
    r[0] = p + (-lr) * r[1];   // param.add_(update, alpha=-adjusted_lr)
  }
};

}  // namespace math

namespace rules {

struct MuonMomentum {
  static constexpr const char* kName = "muon_momentum";
  enum { kMomentum, kNesterov };
  static constexpr std::array<const char*, 2> kHyper{"momentum", "nesterov"};
  static constexpr bool kCountsSteps = false;
  // true for the float32-params-with-bfloat16-states layout: U is written in bfloat16 in the same pass
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"updates"}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common&, Launch&& launch) {
    launch(op<math::MuonMomentumOp<T>>(h));
  }

  // The functor Op (MuonMomentumOp or MuonMomentumOutOp) with this rule's hyperparameters.
  template <class Op>
  static Op op(const double* h) {
    using T = decltype(Op::momentum);
    Op o{};
    o.momentum = T(h[kMomentum]);
    o.one_minus_momentum = T(1.0 - h[kMomentum]);
    o.nesterov = flag<T>(h[kNesterov]);
    return o;
  }
};

struct MuonUpdate {
  static constexpr const char* kName = "muon_update";
  enum { kDecay };
  static constexpr std::array<const char*, 1> kHyper{"decay"};
  static constexpr bool kCountsSteps = false;
  static constexpr bool kMixedPrecision = false;
  static constexpr bool kFusedEma = true;  // Muon's ema=: the averages move in this pass (fuses_ema, optim_host.h)
  static Names states(const double*) { return {}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common&, Launch&& launch) {
    math::MuonUpdateOp<T> op{};
    op.decay = T(h[kDecay]);
    launch(op);
  }
};

}  // namespace rules
}  // namespace fusedtrain
