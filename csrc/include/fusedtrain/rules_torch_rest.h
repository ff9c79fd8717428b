// The rest of torch.optim's element-wise optimizers as fused rules: RAdam, Adamax, Adadelta, ASGD, Rprop.
// Each functor (namespace math) IS the formula (Note [one source of truth] in math.h), in the order of
// operations of torch.optim's single-tensor (foreach=False) implementation, so float32/float64 agree to
// rounding; each rule (namespace rules) declares it to the host as Note [optimizer rules] in rules.h says.
// Included only by cpu/optim_<rule>.cpp and cuda/optim_<rule>.cu of these rules.
#pragma once

#include <array>
#include <cmath>

#include "fusedtrain/math.h"
#include "fusedtrain/rules.h"

namespace fusedtrain {
namespace math {

// torch.maximum's NaN rule: a NaN on either side propagates, so a NaN never hides in the max.
template <typename T>
FT_HD T maximum_nan(T a, T b) {
  return (a != a || b != b) ? a + b : (a > b ? a : b);
}

// RAdam (Liu et al. 2020, rectified Adam; torch's parametrization):
//   RAdamW: p <- p*(1 - lr*wd);  RAdam: g <- g + wd*p
//   m <- lerp(m, g, 1 - b1);  v <- b2*v + (1 - b2)*g*g;  m^ = m / (1 - b1^t)
//   rho_t = rho_inf - 2t*b2^t/(1 - b2^t), rho_inf = 2/(1 - b2) - 1
//   rho_t > 5:  p <- p - m^ * lr * (sqrt(1 - b2^t) / (sqrt(v) + eps)) * r_t,
//               r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
//   otherwise:  p <- p - m^ * lr
// The rectification is a function of the step alone: bind() computes rho_t, r_t and the branch per tensor in
// double, as torch does in Python.  Registers: (p, g, m, v).
template <typename T>
struct RadamOp : GradPrescale<T> {
  static constexpr int depth = 4;
  double beta1_d, beta2_d, decoupled_wd;  // decoupled_wd: RAdamW's lambda, 0 for RAdam
  T beta2, one_minus_beta1, one_minus_beta2, eps, coupled_wd;
  T decay_factor, bc1, lr, bc2_sqrt, rect, rectify;  // bound per tensor (rectify: a flag)
  T maximize;                                        // flag

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    const double bc1_d = 1.0 - ::pow(beta1_d, b.step);
    const double bc2_d = 1.0 - ::pow(beta2_d, b.step);
    const double rho_inf = 2.0 / (1.0 - beta2_d) - 1.0;
    const double rho_t = rho_inf - 2.0 * b.step * ::pow(beta2_d, b.step) / bc2_d;
    const bool rectified = rho_t > 5.0;
    bc1 = static_cast<T>(bc1_d);
    lr = static_cast<T>(b.lr);
    bc2_sqrt = static_cast<T>(::pow(bc2_d, 0.5));
    rect = static_cast<T>(rectified ? ::pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                                ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.5)
                                    : 0.0);
    rectify = rectified ? T(1) : T(0);
    decay_factor = static_cast<T>(decoupled_wd != 0.0 ? 1.0 - b.lr * decoupled_wd : 1.0);
  }

  FT_HD void operator()(T* r) const {
    const T p0 = r[0];
    const T g = effective_grad(this->grad(r[1]), p0, maximize, coupled_wd, this->l1);
    const T p = p0 * decay_factor;
    const T m = lerp(r[2], g, one_minus_beta1);
    const T v = r[3] * beta2 + one_minus_beta2 * g * g;
    r[2] = m;
    r[3] = v;
    const T scaled = (m / bc1) * lr;
    // torch: bc2**0.5 / (sqrt(v) + eps), which Python evaluates as reciprocal(sqrt(v) + eps) * bc2**0.5
    const T adaptive = (T(1) / (sqrt_(v) + eps)) * bc2_sqrt;
    const T update = on(rectify) ? (scaled * adaptive) * rect : scaled;
    r[0] = p + T(-1) * update;
  }
};

// Adamax (Kingma & Ba 2015, the infinity-norm variant of Adam):
//   g <- g + wd*p;  m <- lerp(m, g, 1 - b1);  u <- max(b2*u, |g| + eps)
//   p <- p - (lr / (1 - b1^t)) * m / u  (torch's addcdiv: (value * m) / u).  Registers: (p, g, m, u).
template <typename T>
struct AdamaxOp : GradPrescale<T> {
  static constexpr int depth = 4;
  double beta1_d;
  T one_minus_beta1, beta2, eps, weight_decay;
  T neg_clr;   // bound per tensor: -lr / (1 - b1^t)
  T maximize;  // flag

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    neg_clr = static_cast<T>(-(b.lr / (1.0 - ::pow(beta1_d, b.step))));
  }

  FT_HD void operator()(T* r) const {
    const T g = effective_grad(this->grad(r[1]), r[0], maximize, weight_decay, this->l1);
    const T m = lerp(r[2], g, one_minus_beta1);
    const T u = maximum_nan(r[3] * beta2, std::abs(g) + eps);
    r[2] = m;
    r[3] = u;
    r[0] = r[0] + (neg_clr * m) / u;
  }
};

