// Optimizers beyond torch.optim: Lion (timm.optim.Lion) and Schedule-Free AdamW / SGD (the schedulefree
// package's AdamWScheduleFree / SGDScheduleFree). Functors in fusedtrain::math, rules in fusedtrain::rules,
// as in math.h / rules.h (Note [optimizer rules]); included only by cpu/optim_beyond.cpp and
// cuda/optim_beyond.cu.
//
// Note [group scalars on the host]:
// Schedule-Free keeps its schedule per param group, not per tensor: the step count k, the warm-up factor,
// lr_max, the running weight sum and from them c_{k+1} = weight / weight_sum. The reference computes them
// in Python doubles once per group and step; so does fusedtrain (python/fusedtrain/optim/schedulefree.py),
// and hands the finished values to the kernel as hyperparameters (the op's `hyper` list is read every
// step). Everything element-wise stays in one pass per parameter: the second moment, the normalized
// gradient, the y and z updates. The rules therefore keep no step counters (kCountsSteps = false) and the
// call's lr is not used (the schedule's lr is one of the hyperparameters); a step captured in a CUDA
// graph would bake these values in, so the Python classes refuse capture.
#pragma once

#include <array>
#include <cmath>

#include "fusedtrain/math.h"
#include "fusedtrain/rules.h"
#include "fusedtrain/rules_trust.h"  // cautious Lion's per-tensor mask mean (Note [trust-ratio passes])

namespace fusedtrain {
namespace math {

// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), timm's parametrization:
//   p <- p*(1 - s*wd) with s = lr (or lr^2/max_lr with corrected weight decay);
//   u = sign(lerp(m, g, 1 - b1));  p <- p - lr*u;  m <- lerp(m, g, 1 - b2).
// sign is 0 at 0 and at NaN, as torch.sign is.  Registers: (p, g, m).
template <typename T>
struct LionOp : GradPrescale<T> {
  static constexpr int depth = 3;
  double weight_decay_d, max_lr;  // max_lr: > 0 for corrected weight decay (lr^2 / max_lr), else 0
  T one_minus_beta1, one_minus_beta2;
  T decay_factor, lr;  // bound per tensor
  T maximize;          // flag (Note [flags as numbers])

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    lr = static_cast<T>(b.lr);
    const double wd_scale = max_lr > 0.0 ? ::pow(b.lr, 2.0) / max_lr : b.lr;
    decay_factor = static_cast<T>(1.0 - wd_scale * weight_decay_d);
  }

  FT_HD void operator()(T* r) const {
    const T g = effective_grad(this->grad(r[1]), r[0], maximize, T(0), this->l1);
    const T p = r[0] * decay_factor;
    const T u = sign(lerp(r[2], g, one_minus_beta1));
    r[0] = p + (-lr) * u;
    r[2] = lerp(r[2], g, one_minus_beta2);
  }
};

// Cautious Lion (Liang et al. 2024, "Cautious Optimizers"; timm.optim.Lion(caution=True)): LionOp's update u is
// kept only where it agrees with the gradient (u*g > 0) and rescaled by 1 / max(mean(mask), 1e-3), the mask's
// mean over the whole tensor, so the mean must be known before the update: two passes (Note [trust-ratio
// passes] in rules_trust.h), kLionCount reads (p, g, m) and counts the mask per tensor, LionCautionFin turns
// the count into the scale (Bound::aux0 of the next pass, a double on both backends), kLionApply is LionOp's
// step with
//   u <- u * (mask / scale)   (timm: mask.div_(scale); update.mul_(mask); param.add_(update, alpha=-lr)).
enum LionMode : int { kLionCount = 0, kLionApply = 1 };

template <typename T>
struct LionCautionFin {
  FT_HD void operator()(const double* sums, int64_t numel, const Bound&, double* out) const {
    out[0] = static_cast<double>(caution_scale<T>(sums[0], numel));
    out[1] = 0.0;
  }
};

template <typename T, int MODE>
struct CautiousLionOp : LionOp<T> {
  static constexpr unsigned kLoad = 0x7u;
  static constexpr unsigned kStore = MODE == kLionApply ? 0x5u : 0u;
  static constexpr int kSums = MODE == kLionCount ? 1 : 0;
  T scale = T(1);

  FT_HD void bind(const Bound& b) {
    LionOp<T>::bind(b);
    scale = static_cast<T>(b.aux0);
  }

  FT_HD void operator()(T* r, double* t) const {
    const T g = effective_grad(this->grad(r[1]), r[0], this->maximize, T(0), this->l1);
    const T u = sign(lerp(r[2], g, this->one_minus_beta1));
    const T mask = u * g > T(0) ? T(1) : T(0);
    if constexpr (MODE == kLionCount) {
      t[0] = static_cast<double>(mask);
    } else {
      const T p = r[0] * this->decay_factor;
      r[0] = p + (-this->lr) * (u * (mask / scale));
      r[2] = lerp(r[2], g, this->one_minus_beta2);
    }
  }
};

// Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled"), in the y form the schedulefree
// package steps (the parameter holds y; z is a state; x is never stored):
//   v <- b2*v + (1 - b2)*g*g;  d = g / (sqrt(v / bc2) + eps) [+ wd*y]
//   y <- lerp(y, z, c) + lr*(b1*(1 - c) - 1)*d;  z <- z - lr*d
// with bc2 = 1 - b2^(k+1), c = c_{k+1} and the scheduled lr from the host (Note [group scalars on the
// host]).  Registers: (y, g, z, v).
template <typename T>
struct SfAdamwOp : GradPrescale<T> {
  static constexpr int depth = 4;
  T beta2, one_minus_beta2, eps, weight_decay, bc2, ckp1, y_coef, neg_lr;

