// Layer-wise trust-ratio optimizers: LAMB (You et al. 2020) and LARS / LARC (You et al. 2017), with the
// arguments, defaults and arithmetic of timm.optim.Lamb and timm.optim.Lars (single-tensor paths).
//
// Note [trust-ratio passes]:
// Each tensor's update is scaled by a ratio of two of its norms (the parameter's and the update's or the
// gradient's), so no single element-wise pass can finish it. The rules bring their own backend function
// (Note [optimizer rules] in rules.h) that runs two (or three) passes over the work list:
//   LAMB   pass 1 updates the moments m, v (stored) and reduces, per tensor, sum(p'^2) and sum(u^2) of the
//          decayed parameter p' and the update u (recomputed from the *stored* m, v, so it is the update
//          pass 2 applies, also for bfloat16 / float16 states); a per-tensor finisher turns the sums into the
//          trust ratio; pass 2 reads p, m, v and applies p' - lr * ratio * u, recomputing u (no buffer for the
//          update: 40 bytes per float32 parameter in all on the CPU, against ~140 for timm's single-tensor
//          step). With `caution` the mask's mean must be known before the update's norm: pass 1 counts the
//          mask, pass 2 reduces the norms, pass 3 applies.
//          Without adaptation (weight_decay == 0 and not always_adapt) and without caution: one pass.
//   LARS   pass 1 reads p and g and reduces sum(p^2), sum(g^2); pass 2 is the SGD update of the scaled
//          gradient (g + wd*p) * ratio. Without adaptation: one pass.
// The per-tensor sums are deterministic on both backends (fixed splits, fixed combination order). The
// finisher's two outputs reach the next pass as the tensor's Bound::aux0 / aux1 (work.h), float64 on both
// backends (on CUDA, device values: Note [wide device scalars] in work.h), so a float64 update gets its ratio
// and caution scale as the CPU computes them.
//
// Backend interface (trust_cpu.h, trust_cuda.cuh):
//   template <class L, class Op, class Fin> static void reduce(const Work&, const Op&, const Fin&, Work& out)
//       runs Op (terms, optional state stores) over every element, reduces its Op::kSums terms per tensor,
//       calls fin(sums, numel, bound, vals) per tensor and sets out.aux to the values (out: a copy of the
//       work list, passed to the next pass);
//   template <class L, class Op> static void apply(const Work&, const Op&)   the final pass (kSums == 0).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <type_traits>

#include "fusedtrain/optim_host.h"