// Adadelta (Zeiler 2012):
//   g <- g + wd*p;  s <- rho*s + (1 - rho)*g*g;  d = sqrt(a + eps) / sqrt(s + eps) * g
//   a <- rho*a + (1 - rho)*d*d;  p <- p - lr*d.  Registers: (p, g, s, a).
template <typename T>
struct AdadeltaOp : GradPrescale<T> {
  static constexpr int depth = 4;
  T rho, one_minus_rho, eps, weight_decay;
  T lr;        // bound per tensor
  T maximize;  // flag

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    lr = static_cast<T>(b.lr);
  }

  FT_HD void operator()(T* r) const {
    const T g = effective_grad(this->grad(r[1]), r[0], maximize, weight_decay, this->l1);
    const T s = r[2] * rho + one_minus_rho * g * g;
    const T std_ = sqrt_(s + eps);
    const T d = (sqrt_(r[3] + eps) / std_) * g;
    r[2] = s;
    r[3] = r[3] * rho + one_minus_rho * d * d;
    r[0] = r[0] + (-lr) * d;
  }
};

// ASGD (Polyak & Juditsky 1992 averaged SGD, torch's parametrization):
//   g <- g + wd*p;  p <- p*(1 - lambd*eta);  p <- p - eta*g
//   ax <- ax + mu*(p - ax)  (ax <- p while mu is exactly 1)
// eta and mu are those of the previous step: tensor scalars (Note [tensor scalars] in rules.h) that
// rules::Asgd::advance hands over as Bound::aux0 / aux1 before recomputing them from the new step count.
// Registers: (p, g, ax).
template <typename T>
struct AsgdOp : GradPrescale<T> {
  static constexpr int depth = 3;
  double lambd;
  T weight_decay;
  T decay, neg_eta, mu, average;  // bound per tensor (average: a flag, mu != 1)
  T maximize;                     // flag

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    decay = static_cast<T>(1.0 - lambd * b.aux0);
    neg_eta = static_cast<T>(-b.aux0);
    mu = static_cast<T>(b.aux1);
    average = b.aux1 != 1.0 ? T(1) : T(0);
  }

  FT_HD void operator()(T* r) const {
    const T g = effective_grad(this->grad(r[1]), r[0], maximize, weight_decay, this->l1);
    T p = r[0] * decay;
    p = p + neg_eta * g;
    r[0] = p;
    r[2] = on(average) ? r[2] + (p - r[2]) * mu : p;
  }
};

// Rprop (Riedmiller & Braun 1993, torch's variant without weight backtracking):
//   s = sign(g * prev);  f = etaplus (s > 0), etaminus (s < 0), 1 (otherwise, NaN included: torch's sign(NaN) is 0)
//   step <- clamp(step * f, step_min, step_max);  g <- 0 where f == etaminus (the sign flipped)
//   p <- p - sign(g) * step;  prev <- g.  Registers: (p, g, prev, step).
template <typename T>
struct RpropOp : GradPrescale<T> {
  static constexpr int depth = 4;
  T etaminus, etaplus, step_min, step_max;
  T maximize;  // flag

  FT_HD void bind(const Bound& b) { this->bind_prescale(b); }

  FT_HD void operator()(T* r) const {
    const T g = effective_grad(this->grad(r[1]), r[0], maximize, T(0), this->l1);
    const T s = sign(g * r[2]);
    const T f = s > T(0) ? etaplus : (s < T(0) ? etaminus : T(1));
    T step = r[3] * f;
    step = step < step_min ? step_min : step;  // torch.clamp: max(x, min) then min(., max); NaN stays NaN
    step = step > step_max ? step_max : step;
    const T d = f == etaminus ? T(0) : g;
    r[3] = step;
    r[2] = d;
    r[0] = r[0] + (T(-1) * sign(d)) * step;
  }
};

}  // namespace math

namespace rules {

struct Radam {
  static constexpr const char* kName = "radam";
  enum { kBeta1, kBeta2, kEps, kWeightDecay, kMaximize, kDecoupled };
  static constexpr std::array<const char*, 6> kHyper{"beta1", "beta2", "eps", "weight_decay", "maximize",
                                                     "decoupled_weight_decay"};
  static constexpr bool kCountsSteps = true;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"exp_avgs", "exp_avg_sqs"}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    const bool decoupled = h[kDecoupled] != 0.0;
    math::RadamOp<T> op{};
    op.beta1_d = h[kBeta1];
    op.beta2_d = h[kBeta2];
    op.decoupled_wd = decoupled ? h[kWeightDecay] : 0.0;
    op.beta2 = T(h[kBeta2]);
    op.one_minus_beta1 = T(1.0 - h[kBeta1]);
    op.one_minus_beta2 = T(1.0 - h[kBeta2]);
    op.eps = T(h[kEps]);
    op.coupled_wd = T(decoupled ? 0.0 : h[kWeightDecay]);
    op.maximize = flag<T>(h[kMaximize]);
    op.l1 = T(c.l1);
    launch(op);
  }
};

