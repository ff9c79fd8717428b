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

// Registers: (B, g, U): the momentum buffer takes the parameter's place (updated in place), U is written.
template <typename T>
struct MuonMomentumOp : GradPrescale<T> {
  static constexpr int depth = 3;
  T momentum, one_minus_momentum;
  T nesterov;  // flag (Note [flags as numbers])

  FT_HD void bind(const Bound& b) { this->bind_prescale(b); }

  FT_HD void operator()(T* r) const {
    const T g = this->grad(r[1]);
    const T b = lerp(r[0], g, one_minus_momentum);  // buf.lerp_(grad, 1 - momentum)
    r[0] = b;
    r[2] = on(nesterov) ? lerp(g, b, momentum) : b;  // grad.lerp(buf, momentum)
  }
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
    math::MuonMomentumOp<T> op{};
    op.momentum = T(h[kMomentum]);
    op.one_minus_momentum = T(1.0 - h[kMomentum]);
    op.nesterov = flag<T>(h[kNesterov]);
    launch(op);
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