namespace fusedtrain {
namespace math {

// torch.clamp(x, max=1): NaN stays NaN.
template <typename T>
FT_HD T clamp_max1(T x) {
  return x > T(1) ? T(1) : x;
}

// timm's _lamb_trust_ratio on the tensor norms rounded to the opmath type (torch's norms of a float32 tensor
// are float32): |w|/|u|, 1 where either norm is not positive; LAMBC clips at 1.
template <typename T>
FT_HD T lamb_trust_ratio(double sum_w, double sum_u, bool clip) {
  const T w = static_cast<T>(::sqrt(sum_w)), u = static_cast<T>(::sqrt(sum_u));
  const T r = w > T(0) ? (u > T(0) ? w / u : T(1)) : T(1);
  return clip ? clamp_max1(r) : r;
}

// timm's _lars_trust_ratio: coeff*|w| / (|g| + wd*|w| + eps), 1 where either norm is not positive; LARC
// clips ratio / lr at 1.
template <typename T>
FT_HD T lars_trust_ratio(double sum_w, double sum_g, T coeff, T wd, T eps, bool clip, T lr) {
  const T w = static_cast<T>(::sqrt(sum_w)), g = static_cast<T>(::sqrt(sum_g));
  T r = coeff * w / (g + w * wd + eps);
  r = w > T(0) ? (g > T(0) ? r : T(1)) : T(1);
  return clip ? clamp_max1(r / lr) : r;
}

// The scale of Cautious Optimizers: torch's mask.mean() (sum / numel in T), clamped below at 1e-3.
template <typename T>
FT_HD T caution_scale(double count, int64_t numel) {
  const T mean = static_cast<T>(count) / static_cast<T>(numel);
  const T lo = static_cast<T>(1e-3);
  return mean < lo ? lo : mean;
}

// The finisher of a mask-count pass: a ratio of 1 (aux0) and the caution scale (aux1).
template <typename T>
struct CautionFin {
  FT_HD void operator()(const double* sums, int64_t numel, const Bound&, double* out) const {
    out[0] = 1.0;
    out[1] = static_cast<double>(caution_scale<T>(sums[0], numel));
  }
};

// LAMB's passes (Note [trust-ratio passes]); registers (p, g, m, v).
enum LambMode : int {
  kLambMoments = 0,  // update m, v; terms p'^2, u^2
  kLambCount = 1,    // (caution) update m, v; term: the caution mask
  kLambNorms = 2,    // (caution) read only; terms p'^2, u^2 of the masked update
  kLambApply = 3,    // p <- p' - lr * ratio * u from the stored m, v
  kLambFull = 4,     // no adaptation, no caution: moments and update in one pass
};

// One LAMB element in timm's order of operations (timm.optim.lamb._single_tensor_lamb):
//   g <- g / clip  (global-norm clipping, clip = max(|g|/max_grad_norm, 1));  [g <- g + l1*sign(p)]
//   m <- lerp(m, g, 1 - b1) (grad_averaging) or b1*m + g;  v <- b2*v + (1 - b2)*g*g
//   u <- (m / bc1) / (sqrt(v) / sqrt(bc2) + eps);  [caution: u <- u * (u*g > 0) / max(mean(mask), 1e-3)]
//   decoupled: p <- p - wd_scale*wd*p;  else u <- u + wd*p
//   p <- p - lr * ratio * u,  ratio = lamb_trust_ratio(|p|, |u|) when wd != 0 or always_adapt, else 1.
// St: the states' storage type (m and v are rounded to it before u is computed, as torch stores them).
template <typename T, typename St, int MODE, bool CAUTION>
struct LambOp {
  static constexpr int depth = 4;
  static constexpr bool kReadsGrad = MODE != kLambApply || CAUTION;
  static constexpr unsigned kLoad = kReadsGrad ? 0xFu : 0xDu;
  static constexpr unsigned kStore =
      MODE == kLambMoments || MODE == kLambCount ? 0xCu : (MODE == kLambApply ? 0x1u : (MODE == kLambFull ? 0xDu : 0u));
  static constexpr int kSums = MODE == kLambMoments || MODE == kLambNorms ? 2 : (MODE == kLambCount ? 1 : 0);

  double beta1_d, beta2_d, wd_d, max_lr, bias_correction;
  T beta1, beta2, beta3, one_minus_beta2, eps, wd, l1;
  T lerp_m, coupled, decoupled;  // flags (Note [flags as numbers])
  T inv_scale = T(1), clip = T(1), bc1 = T(1), bc2_sqrt = T(1), decay = T(0), neg_lr = T(0), ratio = T(1), scale = T(1);

  FT_HD void bind(const Bound& b) {
    inv_scale = static_cast<T>(b.inv_scale);
    clip = static_cast<T>(b.clip_coef);  // the divisor max(|g|/max_grad_norm, 1) (Lamb.py computes it)
    const bool bc = bias_correction != 0.0;
    bc1 = static_cast<T>(bc ? 1.0 - ::pow(beta1_d, b.step) : 1.0);
    bc2_sqrt = static_cast<T>(::pow(bc ? 1.0 - ::pow(beta2_d, b.step) : 1.0, 0.5));
    const double wd_scale = max_lr != 0.0 ? ::pow(b.lr, 2.0) / max_lr : b.lr;
    decay = static_cast<T>(-wd_scale * wd_d);
    neg_lr = static_cast<T>(-b.lr);
    ratio = static_cast<T>(b.aux0);
    if constexpr (CAUTION) scale = static_cast<T>(b.aux1);
  }

  FT_HD T grad(T g, T p) const {
    g = g * inv_scale;
    g = g / clip;
    return on(l1) ? g + l1 * sign(p) : g;
  }

  // The (masked) update u and the decayed parameter p' from the stored moments.
  FT_HD T update(T m, T v, T g, T p, T& pd) const {
    T u = (m / bc1) / (sqrt_(v) / bc2_sqrt + eps);
    if constexpr (CAUTION) u = u * ((u * g > T(0) ? T(1) : T(0)) / scale);
    pd = on(decoupled) ? p + decay * p : p;
    return on(coupled) ? u + wd * p : u;
  }

