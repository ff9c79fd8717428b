// Per-element update rules of every fusedtrain optimizer.
//
// Note [one source of truth]:
// Each functor below IS the formula. The CPU driver (cpu_driver.h) and the CUDA launcher
// (cuda_launcher.cuh) only load the D values of one element into registers, call the functor, and
// store the results; so the CPU tests, which CI runs, exercise the very arithmetic the GPU runs.
//
// Register convention: r[0] = parameter, r[1] = gradient (read only), r[2..D-1] = state tensors in
// the order of the op's schema.
//
// Note [per-tensor binding]:
// What changes from step to step (the step count t, the learning rate, the gradient's unscale and clip
// factors) is not baked in by the host. The drivers call `op.bind(Bound{...})` once per tensor (CPU:
// per piece of a tensor; CUDA: per chunk), with values read from host scalars or from device memory
// (capturable steps, a tensor lr, GradScaler's scale, a clip coefficient), and the functor derives its
// per-step constants there (bias corrections in double, as torch.optim computes them in Python). So
// one launch serves tensors at different step counts, and nothing about the step needs the host. All arithmetic is in the "opmath" type T (float for
// float/half/bfloat16, double for double), and the order of operations follows torch.optim's
// single-tensor (foreach=False) implementation, so float32/float64 results agree to rounding.
//
// Note [no FMA contraction]:
// The build turns off floating-point contraction (-ffp-contract=off, nvcc --fmad=false). Otherwise the
// compiler may fuse `p * decay + x` into an FMA in one inlining context and not in another, and the same
// rule would give results one ulp apart depending on the driver or the wrapper (WithEma) around it. The
// steps are memory-bound, so the extra instructions cost nothing measurable.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace fusedtrain {
namespace math {

#if defined(__CUDACC__)
#define FT_HD __host__ __device__ __forceinline__
#else
#define FT_HD inline __attribute__((always_inline))
#endif

template <typename T>
FT_HD T sqrt_(T x) {
  return std::sqrt(x);
}

// torch.lerp's formula (aten/src/ATen/native/Lerp.h): more accurate on both ends of the weight range.
template <typename T>
FT_HD T lerp(T self, T end, T weight) {
  return (std::abs(weight) < T(0.5)) ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
}

// Note [flags as numbers]: options are stored as T (0 or 1) and tested with on(), never as bool
// members. GCC vectorizes a select on a floating-point comparison, but not one on a bool loaded from
// the functor, and gives up on the whole loop (see benchmarks/NOTES.md, "EMA").
template <typename T>
FT_HD bool on(T flag) {
  return flag != T(0);
}

// The per-tensor values a driver hands to bind() (Note [per-tensor binding]).
struct Bound {
  double step;        // the step count after this step's increment (1 on the first step)
  double lr;          // learning rate
  double inv_scale;   // 1 / GradScaler's scale (1 without a scaler): 1/double(scale), rounded to T as torch does
  double clip_coef;   // min(1, max_norm / (norm + 1e-6)) with max_grad_norm, else 1
  double ema_weight;  // weight of the moving average (WithEma, EmaOp): read per call, so a captured step replays
                      // the weight of each update (an EMA warm-up, SWA's 1/(n+1)) from device memory
  // The tensor's scalar states as its rule's advance_aux left them for this update (Note [tensor scalars]
  // in rules.h: NAdam's mu_product, ASGD's eta and mu); 0 for rules without them.
  double aux0 = 0.0, aux1 = 0.0;
};

FT_HD bool same(const Bound& a, const Bound& b) {
  return a.step == b.step && a.lr == b.lr && a.inv_scale == b.inv_scale && a.clip_coef == b.clip_coef &&
         a.ema_weight == b.ema_weight && a.aux0 == b.aux0 && a.aux1 == b.aux1;
}

// Every rule reads its gradient through this: unscaled and clipped as two roundings, (g * inv) * coef,
// the same values torch gets from GradScaler.unscale_ followed by clip_grad_norm_ on float32 gradients.
// Both factors are exactly 1 when unused, which leaves every gradient (inf and NaN included) unchanged.
template <typename T>
struct GradPrescale {
  T inv_scale = T(1), clip_coef = T(1);
  T l1 = T(0);  // L1 coefficient (Note: set by the host, not by bind)