  FT_HD void bind(const Bound& b) { this->bind_prescale(b); }

  FT_HD void operator()(T* r) const {
    const T y0 = r[0];
    const T g = effective_grad(this->grad(r[1]), y0, T(0), T(0), this->l1);
    const T v = r[3] * beta2 + one_minus_beta2 * g * g;
    r[3] = v;
    T d = g / (sqrt_(v / bc2) + eps);
    d = on(weight_decay) ? d + weight_decay * y0 : d;
    const T z = r[2];
    r[0] = lerp(y0, z, ckp1) + y_coef * d;
    r[2] = z + neg_lr * d;
  }
};

// Schedule-Free SGD (same paper), the schedulefree package's y form:
//   d = g [+ wd*y];  y <- lerp(y, z, c) + lr*(mu*(1 - c) - 1)*d;  z <- z - lr*d.  Registers: (y, g, z).
template <typename T>
struct SfSgdOp : GradPrescale<T> {
  static constexpr int depth = 3;
  T weight_decay, ckp1, y_coef, neg_lr;

  FT_HD void bind(const Bound& b) { this->bind_prescale(b); }

  FT_HD void operator()(T* r) const {
    const T y0 = r[0];
    const T d = effective_grad(this->grad(r[1]), y0, T(0), weight_decay, this->l1);
    const T z = r[2];
    r[0] = lerp(y0, z, ckp1) + y_coef * d;
    r[2] = z + neg_lr * d;
  }
};

}  // namespace math

namespace rules {

// Registered on the trust-ratio backends (trust_cpu.h, trust_cuda.cuh): without caution its own run() is the
// generic one-pass run_rule on their element-wise drivers (Backend::Generic), with caution the two passes of
// math::CautiousLionOp.
struct Lion {
  static constexpr const char* kName = "lion";
  enum { kBeta1, kBeta2, kWeightDecay, kMaximize, kMaxLr, kCaution };
  static constexpr std::array<const char*, 6> kHyper{"beta1", "beta2", "weight_decay", "maximize", "max_lr",
                                                     "caution"};
  static constexpr bool kCountsSteps = false;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"exp_avgs"}; }

  template <typename T>
  static void fill(math::LionOp<T>& op, const double* h, const Common& c) {
    op.weight_decay_d = h[kWeightDecay];
    op.max_lr = h[kMaxLr];
    op.one_minus_beta1 = T(1.0 - h[kBeta1]);
    op.one_minus_beta2 = T(1.0 - h[kBeta2]);
    op.maximize = flag<T>(h[kMaximize]);
    op.l1 = T(c.l1);
  }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    math::LionOp<T> op{};
    fill(op, h, c);
    launch(op);
  }

  template <typename T, int MODE>
  static math::CautiousLionOp<T, MODE> cautious(const double* h, const Common& c) {
    math::CautiousLionOp<T, MODE> op{};
    fill(op, h, c);
    return op;
  }

  template <class Backend>
  static void run(const host::RunArgs& a) {
    if (a.hyper[kCaution] == 0.0) return host::run_rule<typename Backend::Generic, Lion>(a);
    trust::for_layout(a.prec, [&](auto layout) {
      using L = decltype(layout);
      using T = at::opmath_type<typename L::P>;
      Work counted = a.work;
      Backend::template reduce<L>(a.work, cautious<T, math::kLionCount>(a.hyper, a.common), math::LionCautionFin<T>{},
                                  counted);
      trust::apply<Backend, L>(a, counted, cautious<T, math::kLionApply>(a.hyper, a.common));
    });
  }
};

// Hyperparameters after weight_decay are this step's group scalars (Note [group scalars on the host]).
struct SfAdamw {
  static constexpr const char* kName = "sf_adamw";
  enum { kBeta2, kEps, kWeightDecay, kBiasCorrection2, kCkp1, kYCoef, kLr };
  static constexpr std::array<const char*, 7> kHyper{"beta2", "eps", "weight_decay", "bias_correction2", "ckp1",
                                                     "y_coef", "scheduled_lr"};
  static constexpr bool kCountsSteps = false;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"z", "exp_avg_sqs"}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    math::SfAdamwOp<T> op{};
    op.beta2 = T(h[kBeta2]);
    op.one_minus_beta2 = T(1.0 - h[kBeta2]);
    op.eps = T(h[kEps]);
    op.weight_decay = T(h[kWeightDecay]);
    op.bc2 = T(h[kBiasCorrection2]);
    op.ckp1 = T(h[kCkp1]);
    op.y_coef = T(h[kYCoef]);
    op.neg_lr = T(-h[kLr]);
    op.l1 = T(c.l1);
    launch(op);
  }
};

struct SfSgd {
  static constexpr const char* kName = "sf_sgd";
  enum { kWeightDecay, kCkp1, kYCoef, kLr };
  static constexpr std::array<const char*, 4> kHyper{"weight_decay", "ckp1", "y_coef", "scheduled_lr"};
  static constexpr bool kCountsSteps = false;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"z"}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    math::SfSgdOp<T> op{};
    op.weight_decay = T(h[kWeightDecay]);
    op.ckp1 = T(h[kCkp1]);
    op.y_coef = T(h[kYCoef]);
    op.neg_lr = T(-h[kLr]);
    op.l1 = T(c.l1);
    launch(op);
  }
};

}  // namespace rules
}  // namespace fusedtrain