  FT_HD void operator()(T* r, double* t) const {
    const T p = r[0];
    if constexpr (MODE == kLambApply) {
      const T g = kReadsGrad ? grad(r[1], p) : T(0);
      T pd;
      const T u = update(r[2], r[3], g, p, pd);
      r[0] = pd + neg_lr * (u * ratio);
      return;
    }
    const T g = grad(r[1], p);
    T m = r[2], v = r[3];
    if constexpr (MODE != kLambNorms) {
      // both forms, then a select: GCC does not if-convert (vectorize) the select of a lerp (itself a select)
      const T m_lerp = lerp(m, g, beta3), m_mad = m * beta1 + beta3 * g;
      m = on(lerp_m) ? m_lerp : m_mad;
      v = v * beta2 + one_minus_beta2 * g * g;
      r[2] = m;
      r[3] = v;
      m = static_cast<T>(static_cast<St>(m));
      v = static_cast<T>(static_cast<St>(v));
    }
    if constexpr (MODE == kLambCount) {
      const T u = (m / bc1) / (sqrt_(v) / bc2_sqrt + eps);
      t[0] = u * g > T(0) ? 1.0 : 0.0;
      return;
    }
    T pd;
    const T u = update(m, v, g, p, pd);
    if constexpr (MODE == kLambFull) {
      r[0] = pd + neg_lr * u;  // no adaptation: timm adds -lr*u
    } else {
      const double pw = static_cast<double>(pd), uw = static_cast<double>(u);
      t[0] = pw * pw;
      t[1] = uw * uw;
    }
  }
};

// The per-tensor values after a LAMB reduction: aux0/aux1 of the next pass.
template <typename T, int MODE, bool CAUTION>
struct LambFin {
  bool adapt, clip;
  FT_HD void operator()(const double* sums, int64_t numel, const Bound& b, double* out) const {
    if constexpr (MODE == kLambCount) {
      CautionFin<T>{}(sums, numel, b, out);  // the ratio is 1 until the norms pass
    } else {
      out[0] = static_cast<double>(adapt ? lamb_trust_ratio<T>(sums[0], sums[1], clip) : T(1));
      out[1] = CAUTION ? b.aux1 : 0.0;  // the caution scale, passed on
    }
  }
};

// LARS's passes; registers (p, g, [b]).
enum LarsMode : int { kLarsNorms = 0, kLarsApply = 1 };

// One LARS element (timm.optim.lars._single_tensor_lars):
//   [g <- g*inv_scale*clip_coef + l1*sign(p): fusedtrain's options]
//   adapt (wd != 0 or always_adapt): g <- (g + wd*p) * ratio
//   momentum: b <- g (first step) or mu*b + (1 - dampening)*g;  g <- g + mu*b (nesterov) or b
//   p <- p - lr*g
template <typename T, int MODE, bool MOMENTUM>
struct LarsOp : GradPrescale<T> {
  static constexpr int depth = MODE == kLarsNorms ? 2 : (MOMENTUM ? 3 : 2);
  static constexpr unsigned kLoad = (1u << depth) - 1u;
  static constexpr unsigned kStore = MODE == kLarsNorms ? 0u : (MOMENTUM ? 0x5u : 0x1u);
  static constexpr int kSums = MODE == kLarsNorms ? 2 : 0;

  T momentum, one_minus_dampening, wd;
  T adapt, nesterov, first_step;  // flags
  T neg_lr = T(0), ratio = T(1);

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    neg_lr = static_cast<T>(-b.lr);
    ratio = static_cast<T>(b.aux0);
  }

  FT_HD T grad_of(T g, T p) const { return effective_grad(GradPrescale<T>::grad(g), p, T(0), T(0), this->l1); }

  FT_HD void operator()(T* r, double* t) const {
    const T p = r[0];
    T g = grad_of(r[1], p);
    if constexpr (MODE == kLarsNorms) {
      const double pw = static_cast<double>(p), gw = static_cast<double>(g);
      t[0] = pw * pw;
      t[1] = gw * gw;
      return;
    }
    g = on(adapt) ? (g + wd * p) * ratio : g;
    if constexpr (MOMENTUM) {
      const T b = on(first_step) ? g : r[2] * momentum + one_minus_dampening * g;
      r[2] = b;
      g = on(nesterov) ? g + momentum * b : b;
    }
    r[0] = p + neg_lr * g;
  }
};

template <typename T>
struct LarsFin {
  T coeff, wd, eps;
  bool clip;
  FT_HD void operator()(const double* sums, int64_t, const Bound& b, double* out) const {
    out[0] = static_cast<double>(lars_trust_ratio<T>(sums[0], sums[1], coeff, wd, eps, clip, static_cast<T>(b.lr)));
    out[1] = 0.0;
  }
};

// The fused moving average after a trust-ratio update (math::WithEma for the load/store masks of the
// trust drivers). Registers: (the rule's ..., a).
template <typename S, typename T, typename Op>
struct TrustEma {
  static constexpr int depth = Op::depth + 1;
  static constexpr unsigned kLoad = Op::kLoad | (1u << Op::depth);
  static constexpr unsigned kStore = Op::kStore | (1u << Op::depth);
  static constexpr int kSums = Op::kSums;
  Op op;
  T weight = T(0);