  FT_HD void bind_prescale(const Bound& b) {
    inv_scale = static_cast<T>(b.inv_scale);
    clip_coef = static_cast<T>(b.clip_coef);
  }
  FT_HD T grad(T g) const { return g * inv_scale * clip_coef; }
};

// sign(p) as a number (0 at 0), written as selects so that it vectorizes.
template <typename T>
FT_HD T sign(T p) {
  return p > T(0) ? T(1) : (p < T(0) ? T(-1) : T(0));
}

// The gradient as every rule first sees it: sign flipped for maximize, L2 term added (coupled decay),
// then the L1 term l1*sign(p) (the subgradient of l1*|p|, 0 at p = 0; the `l1=` option).
template <typename T>
FT_HD T effective_grad(T g, T p, T maximize, T weight_decay, T l1) {
  g = on(maximize) ? -g : g;
  g = on(weight_decay) ? g + weight_decay * p : g;
  return on(l1) ? g + l1 * sign(p) : g;
}

// SGD, heavy-ball momentum and Nesterov (Sutskever et al. 2013 in torch's parametrization):
//   g <- g + wd*p;  b <- mu*b + (1 - dampening)*g  (b <- g on the first step)
//   d <- g + mu*b (nesterov) or b (momentum) or g (plain);  p <- p - lr*d
// Depth: 2 without momentum (p, g), 3 with it (p, g, b).
template <typename T, bool MOMENTUM>
struct SgdOp : GradPrescale<T> {
  static constexpr int depth = MOMENTUM ? 3 : 2;
  T lr, momentum, one_minus_dampening, weight_decay;
  T nesterov, maximize, first_step;  // flags (Note [flags as numbers])

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    lr = static_cast<T>(b.lr);
  }

  FT_HD void operator()(T* r) const {
    T g = effective_grad(this->grad(r[1]), r[0], maximize, weight_decay, this->l1);
    if constexpr (MOMENTUM) {
      T b = on(first_step) ? g : r[2] * momentum + one_minus_dampening * g;
      r[2] = b;
      g = on(nesterov) ? g + momentum * b : b;
    }
    r[0] = r[0] + (-lr) * g;
  }
};

// Adagrad (Duchi et al. 2011):  s <- s + g*g;  p <- p - clr * g / (sqrt(s) + eps),
// with clr = lr / (1 + (step - 1)*lr_decay).  Depth 3: (p, g, s).
template <typename T>
struct AdagradOp : GradPrescale<T> {
  static constexpr int depth = 3;
  double lr_decay;
  T clr, weight_decay, eps;
  T maximize;  // flag

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    clr = static_cast<T>(b.lr / (1.0 + (b.step - 1.0) * lr_decay));
  }

  FT_HD void operator()(T* r) const {
    const T g = effective_grad(this->grad(r[1]), r[0], maximize, weight_decay, this->l1);
    const T s = r[2] + g * g;
    r[2] = s;
    r[0] = r[0] + (-clr) * (g / (sqrt_(s) + eps));
  }
};

// RMSprop (Hinton, lecture 6e; centered form of Graves 2013):
//   v <- alpha*v + (1 - alpha)*g*g;  [centered: a <- lerp(a, g, 1 - alpha); v~ = v - a*a]
//   d = g / (sqrt(v~) + eps);  momentum: b <- mu*b + d, p <- p - lr*b;  else p <- p - lr*d
// Registers: (p, g, v, [a if CENTERED], [b if MOMENTUM]).
template <typename T, bool CENTERED, bool MOMENTUM>
struct RmspropOp : GradPrescale<T> {
  static constexpr int depth = 3 + (CENTERED ? 1 : 0) + (MOMENTUM ? 1 : 0);
  static constexpr int kGradAvg = 3;
  static constexpr int kMomentum = CENTERED ? 4 : 3;
  T lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  T maximize;  // flag

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    lr = static_cast<T>(b.lr);
  }

  FT_HD void operator()(T* r) const {
    const T g = effective_grad(this->grad(r[1]), r[0], maximize, weight_decay, this->l1);
    const T v = r[2] * alpha + one_minus_alpha * g * g;
    r[2] = v;
    T avg;
    if constexpr (CENTERED) {
      const T a = lerp(r[kGradAvg], g, one_minus_alpha);
      r[kGradAvg] = a;
      avg = sqrt_(v + T(-1) * a * a);
    } else {
      avg = sqrt_(v);
    }
    avg = avg + eps;
    if constexpr (MOMENTUM) {
      const T b = r[kMomentum] * momentum + g / avg;
      r[kMomentum] = b;
      r[0] = r[0] + (-lr) * b;
    } else {
      r[0] = r[0] + (-lr) * (g / avg);
    }
  }
};

// Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019, decoupled decay):
//   AdamW: p <- p*(1 - lr*wd);  Adam: g <- g + wd*p
//   m <- lerp(m, g, 1 - b1);  v <- b2*v + (1 - b2)*g*g;  [amsgrad: vmax <- max(vmax, v)]
//   p <- p - step_size * m / (sqrt(v)/bc2_sqrt + eps),
// with step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed in double at bind time.
// Registers: (p, g, m, v, [vmax if AMSGRAD]).
template <typename T, bool AMSGRAD>
struct AdamOp : GradPrescale<T> {
  static constexpr int depth = AMSGRAD ? 5 : 4;
  double beta1_d, beta2_d, decoupled_wd;  // decoupled_wd: AdamW's lambda, 0 for Adam
  // coupled_wd: the L2 coefficient, 0 for AdamW; decay_factor: 1 - lr*wd for AdamW, else exactly 1.
  T beta2, one_minus_beta1, one_minus_beta2, eps, coupled_wd, decay_factor, step_size, bc2_sqrt;
  T maximize;  // flag

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    step_size = static_cast<T>(b.lr / (1.0 - ::pow(beta1_d, b.step)));
    bc2_sqrt = static_cast<T>(::sqrt(1.0 - ::pow(beta2_d, b.step)));
    decay_factor = static_cast<T>(decoupled_wd != 0.0 ? 1.0 - b.lr * decoupled_wd : 1.0);
  }

  FT_HD void operator()(T* r) const {
    const T p0 = r[0];
    const T g1 = this->grad(r[1]);
    const T g = effective_grad(g1, p0, maximize, coupled_wd, this->l1);
    const T p = p0 * decay_factor;
    const T m = lerp(r[2], g, one_minus_beta1);
    const T v = r[3] * beta2 + one_minus_beta2 * g * g;
    r[2] = m;
    r[3] = v;
    T vhat = v;
    if constexpr (AMSGRAD) {
      const T vmax = r[4];
      // torch.maximum propagates NaN from either side; so do we, so a NaN never hides in the max.
      vhat = (vmax != vmax || v != v) ? vmax + v : (vmax > v ? vmax : v);
      r[4] = vhat;
    }
    const T denom = sqrt_(vhat) / bc2_sqrt + eps;
    r[0] = p + (-step_size) * (m / denom);
  }
};