struct Adamax {
  static constexpr const char* kName = "adamax";
  enum { kBeta1, kBeta2, kEps, kWeightDecay, kMaximize };
  static constexpr std::array<const char*, 5> kHyper{"beta1", "beta2", "eps", "weight_decay", "maximize"};
  static constexpr bool kCountsSteps = true;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"exp_avgs", "exp_infs"}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    math::AdamaxOp<T> op{};
    op.beta1_d = h[kBeta1];
    op.one_minus_beta1 = T(1.0 - h[kBeta1]);
    op.beta2 = T(h[kBeta2]);
    op.eps = T(h[kEps]);
    op.weight_decay = T(h[kWeightDecay]);
    op.maximize = flag<T>(h[kMaximize]);
    op.l1 = T(c.l1);
    launch(op);
  }
};

struct Adadelta {
  static constexpr const char* kName = "adadelta";
  enum { kRho, kEps, kWeightDecay, kMaximize };
  static constexpr std::array<const char*, 4> kHyper{"rho", "eps", "weight_decay", "maximize"};
  static constexpr bool kCountsSteps = true;  // torch keeps the count; the rule does not use it
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"square_avgs", "acc_deltas"}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    math::AdadeltaOp<T> op{};
    op.rho = T(h[kRho]);
    op.one_minus_rho = T(1.0 - h[kRho]);
    op.eps = T(h[kEps]);
    op.weight_decay = T(h[kWeightDecay]);
    op.maximize = flag<T>(h[kMaximize]);
    op.l1 = T(c.l1);
    launch(op);
  }
};

struct Asgd {
  static constexpr const char* kName = "asgd";
  // kFloat64Scalars: torch's default dtype is float64 (see advance)
  enum { kLambd, kAlpha, kT0, kWeightDecay, kMaximize, kFloat64Scalars };
  static constexpr std::array<const char*, 6> kHyper{"lambd", "alpha", "t0", "weight_decay", "maximize",
                                                     "float64_scalars"};
  static constexpr std::array<const char*, 2> kAux{"eta", "mu"};
  static constexpr bool kCountsSteps = true;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"axs"}; }

  // This update uses the stored eta and mu (the previous step's); then, as torch does after the update,
  // eta = lr / (1 + lambd*lr*t)^alpha and mu = 1 / max(1, t - t0). torch makes each a tensor of the default
  // dtype first (torch.as_tensor of a Python float) and copies it into the state: rounded to float32 unless
  // the default dtype is float64, then to the tensor's dtype (float64 after torch's load_state_dict cast it).
  template <class Round>
  FT_HD static void advance(const double* h, double step, double lr, double* stored, double* bound, Round round) {
    const bool wide = h[kFloat64Scalars] != 0.0;
    const double eta = lr / ::pow(1.0 + h[kLambd] * lr * step, h[kAlpha]);
    const double mu = 1.0 / ::fmax(1.0, step - h[kT0]);
    bound[0] = stored[0];
    bound[1] = stored[1];
    stored[0] = round(0, wide ? eta : static_cast<double>(static_cast<float>(eta)));
    stored[1] = round(1, wide ? mu : static_cast<double>(static_cast<float>(mu)));
  }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    math::AsgdOp<T> op{};
    op.lambd = h[kLambd];
    op.weight_decay = T(h[kWeightDecay]);
    op.maximize = flag<T>(h[kMaximize]);
    op.l1 = T(c.l1);
    launch(op);
  }
};

struct Rprop {
  static constexpr const char* kName = "rprop";
  enum { kEtaMinus, kEtaPlus, kStepMin, kStepMax, kMaximize };
  static constexpr std::array<const char*, 5> kHyper{"etaminus", "etaplus", "step_size_min", "step_size_max",
                                                     "maximize"};
  static constexpr bool kCountsSteps = true;  // torch keeps the count; the rule does not use it
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"prevs", "step_sizes"}; }

  template <typename T, typename Launch>
  static void make(const double* h, const Common& c, Launch&& launch) {
    math::RpropOp<T> op{};
    op.etaminus = T(h[kEtaMinus]);
    op.etaplus = T(h[kEtaPlus]);
    op.step_min = T(h[kStepMin]);
    op.step_max = T(h[kStepMax]);
    op.maximize = flag<T>(h[kMaximize]);
    op.l1 = T(c.l1);
    launch(op);
  }
};

}  // namespace rules
}  // namespace fusedtrain