  FT_HD void bind(const Bound& b) {
    op.bind(b);
    weight = static_cast<T>(b.ema_weight);
  }
  FT_HD void operator()(T* r, double* t) const {
    op(r, t);
    r[Op::depth] = lerp(r[Op::depth], static_cast<T>(static_cast<S>(r[0])), weight);
  }
};

// A trust-pass op for the generic launchers (cuda_launcher.cuh) and the 8-bit block walks (quant_cpu.h,
// quant_cuda.cuh), which call op(r). kStore tells the block walks what the pass writes (Note [block passes that
// read or reduce] in quant_cpu.h); the element-wise launchers store every register.
template <typename T, typename Op>
struct NoSums {
  static constexpr int depth = Op::depth;
  static constexpr unsigned kStore = Op::kStore;
  Op op;
  FT_HD void bind(const Bound& b) { op.bind(b); }
  FT_HD void operator()(T* r) const {
    double t[2];
    op(r, t);
  }
};

}  // namespace math

namespace trust {

// Calls f(L{}) for the storage layout of the call (Note [mixed-precision layouts]), as host::run_rule does.
template <class F>
void for_layout(const host::Precision& prec, F&& f) {
  if (prec.uniform()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prec.param, "fusedtrain_trust", [&] {
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        if (prec.stochastic) return f(Uniform<scalar_t, true>{});
      }
      f(Uniform<scalar_t, false>{});
    });
    return;
  }
  if (prec.copies) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(prec.grad, "fusedtrain_trust_master", [&] {
      if (prec.state == at::kFloat) f(Layout<float, scalar_t, float, scalar_t, true, false>{});
      else f(Layout<float, scalar_t, scalar_t, scalar_t, true, false>{});
    });
    return;
  }
  f(Layout<float, float, at::BFloat16, float, false, false>{});
}

// The final pass, with the fused EMA when the work list carries averages (uniform layouts only).
template <class Backend, class L, typename Op>
void apply(const host::RunArgs& a, const Work& work, const Op& op) {
  using T = at::opmath_type<typename L::P>;
  if (a.with_ema && a.prec.uniform()) {
    Backend::template apply<L>(work, math::TrustEma<typename L::P, T, Op>{op});
  } else {
    Backend::template apply<L>(work, op);
  }
}

}  // namespace trust

namespace rules {

struct Lamb {
  static constexpr const char* kName = "lamb";
  enum { kBeta1, kBeta2, kEps, kWeightDecay, kGradAveraging, kBiasCorrection, kDecoupled, kMaxLr, kTrustClip,
         kAlwaysAdapt, kCaution };
  // max_lr: timm's max_lr_snapshot under corrected_weight_decay (decay scaled by lr^2 / max_lr), else 0
  static constexpr std::array<const char*, 11> kHyper{"beta1", "beta2", "eps", "weight_decay", "grad_averaging",
                                                      "bias_correction", "decoupled_decay", "max_lr", "trust_clip",
                                                      "always_adapt", "caution"};
  static constexpr bool kCountsSteps = true;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double*) { return {"exp_avgs", "exp_avg_sqs"}; }

  template <typename T, typename St, int MODE, bool CAUTION>
  static math::LambOp<T, St, MODE, CAUTION> make(const double* h, const Common& c) {
    math::LambOp<T, St, MODE, CAUTION> op{};
    const double beta3 = h[kGradAveraging] != 0.0 ? 1.0 - h[kBeta1] : 1.0;
    const bool decoupled = h[kDecoupled] != 0.0;
    op.beta1_d = h[kBeta1];
    op.beta2_d = h[kBeta2];
    op.wd_d = h[kWeightDecay];
    op.max_lr = decoupled ? h[kMaxLr] : 0.0;
    op.bias_correction = h[kBiasCorrection];
    op.beta1 = T(h[kBeta1]);
    op.beta2 = T(h[kBeta2]);
    op.beta3 = T(beta3);
    op.one_minus_beta2 = T(1.0 - h[kBeta2]);
    op.eps = T(h[kEps]);
    op.wd = T(h[kWeightDecay]);
    op.l1 = T(c.l1);
    op.lerp_m = flag<T>(beta3 == 1.0 - h[kBeta1]);  // timm: lerp exactly when beta3 == 1 - beta1
    op.coupled = flag<T>(h[kWeightDecay] != 0.0 && !decoupled);
    op.decoupled = flag<T>(h[kWeightDecay] != 0.0 && decoupled);
    return op;
  }