// NAdam (Dozat 2016, Adam with Nesterov momentum; torch's parametrization with the momentum schedule
// mu_t = beta1 * (1 - 0.5 * 0.96^(t * psi))):
//   NAdamW: p <- p*(1 - lr*wd);  NAdam: g <- g + wd*p
//   m <- lerp(m, g, 1 - b1);  v <- b2*v + (1 - b2)*g*g;  d = sqrt(v / (1 - b2^t)) + eps
//   p <- p - lr*(1 - mu_t)/(1 - prod_{i<=t} mu_i) * g/d - lr*mu_{t+1}/(1 - prod_{i<=t+1} mu_i) * m/d
// The running product prod mu_i is a tensor scalar (Note [tensor scalars] in rules.h), accumulated in its
// dtype as torch's mu_product *= mu is; bind() gets it as Bound::aux0.  Registers: (p, g, m, v).
template <typename T>
struct NadamOp : GradPrescale<T> {
  static constexpr int depth = 4;
  double beta1_d, beta2_d, momentum_decay, decoupled_wd;  // decoupled_wd: NAdamW's lambda, 0 for NAdam
  T beta2, one_minus_beta1, one_minus_beta2, eps, coupled_wd;
  T decay_factor, bc2, c_grad, c_avg;  // bound per tensor
  T maximize;                          // flag

  FT_HD void bind(const Bound& b) {
    this->bind_prescale(b);
    const double mu = beta1_d * (1.0 - 0.5 * ::pow(0.96, b.step * momentum_decay));
    const double mu_next = beta1_d * (1.0 - 0.5 * ::pow(0.96, (b.step + 1.0) * momentum_decay));
    const double mu_product = b.aux0;
    bc2 = static_cast<T>(1.0 - ::pow(beta2_d, b.step));
    c_grad = static_cast<T>(-b.lr * (1.0 - mu) / (1.0 - mu_product));
    c_avg = static_cast<T>((-b.lr * mu_next) / (1.0 - mu_product * mu_next));
    decay_factor = static_cast<T>(decoupled_wd != 0.0 ? 1.0 - b.lr * decoupled_wd : 1.0);
  }

  FT_HD void operator()(T* r) const {
    const T p0 = r[0];
    const T g = effective_grad(this->grad(r[1]), p0, maximize, coupled_wd, this->l1);
    T p = p0 * decay_factor;
    const T m = lerp(r[2], g, one_minus_beta1);
    const T v = r[3] * beta2 + one_minus_beta2 * g * g;
    r[2] = m;
    r[3] = v;
    const T denom = sqrt_(v / bc2) + eps;
    p = p + c_grad * (g / denom);
    r[0] = p + c_avg * (m / denom);
  }
};

// Exponential moving average of weights (Polyak & Juditsky 1992 averaging with exponential forgetting):
//   a <- a + w*(p - a) with w = 1 - decay, as torch.lerp / torch._foreach_lerp_ compute it.
// SWA's equal-weight running mean is the same rule with w = 1/(n+1).  Registers: (a, p).
template <typename T>
struct EmaOp {
  static constexpr int depth = 2;
  T weight = T(0);

  FT_HD void bind(const Bound& b) { weight = static_cast<T>(b.ema_weight); }

  FT_HD void operator()(T* r) const { r[0] = lerp(r[0], r[1], weight); }
};

// Any update rule followed, in the same pass, by the EMA of the parameter it just wrote. The new
// parameter is rounded to its storage type S first, so the result equals a separate EMA pass over the
// stored parameter bit for bit.  Registers: (the rule's ..., a).
template <typename S, typename T, typename Op>
struct WithEma {
  static constexpr int depth = Op::depth + 1;
  Op op;
  T weight = T(0);

  FT_HD void bind(const Bound& b) {
    op.bind(b);
    weight = static_cast<T>(b.ema_weight);
  }

  FT_HD void operator()(T* r) const {
    op(r);
    r[Op::depth] = lerp(r[Op::depth], static_cast<T>(static_cast<S>(r[0])), weight);
  }
};

}  // namespace math
}  // namespace fusedtrain