  template <class Backend>
  static void run(const host::RunArgs& a) {
    const double* h = a.hyper;
    const bool adapt = h[kWeightDecay] != 0.0 || h[kAlwaysAdapt] != 0.0;
    const bool caution = h[kCaution] != 0.0, clip = h[kTrustClip] != 0.0;
    trust::for_layout(a.prec, [&](auto layout) {
      using L = decltype(layout);
      using T = at::opmath_type<typename L::P>;
      using St = typename L::St;
      if (caution) {
        Work w1 = a.work, w2 = a.work;
        Backend::template reduce<L>(a.work, make<T, St, math::kLambCount, true>(h, a.common),
                                    math::LambFin<T, math::kLambCount, true>{adapt, clip}, w1);
        const Work* last = &w1;
        if (adapt) {
          Backend::template reduce<L>(w1, make<T, St, math::kLambNorms, true>(h, a.common),
                                      math::LambFin<T, math::kLambNorms, true>{adapt, clip}, w2);
          last = &w2;
        }
        trust::apply<Backend, L>(a, *last, make<T, St, math::kLambApply, true>(h, a.common));
      } else if (adapt) {
        Work w1 = a.work;
        Backend::template reduce<L>(a.work, make<T, St, math::kLambMoments, false>(h, a.common),
                                    math::LambFin<T, math::kLambMoments, false>{adapt, clip}, w1);
        trust::apply<Backend, L>(a, w1, make<T, St, math::kLambApply, false>(h, a.common));
      } else {
        trust::apply<Backend, L>(a, a.work, make<T, St, math::kLambFull, false>(h, a.common));
      }
    });
  }
};

struct Lars {
  static constexpr const char* kName = "lars";
  enum { kMomentum, kDampening, kWeightDecay, kNesterov, kTrustCoeff, kEps, kTrustClip, kAlwaysAdapt, kFirstStep };
  static constexpr std::array<const char*, 9> kHyper{"momentum",    "dampening", "weight_decay",
                                                     "nesterov",    "trust_coeff", "eps",
                                                     "trust_clip",  "always_adapt", "first_step"};
  static constexpr bool kCountsSteps = false;
  static constexpr bool kMixedPrecision = true;
  static Names states(const double* h) { return h[kMomentum] != 0.0 ? Names{"momentum_buffers"} : Names{}; }

  template <typename T, int MODE, bool MOMENTUM>
  static math::LarsOp<T, MODE, MOMENTUM> make(const double* h, const Common& c) {
    math::LarsOp<T, MODE, MOMENTUM> op{};
    op.momentum = T(h[kMomentum]);
    op.one_minus_dampening = T(1.0 - h[kDampening]);
    op.wd = T(h[kWeightDecay]);
    op.adapt = flag<T>(h[kWeightDecay] != 0.0 || h[kAlwaysAdapt] != 0.0);
    op.nesterov = flag<T>(h[kNesterov]);
    op.first_step = flag<T>(h[kFirstStep]);
    op.l1 = T(c.l1);
    return op;
  }

  template <class Backend>
  static void run(const host::RunArgs& a) {
    const double* h = a.hyper;
    const bool adapt = h[kWeightDecay] != 0.0 || h[kAlwaysAdapt] != 0.0;
    const bool momentum = h[kMomentum] != 0.0;
    trust::for_layout(a.prec, [&](auto layout) {
      using L = decltype(layout);
      using T = at::opmath_type<typename L::P>;
      const Work* last = &a.work;
      Work w1;
      if (adapt) {
        w1 = a.work;
        const math::LarsFin<T> fin{T(h[kTrustCoeff]), T(h[kWeightDecay]), T(h[kEps]), h[kTrustClip] != 0.0};
        Backend::template reduce<L>(a.work, make<T, math::kLarsNorms, false>(h, a.common), fin, w1);
        last = &w1;
      }
      if (momentum) trust::apply<Backend, L>(a, *last, make<T, math::kLarsApply, true>(h, a.common));
      else trust::apply<Backend, L>(a, *last, make<T, math::kLarsApply, false>(h, a.common));
    });
  }
};

}  // namespace rules
}  // namespace fusedtrain
